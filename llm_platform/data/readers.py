"""The file formats: a reader per format yields (line or row, fields, error) for one input piece (a file, or a byte
range of a large line-based file), streamed so nothing needs the file in memory. `sources.read_file` turns them
into records.

    jsonl    one object per line (blank lines skipped, a UTF-8 BOM dropped)
    json     a list of objects, or {"data": [...]} / {"rows": [...]}, read whole (so bounded in size)
    parquet  the configured columns, a batch of rows at a time
    text     a record per file, per line or per paragraph (`data.text_unit`)
    hf       a dataset saved with `datasets.save_to_disk`, every split in name order
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llm_platform import storage

BOM = b"\xef\xbb\xbf"


@dataclass
class ReadSpec:
    """What a read task needs: plain values so it ships to Ray workers as is."""

    kind: str
    text_field: str
    prompt_field: str
    response_field: str
    text_unit: str
    max_record_bytes: int
    on_error: str
    chat_fields: dict[str, str] | None = None
    """chat records: field names `messages`, `instruction`, `input`, `output`, `prompt`, `response`."""
    pair_fields: dict[str, str] | None = None
    """preference records: field names `prompt`, `chosen`, `rejected`."""

    @classmethod
    def from_config(cls, cfg) -> ReadSpec:
        if cfg.kind == "seq2seq":
            prompt, response = cfg.source_field, cfg.target_field
        else:
            prompt, response = cfg.prompt_field, cfg.response_field
        chat_fields = {"messages": cfg.messages_field, "instruction": cfg.instruction_field,
                       "input": cfg.input_field, "output": cfg.output_field, "prompt": cfg.prompt_field,
                       "response": cfg.response_field}
        pair_fields = {"prompt": cfg.prompt_field, "chosen": cfg.chosen_field, "rejected": cfg.rejected_field}
        return cls(kind=cfg.kind, text_field=cfg.text_field, prompt_field=prompt, response_field=response,
                   text_unit=cfg.text_unit, max_record_bytes=cfg.max_record_bytes, on_error=cfg.on_error,
                   chat_fields=chat_fields, pair_fields=pair_fields)


class LinesOfRange:
    """The bytes of the lines that start in [start, end) of a seekable stream, as `read()` chunks. A line belongs to
    the range its first byte is in: a range skips the tail of a line begun before it and finishes the one running
    at its end, so consecutive ranges read every line exactly once."""

    def __init__(self, raw, start: int, end: int):
        self._chunks = self._owned(raw, start, end)

    def read(self, n: int = -1) -> bytes:  # chunks of any size: `_read_lines` takes what it gets
        return next(self._chunks, b"")

    @staticmethod
    def _owned(raw, start: int, end: int) -> Iterator[bytes]:
        rest, pos = b"", start  # pos: the offset of rest's first byte
        if start > 0:  # skip through the first newline at or after start - 1 (at start - 1: a line starts at start)
            raw.seek(start - 1)
            pos = start - 1
            while True:
                chunk = raw.read(1 << 16)
                if not chunk:
                    return
                nl = chunk.find(b"\n")
                if nl >= 0:
                    pos, rest = pos + nl + 1, chunk[nl + 1:]
                    break
                pos += len(chunk)
        if pos >= end:  # the line running at `start` ran past the range: it owns none
            return
        while True:
            rest = rest or raw.read(1 << 16)
            if not rest:
                return
            if pos + len(rest) < end:
                yield rest
                pos, rest = pos + len(rest), b""
                continue
            nl = rest.find(b"\n", end - pos - 1)  # the newline that ends the line running at end - 1
            if nl >= 0:
                yield rest[:nl + 1]
                return
            yield rest
            while chunk := raw.read(1 << 16):
                nl = chunk.find(b"\n")
                yield chunk[:nl + 1] if nl >= 0 else chunk
                if nl >= 0:
                    return
            return


@contextmanager
def _open_raw(meta: dict):
    """The piece's bytes as a stream: from memory when they were fetched already (`prefetched`), else from storage
    (only the lines of its range, for a piece of a file cut into ranges)."""
    if meta.get("data") is not None:
        yield io.BytesIO(meta["data"])
    else:
        with storage.open_read(meta["uri"], "rb") as raw:
            yield LinesOfRange(raw, *meta["range"]) if meta.get("range") else raw


@contextmanager
def _open(meta: dict):
    """A binary, line-readable stream of the file, decompressed (gzip, zstd)."""
    with _open_raw(meta) as raw:
        if meta["compression"] == "gzip":
            import gzip

            yield gzip.GzipFile(fileobj=raw)
        elif meta["compression"] == "zstd":
            import zstandard

            # fsspec's zstd wrapper cannot readline(limit); a buffered stream reader can.
            yield io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        else:
            yield raw


def _read_lines(meta: dict, spec: ReadSpec) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(line number, line bytes, None), or (line number, None, "record_too_large") for a line over the limit,
    whose bytes are skipped without being held in memory. Works on any stream with `read(n)` (s3fs files have no
    `readline(limit)`)."""
    limit = spec.max_record_bytes
    with _open(meta) as f:
        line, buf, oversized = 0, bytearray(), False
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                buf += chunk
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                line += 1
                if oversized or nl + 1 - start > limit:
                    yield line, None, "record_too_large"
                else:
                    yield line, bytes(buf[start:nl + 1]), None
                oversized, start = False, nl + 1
            del buf[:start]
            if len(buf) > limit:  # a line still growing past the limit: drop what we have, remember it
                oversized = True
                buf.clear()
            if not chunk:
                if buf or oversized:
                    line += 1
                    yield (line, None, "record_too_large") if oversized else (line, bytes(buf), None)
                meta["lines"] = line  # blank ones included: where the next range of the file starts counting
                return


def _read_jsonl(meta: dict, spec: ReadSpec) -> Iterator[tuple[int, dict | None, str | None]]:
    for line, raw, error in _read_lines(meta, spec):
        if error:
            yield line, None, error
            continue
        assert raw is not None
        if not raw.strip():
            continue  # blank lines are not records
        if raw.startswith(BOM):  # a file saved "UTF-8 with BOM" (or files concatenated with theirs)
            raw = raw[len(BOM):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line, None, f"invalid_utf8: byte {e.start}"
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield line, None, f"malformed_json: {e.msg} at column {e.colno}"
            continue
        if not isinstance(obj, dict):
            yield line, None, f"malformed_json: expected an object, got {type(obj).__name__}"
            continue
        yield line, obj, None


def _read_json(meta: dict, spec: ReadSpec) -> Iterator[tuple[int, dict | None, str | None]]:
    if meta["size"] > spec.max_record_bytes * 4:
        yield 1, None, "record_too_large: use JSONL for large files"
        return
    with _open(meta) as f:
        raw = f.read()
    try:
        obj = json.loads(raw.decode("utf-8-sig"))  # a leading BOM is not JSON, but editors write one
    except UnicodeDecodeError as e:
        yield 1, None, f"invalid_utf8: byte {e.start}"
        return
    except json.JSONDecodeError as e:
        yield e.lineno, None, f"malformed_json: {e.msg} at line {e.lineno} column {e.colno}"
        return
    rows = obj.get("data", obj.get("rows")) if isinstance(obj, dict) else obj
    if not isinstance(rows, list):
        yield 1, None, "malformed_json: expected a list of objects (or {\"data\": [...]})"
        return
    for i, row in enumerate(rows, start=1):
        yield (i, row, None) if isinstance(row, dict) else (i, None, "malformed_json: element is not an object")


def _read_parquet(meta: dict, spec: ReadSpec) -> Iterator[tuple[int, dict | None, str | None]]:
    import pyarrow.parquet as pq

    # Parquet is read from its footer backwards, so a compressed file (a.parquet.gz) is inflated into memory first.
    with _open(meta) as f:
        pf = pq.ParquetFile(io.BytesIO(f.read()) if meta["compression"] else f)
        names = set(pf.schema_arrow.names)
        wanted = ([spec.text_field] if spec.kind == "pretrain" else list((spec.chat_fields or {}).values())
                  if spec.kind == "chat" else list((spec.pair_fields or {}).values())
                  if spec.kind == "preference" else [spec.prompt_field, spec.response_field])
        columns = [c for c in wanted if c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns or None):
            for fields in batch.to_pylist():
                row += 1
                yield row, {k: fields.get(k) for k in columns}, None


def _read_text(meta: dict, spec: ReadSpec) -> Iterator[tuple[int, dict | None, str | None]]:
    if spec.text_unit == "file":
        if meta["size"] > spec.max_record_bytes:
            yield 1, None, "record_too_large"
            return
        with _open(meta) as f:
            raw = f.read(spec.max_record_bytes + 1)
        if len(raw) > spec.max_record_bytes:
            yield 1, None, "record_too_large"
            return
        try:
            yield 1, {spec.text_field: raw.decode("utf-8")}, None
        except UnicodeDecodeError as e:
            yield 1, None, f"invalid_utf8: byte {e.start}"
        return
    paragraph: list[str] = []
    start = 0
    held: list[tuple[int, None, str]] = []  # bad lines inside the open paragraph: they follow it, in line order
    for line, raw, error in _read_lines(meta, spec):
        if not error and raw is not None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                error = f"invalid_utf8: byte {e.start}"
        if error or raw is None:
            if paragraph:
                held.append((line, None, str(error)))
            else:
                yield line, None, error
            continue
        if spec.text_unit == "line":
            if text.strip():
                yield line, {spec.text_field: text}, None
            continue
        if text.strip():
            start = start or line
            paragraph.append(text)
        elif paragraph:
            yield start, {spec.text_field: "".join(paragraph)}, None
            yield from held
            paragraph, start, held = [], 0, []
    if paragraph:
        yield start, {spec.text_field: "".join(paragraph)}, None
    yield from held


def _read_hf(meta: dict, spec: ReadSpec) -> Iterator[tuple[int, dict | None, str | None]]:
    import datasets

    uri = meta["uri"]
    options = {"storage_options": storage.s3_options()} if storage.is_remote(uri) else {}
    loaded = datasets.load_from_disk(uri, **options)
    splits = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    row = 0
    for split in splits:
        for batch in split.iter(batch_size=1024):
            keys = list(batch)
            for i in range(len(batch[keys[0]]) if keys else 0):
                row += 1
                yield row, {k: batch[k][i] for k in keys}, None


READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "text": _read_text, "hf": _read_hf}
