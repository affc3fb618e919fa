"""Read corpus files into records, one generator per file, so nothing needs the corpus in memory.

A record is a dict with `doc_id` (stable: piece index << 32 | line or row), `source` (file URI), `line` (1-based line
or row), `text` (and `prompt`/`response` for sft and seq2seq records; `messages`, the conversation as JSON, for chat
records, whose `text` joins the turns for filters and dedup) and `drop_reason`. A bad record is yielded with
`drop_reason` set (malformed_json, missing_field:<name>, invalid_utf8, record_too_large, corrupt_file...) and an
empty text, so the stage can count and report it; `on_error=fail` raises a DataError naming the file and line.
"""

from __future__ import annotations

import collections
import json
import os
import posixpath
from collections.abc import Generator, Iterator

from llm_platform import storage
from llm_platform.data.readers import READERS, ReadSpec
from llm_platform.errors import DataError

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text",
              ".text": "text", ".md": "text"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
PREFETCH_BYTES = 8 << 20  # files up to this size are fetched whole, ahead of the parser (`prefetched`)
PREFETCH_THREADS = 8
PREFETCH_WINDOW_BYTES = 64 << 20  # the most fetched ahead at once


def split_extension(uri: str) -> tuple[str, str | None]:
    """(format, compression) from a file name, e.g. `a.jsonl.zst` -> ("jsonl", "zstd"); ("", None) if unknown."""
    name = posixpath.basename(uri).lower()
    root, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        root, ext = os.path.splitext(root)
    return EXTENSIONS.get(ext, ""), compression


def list_inputs(patterns: list[str], fmt: str = "auto") -> tuple[list[dict], list[dict]]:
    """Expand URIs/globs/folders into input files with size and change marker.

    Returns:
        (inputs, missing): inputs as {uri, format, compression, size, marker}; missing as {source, reason}.

    Raises:
        DataError: the store denied access to a source. Unlike a missing path this is never skipped (whatever
            `data.on_error` says): a dataset silently built without a whole source would look complete.
    """
    inputs: list[dict] = []
    missing: list[dict] = []
    for pattern in patterns:
        try:
            uris = _expand(pattern)
        except PermissionError as e:
            raise access_denied(pattern, e) from None
        except OSError as e:
            missing.append({"source": pattern, "line": 0, "reason": f"unreadable: {e}"})
            continue
        if not uris:
            missing.append({"source": pattern, "line": 0, "reason": "missing_path: no file matches"})
        probed = False
        for uri, detected, details in uris:
            file_fmt = detected if fmt == "auto" or detected == "hf" else fmt
            compression = split_extension(uri)[1]
            if not file_fmt:
                missing.append({"source": uri, "line": 0, "reason": "unknown_format: set data.format"})
                continue
            meta = {"uri": uri, "format": file_fmt, "compression": compression, "size": 0, "marker": ""}
            if file_fmt != "hf":
                # Listing a bucket can be allowed while reading its objects is not: one object of each source is
                # asked for (the listing gave the others' sizes), so a refused prefix stops the stage here, before
                # any Ray work, naming the file.
                try:
                    if details is None or not probed:
                        details, probed = storage.info(uri), True
                except PermissionError as e:
                    raise access_denied(uri, e) from None
                meta.update({k: v for k, v in details.items() if k in ("size", "marker")})
            inputs.append(meta)
    inputs.sort(key=lambda m: m["uri"])
    return inputs, missing


def access_denied(uri: str, error: BaseException) -> DataError:
    """The error for a source the store will not let us list or read, naming the URI and (S3) the bucket."""
    detail = str(error).strip() or type(error).__name__
    if storage.is_remote(uri):
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        return DataError(f"{uri}: access denied to S3 bucket '{bucket}' ({detail}). The credentials in use may not "
                         f"list or read it: grant them s3:ListBucket and s3:GetObject there, or change data.sources")
    return DataError(f"{uri}: access denied by the file system ({detail}). Make it readable by this user, or "
                     f"change data.sources")


def _expand(pattern: str) -> list[tuple[str, str, dict | None]]:
    """(uri, format by extension, size and marker from the listing or None) of every file a source names."""
    globbing = any(c in pattern for c in "*?[")
    try:  # a name with glob characters that exists as it is ("notes [2023].jsonl") is that file, not a pattern
        exists = storage.exists(pattern)
    except PermissionError:
        if not globbing:
            raise
        exists = False  # refused by name: the listing says whether the whole source is
    if not exists and globbing:
        return [(f["uri"], split_extension(f["uri"])[0], f) for f in storage.files_info(pattern)]
    if not exists:
        return []
    if storage.isdir(pattern):
        if any(storage.exists(storage.join(pattern, m)) for m in HF_MARKERS):
            return [(pattern, "hf", None)]
        return [(f["uri"], split_extension(f["uri"])[0], f) for f in storage.files_info(pattern, recursive=True)
                if split_extension(f["uri"])[0]]
    return [(pattern, split_extension(pattern)[0], None)]


def prefetched(metas: list[dict], pieces: list[int]) -> Iterator[tuple[dict, int, bytes | None]]:
    """(meta, piece index, the file's bytes or None) for each piece in order. Small files (up to `PREFETCH_BYTES`) are
    fetched a few at a time on threads while the caller parses the earlier ones: on S3 a small object costs a
    round trip, not bandwidth, so fetched one after the other they would cost per file. Larger files and saved HF
    datasets get None and are streamed by `read_file` itself; so does one whose fetch failed, so that its error is
    met, and reported, where any read error is."""
    from concurrent.futures import ThreadPoolExecutor

    def fetch(meta: dict) -> bytes | None:
        if meta["format"] == "hf" or meta.get("range") or int(meta["size"]) > PREFETCH_BYTES:
            return None
        try:
            return storage.read_whole(meta["uri"])
        except Exception:  # noqa: BLE001 - read_file meets it again and reports it as it reports any read error
            return None

    with ThreadPoolExecutor(PREFETCH_THREADS) as pool:
        window: collections.deque = collections.deque()  # (meta, piece index, future), in file order
        held = 0  # bytes of the files in the window
        for meta, index in zip(metas, pieces):
            window.append((meta, index, pool.submit(fetch, meta)))
            held += int(meta["size"])
            while len(window) > 2 * PREFETCH_THREADS or held > PREFETCH_WINDOW_BYTES:
                first, first_index, future = window.popleft()
                held -= int(first["size"])
                yield first, first_index, future.result()
        for meta, index, future in window:
            yield meta, index, future.result()


def splittable(meta: dict, spec: ReadSpec) -> bool:
    """Whether a file can be read in byte ranges: one record per line, and no compression (a stream cannot seek)."""
    line_based = meta["format"] == "jsonl" or (meta["format"] == "text" and spec.text_unit == "line")
    return line_based and not meta["compression"]


def pieces(inputs: list[dict], spec: ReadSpec, piece_bytes: int) -> list[dict]:
    """The input files as the pieces the stage reads, in order: a file whose records are lines (`splittable`) and
    that is larger than `piece_bytes` is cut into byte ranges (`range`: [start, end)) read by different tasks; any
    other file is one piece (`range` None). A piece's `size` is its bytes. A piece's index, not its file's, is the
    high half of its documents' ids (piece index << 32 | line), so ids keep file order whether or not a file is cut:
    with no file cut, the piece index is the file index."""
    out = []
    for meta in inputs:
        size = int(meta["size"])
        if size <= piece_bytes or not splittable(meta, spec):
            out.append({**meta, "range": None})
            continue
        for start in range(0, size, piece_bytes):
            end = min(size, start + piece_bytes)
            out.append({**meta, "range": [start, end], "size": end - start})
    return out


def read_file(meta: dict, piece: int, spec: ReadSpec, data: bytes | None = None) -> Generator[dict, None, int]:
    """Yield the records of one input piece (see the module docstring and `pieces`); `data`: its bytes, already
    fetched. Returns how many lines (rows) the piece held. A piece of a file cut into byte ranges numbers its lines
    from the range's start (no reader of a later range knows how many lines came before it): the stage adds the
    earlier ranges' line counts to its skipped records (`units.with_file_lines`), and a `data.on_error=fail` error
    names the range."""
    uri = meta["uri"]
    where = f"{uri} (bytes {meta['range'][0]}-{meta['range'][1]}, lines counted from there)" if meta.get("range") \
        else uri
    meta = {**meta, "data": data}  # the readers' own copy (`_read_lines` leaves the line count in it)
    line = 0
    try:
        for line, fields, error in READERS[meta["format"]](meta, spec):
            yield _record(piece, uri, where, line, fields, error, spec)
    except DataError:
        raise
    except PermissionError as e:  # not a property of the file's content: never counted as a corrupt file
        raise access_denied(uri, e) from None
    except Exception as e:  # a corrupt or truncated file: keep what was read, report where it broke
        line += 1
        yield _record(piece, uri, where, line, None, f"corrupt_file: {type(e).__name__}: {e}", spec)
    return int(meta.get("lines", line))


def _record(piece: int, uri: str, where: str, line: int, fields: dict | None, error: str | None,
            spec: ReadSpec) -> dict:
    record = {"doc_id": (piece << 32) | line, "source": uri, "line": line, "text": "", "prompt": "",
              "response": "", "messages": "", "drop_reason": ""}
    if error is None and fields is not None:
        error = _take_fields(fields, spec, record)
    if error:
        if spec.on_error == "fail":
            raise DataError(f"{where}:{line}: {error} (data.on_error=fail)")
        # The reason code is what precedes the first colon ("malformed_json"); the detail keeps the rest.
        record.update(text="", prompt="", response="", messages="", drop_reason=error.split(":")[0], detail=error)
    return record


def _take_fields(fields: dict, spec: ReadSpec, record: dict) -> str | None:
    """Copy the configured fields into the record; an error string when one is missing or not text."""
    if spec.kind == "pretrain":
        value = fields.get(spec.text_field)
        if value is None:
            return f"missing_field:{spec.text_field}"
        if not isinstance(value, str):
            return f"wrong_type:{spec.text_field} is {type(value).__name__}"
        record["text"] = value
        return None
    if spec.kind == "preference":  # the pair, as {prompt, chosen, rejected} messages (data/pairs.py)
        from llm_platform.data import pairs

        parsed, error = pairs.parse_pair(fields, spec.pair_fields or {})
        if error or parsed is None:
            return error
        record["messages"] = json.dumps(dict(zip(("prompt", "chosen", "rejected"), parsed)), ensure_ascii=False)
        record["text"] = "\n\n".join(m["content"] for part in parsed for m in part)
        return None
    if spec.kind == "chat":
        from llm_platform.data import chat

        messages, error = chat.parse_record(fields, spec.chat_fields or {})
        if error:
            return error
        record["messages"] = json.dumps(messages, ensure_ascii=False)
        record["text"] = "\n\n".join(m["content"] for m in messages or [])
        return None
    for name, key in ((spec.prompt_field, "prompt"), (spec.response_field, "response")):
        value = fields.get(name)
        if value is None:
            return f"missing_field:{name}"
        if not isinstance(value, str):
            return f"wrong_type:{name} is {type(value).__name__}"
        record[key] = value
    record["text"] = record["prompt"] + "\n\n" + record["response"]
    return None
