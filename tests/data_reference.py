"""A plain reference of what the data stage must output: one process, one loop per step, no Ray, no partitions,
runs or exchanges. The property tests (tests/property/test_data_properties.py) and the real-corpus test
(tests/integration/test_data_real_corpus.py) compare the stage with it.

It reuses the stage's per-record primitives (`clean.clean_record` with `filters.build`'s rule sets,
`dedup.text_hash`, `dedup.signature`, `dedup.band_keys`, `dedup.split_of`, `pack.supervised`/`pack.seq2seq`,
`chat.parse_record`/`render`/`record`) and
states the orchestration around them as directly as it can (docs/ARCHITECTURE.md, "### Data"):

    read      every record of every input file, files in URI order (file index), records in the order the file's
              reader meets them, each with its 1-based line (row) number: doc id = file index << 32 | line
    clean     normalize, scrub, filter each record (a chat record turn by turn); a dropped one is counted once under
              its reason, and the manifest lists the first ones in read order
    exact     among equal text hashes the first document in doc-id order is kept, the others are exact duplicates
    near      for every LSH band key, the smallest doc id holding it; a document is a near duplicate when, for one of
              its band keys, that smallest document is another one whose estimated Jaccard with it (8-bit
              signatures, chance matches of 1/256 removed) is at least the threshold; exact beats near
    split     by text hash (`dedup.split_of`); shard: train h % train shards, val train shards + h % val shards
    tokenizer BPE on the kept train documents whose text hash % stride == 0, stride = ceil(records read / max docs)
    pack      each shard's documents in doc-id order: pretrain joins token lists with EOS and cuts seq_len blocks
              (the last partial block is the remainder); sft/seq2seq/chat make one padded row per document, and
              sft/chat with data.pack_supervised then put those documents, unpadded, several per row (`pack_rows`)

Not covered: the HF saved-dataset reader, a pretrained tokenizer, the manifest's timings and resume markers, and
the `stats` of non-pretrain kinds (their length histogram counts prompt lengths: see the property test's notes).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_platform.data import chat, clean, dedup, filters, pack

SHARD_TARGET_BYTES = 64 << 20  # input bytes per train shard when data.num_shards is 0


@dataclass(frozen=True)
class Source:
    """One input file: its URI and size, and the records a reader must yield from it, in order:
    (line, fields, None) for a record, (line, None, reason) for one the reader refuses (`invalid_utf8`...)."""

    uri: str
    size: int
    records: list[tuple[int, dict | None, str | None]]


@dataclass
class Doc:
    doc_id: int
    source: str
    line: int
    text: str
    prompt: str
    response: str
    messages: str
    text_hash: int


@dataclass
class Expected:
    """What the stage must produce, up to the tokenizer (`expect`), then per shard (`expect_shards`)."""

    counts: dict[str, Any]
    dropped_by_file: dict[str, dict[str, int]]  # the manifest's: source -> reason -> count
    skipped: list[tuple[str, int, str]]  # every dropped record's (source, line, reason code), in read order
    kept: list[Doc]  # passed the filters, in doc-id order (duplicates included)
    exact: set[int]
    near: set[int]  # near duplicates that are not exact duplicates
    survivors: list[Doc]  # kept minus duplicates, in doc-id order
    split: dict[int, str]
    shard: dict[int, int]  # doc id -> index into shard_names
    shard_names: list[str]
    tokenizer_sample: list[str]
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled by expect_shards
    packed: bool = False  # sft/chat with data.pack_supervised: set by expect_shards


# ----------------------------------------------------------------------------------------------- plain readers
def split_lines(data: bytes) -> list[bytes]:
    """Lines end at b"\\n" only (a lone \\r is text); each keeps its terminator; a last line may have none."""
    parts = data.split(b"\n")
    return [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def read_jsonl(data: bytes, max_record_bytes: int) -> list[tuple[int, dict | None, str | None]]:
    out: list[tuple[int, dict | None, str | None]] = []
    for line, raw in enumerate(split_lines(data), start=1):
        if len(raw) > max_record_bytes:
            out.append((line, None, "record_too_large"))
        elif not raw.strip():
            continue
        else:
            raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 BOM is not part of the record
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append((line, None, "invalid_utf8"))
                continue
            except json.JSONDecodeError:
                out.append((line, None, "malformed_json"))
                continue
            out.append((line, obj, None) if isinstance(obj, dict) else (line, None, "malformed_json"))
    return out


def read_json(data: bytes) -> list[tuple[int, dict | None, str | None]]:
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return [(1, None, "invalid_utf8")]
    except json.JSONDecodeError as e:
        return [(e.lineno, None, "malformed_json")]
    rows = obj.get("data", obj.get("rows")) if isinstance(obj, dict) else obj
    if not isinstance(rows, list):
        return [(1, None, "malformed_json")]
    return [(i, r, None) if isinstance(r, dict) else (i, None, "malformed_json") for i, r in enumerate(rows, 1)]


def read_parquet(data: bytes, wanted: list[str]) -> list[tuple[int, dict | None, str | None]]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    columns = [c for c in wanted if c in table.column_names]
    return [(i, {c: row[c] for c in columns}, None) for i, row in enumerate(table.to_pylist(), start=1)]


def read_text(data: bytes, unit: str, max_record_bytes: int, text_field: str = "text",
              size: int | None = None) -> list[tuple[int, dict | None, str | None]]:
    """`unit` file: the whole file is one record; line: every non-blank line; paragraph: runs of non-blank lines.
    A line the reader refuses (too large, not UTF-8) is its own dropped record, reported in line order: inside a
    paragraph, after the paragraph (which starts at its first good line)."""
    if unit == "file":
        if (size if size is not None else len(data)) > max_record_bytes or len(data) > max_record_bytes:
            return [(1, None, "record_too_large")]
        try:
            return [(1, {text_field: data.decode("utf-8")}, None)]
        except UnicodeDecodeError:
            return [(1, None, "invalid_utf8")]
    out: list[tuple[int, dict | None, str | None]] = []
    paragraph: list[str] = []
    start = 0
    for line, raw in enumerate(split_lines(data), start=1):
        if len(raw) > max_record_bytes:
            out.append((line, None, "record_too_large"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append((line, None, "invalid_utf8"))
            continue
        if unit == "line":
            if text.strip():
                out.append((line, {text_field: text}, None))
        elif text.strip():
            start = start or line
            paragraph.append(text)
        elif paragraph:
            out.append((start, {text_field: "".join(paragraph)}, None))
            paragraph, start = [], 0
    if paragraph:
        out.append((start, {text_field: "".join(paragraph)}, None))
    return sorted(out, key=lambda record: record[0])  # in line order


# --------------------------------------------------------------------------------------------- the reference
def take_fields(fields: dict, cfg) -> tuple[dict[str, str], str | None]:
    """The record's text fields for `cfg.kind`, or the reason code it is dropped for."""
    if cfg.kind == "pretrain":
        value = fields.get(cfg.text_field)
        if value is None:
            return {}, "missing_field"
        return ({"text": value}, None) if isinstance(value, str) else ({}, "wrong_type")
    if cfg.kind == "chat":
        names = {"messages": cfg.messages_field, "instruction": cfg.instruction_field, "input": cfg.input_field,
                 "output": cfg.output_field, "prompt": cfg.prompt_field, "response": cfg.response_field}
        messages, error = chat.parse_record(fields, names)
        if error:
            return {}, error.split(":")[0]
        assert messages is not None
        return {"messages": json.dumps(messages, ensure_ascii=False),
                "text": "\n\n".join(m["content"] for m in messages)}, None
    pair = (cfg.source_field, cfg.target_field) if cfg.kind == "seq2seq" else (cfg.prompt_field, cfg.response_field)
    taken = {}
    for name, key in zip(pair, ("prompt", "response")):
        value = fields.get(name)
        if value is None:
            return {}, "missing_field"
        if not isinstance(value, str):
            return {}, "wrong_type"
        taken[key] = value
    return {**taken, "text": taken["prompt"] + "\n\n" + taken["response"]}, None


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard of two MinHash signatures from their low 8 bits, the 1/256 chance matches removed."""
    matches = sum(int(x) & 0xFF == int(y) & 0xFF for x, y in zip(a.tolist(), b.tolist())) / len(a)
    chance = 1.0 / 256
    return (matches - chance) / (1.0 - chance)


def expect(sources: list[Source], cfg, tok_cfg) -> Expected:
    """Everything up to the tokenizer: counts, dropped records, duplicates, splits, shards, the tokenizer sample."""
    dropped: dict[str, int] = {}
    by_file: dict[str, dict[str, int]] = {}  # source -> reason -> count
    skipped: list[tuple[str, int, str]] = []
    kept: list[Doc] = []
    records_in = pii = 0
    rules = filters.build(cfg.filters, filters.LanguageSpec.from_config(cfg))  # the rule sets the config turns on
    for file_index, src in enumerate(sorted(sources, key=lambda s: s.uri)):
        for line, fields, error in src.records:
            records_in += 1
            record = {"doc_id": (file_index << 32) | line, "source": src.uri, "line": line, "text": "",
                      "prompt": "", "response": "", "messages": "", "drop_reason": ""}
            if error is None:
                assert fields is not None
                taken, error = take_fields(fields, cfg)
                record.update(taken)
            if error:
                record.update(text="", prompt="", response="", messages="", drop_reason=error)
            cleaned = clean.clean_record(record, cfg.normalize, cfg.scrub_pii, cfg.filters, rules)
            pii += int(cleaned.get("pii_replacements") or 0)
            reason = cleaned["drop_reason"]
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                by_file.setdefault(src.uri, {})[reason] = by_file.get(src.uri, {}).get(reason, 0) + 1
                skipped.append((src.uri, line, reason))
                continue
            kept.append(Doc(record["doc_id"], src.uri, line, cleaned["text"], cleaned["prompt"] or "",
                            cleaned["response"] or "", cleaned["messages"] or "", dedup.text_hash(cleaned["text"])))
    kept.sort(key=lambda d: d.doc_id)

    exact: set[int] = set()
    if cfg.dedup.exact:
        first_of: dict[int, int] = {}
        for d in kept:
            if d.text_hash in first_of:
                exact.add(d.doc_id)
            else:
                first_of[d.text_hash] = d.doc_id
    near: set[int] = set()
    if cfg.dedup.near and kept:
        bands, rows = dedup.lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
        a, b = dedup.permutations(cfg.dedup.num_perm, cfg.dedup.seed)
        sigs = {d.doc_id: dedup.signature(d.text, a, b, cfg.dedup.shingle_words) for d in kept}
        keys = {d.doc_id: dedup.band_keys(sigs[d.doc_id], bands, rows).tolist() for d in kept}
        smallest: dict[int, int] = {}
        for d in kept:  # in doc-id order: the first document to hold a key is its smallest
            for key in keys[d.doc_id]:
                smallest.setdefault(key, d.doc_id)
        for d in kept:
            for key in keys[d.doc_id]:
                first = smallest[key]
                if first != d.doc_id and similarity(sigs[d.doc_id], sigs[first]) >= cfg.dedup.threshold:
                    near.add(d.doc_id)
        near -= exact

    survivors = [d for d in kept if d.doc_id not in exact and d.doc_id not in near]
    total_bytes = sum(s.size for s in sources)
    train = cfg.num_shards or max(1, math.ceil(total_bytes / SHARD_TARGET_BYTES))
    val = max(1, math.ceil(train * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    names = [f"train-{i:05d}" for i in range(train)] + [f"val-{i:05d}" for i in range(val)]
    split = {d.doc_id: dedup.split_of(d.text_hash, cfg.val_fraction) for d in survivors}
    shard = {d.doc_id: (train + d.text_hash % max(1, val)) if split[d.doc_id] == "val"
             else d.text_hash % train for d in survivors}
    stride = max(1, math.ceil(records_in / max(1, tok_cfg.max_training_documents)))
    sample = [d.text for d in survivors if split[d.doc_id] == "train" and d.text_hash % stride == 0]
    counts = {"files": len(sources), "records_in": records_in, "dropped": dropped, "pii_replacements": pii,
              "exact_duplicates": len(exact), "near_duplicates": len(near), "documents_kept": len(survivors)}
    return Expected(counts=counts, dropped_by_file=dict(sorted(by_file.items())), skipped=skipped, kept=kept,
                    exact=exact, near=near, survivors=survivors, split=split, shard=shard, shard_names=names,
                    tokenizer_sample=sample)


def expect_shards(exp: Expected, cfg, tokenizer_dir: str) -> dict[str, dict[str, Any]]:
    """Each used shard's rows (column -> list of rows) and counts, tokenizing with the dataset's saved tokenizer
    one document at a time."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    hf = None
    eos = backend.token_to_id("<|endoftext|>")
    pad = backend.token_to_id("<|pad|>")

    def encode(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    out: dict[str, dict[str, Any]] = {}
    exp.packed = pack.packs(str(cfg.kind), cfg.pack_supervised)
    for index, name in enumerate(exp.shard_names):
        docs = [d for d in exp.survivors if exp.shard[d.doc_id] == index]  # already in doc-id order
        if not docs:
            continue
        rows: dict[str, list] = {}
        stat: dict[str, Any] = {"documents": len(docs), "tokens_in": 0, "remainder": 0,
                                "skipped_prompt_too_long": 0, "chat": {}, "counted": []}
        if cfg.kind == "pretrain":
            stream: list[int] = []
            for d in docs:
                ids = encode(d.text)
                stat["counted"] += ids
                stream += ids + [eos]
            blocks = len(stream) // cfg.seq_len
            rows["input_ids"] = [stream[i * cfg.seq_len:(i + 1) * cfg.seq_len] for i in range(blocks)]
            stat["tokens_in"], stat["remainder"] = len(stream), len(stream) - blocks * cfg.seq_len
        elif cfg.kind == "chat":
            if hf is None:
                from llm_platform.data.dataset import load_tokenizer

                hf = load_tokenizer(tokenizer_dir)
            counts = {"truncated": 0, "skipped_too_long": 0, "skipped_no_assistant_tokens": 0,
                      "skipped_template_error": 0}
            for d in docs:
                try:
                    ids, mask = chat.render(hf, json.loads(d.messages))
                except Exception:  # noqa: BLE001 - the stage counts a template error and goes on
                    counts["skipped_template_error"] += 1
                    continue
                stat["tokens_in"] += len(ids)
                row = chat.record(ids, mask, cfg.seq_len, pad, cfg.chat_overflow)
                if isinstance(row, str):
                    counts[f"skipped_{row}"] += 1
                    continue
                counts["truncated"] += len(ids) > cfg.seq_len
                for key, value in row.items():
                    rows.setdefault(key, []).append(value.tolist())
            stat["chat"] = counts
        else:
            for d in docs:
                p, r = encode(d.prompt), encode(d.response)
                stat["tokens_in"] += len(p) + len(r) + 1
                rec = (pack.supervised(p, r, cfg.seq_len, eos, pad) if cfg.kind == "sft"
                       else pack.seq2seq(p, r, cfg.seq_len, cfg.target_len, eos, pad))
                if isinstance(rec, str):
                    stat["skipped_prompt_too_long"] += 1
                    continue
                for key, value in rec.items():
                    rows.setdefault(key, []).append(value.tolist())
        if exp.packed:  # the padded rows above, packed several per row
            examples = [(ids[:sum(m)], labels[:sum(m)]) for ids, labels, m in
                        zip(rows.get("input_ids", []), rows.get("labels", []), rows.get("attention_mask", []))]
            rows = pack_rows(examples, cfg.seq_len, pad)
            stat["packing"] = {"examples": len(examples), "rows": len(rows.get("input_ids", [])),
                               "tokens": sum(len(ids) for ids, _ in examples)}
        stat["records"] = len(next(iter(rows.values()))) if rows else 0
        out[name] = {"rows": rows, **stat}
    exp.shards = out
    return out


def expected_splits(exp: Expected, seq_len: int) -> dict[str, dict[str, Any]]:
    """The manifest's `splits` entries (without row_groups) from `expect_shards`' result."""
    splits: dict[str, dict[str, Any]] = {}
    for name in ("train", "val"):
        entry = {"files": [], "num_records": 0, "num_tokens": 0, "documents": 0, "tokens_in": 0,
                 "remainder_tokens": 0, "skipped_prompt_too_long": 0, "chat": {}}
        for shard, s in sorted(exp.shards.items()):
            if not shard.startswith(name + "-"):
                continue
            if s["records"]:
                entry["files"].append(f"{name}/part-{shard.rsplit('-', 1)[1]}.parquet")
            entry["num_records"] += s["records"]
            entry["num_tokens"] += s["records"] * seq_len
            entry["documents"] += s["documents"]
            entry["tokens_in"] += s["tokens_in"]
            entry["remainder_tokens"] += s["remainder"]
            entry["skipped_prompt_too_long"] += s["skipped_prompt_too_long"]
            for key, n in s["chat"].items():
                entry["chat"][key] = entry["chat"].get(key, 0) + n
        if exp.packed:  # rows, examples per row and the fill rate (tokens that are not padding / rows x seq_len)
            got = [s["packing"] for shard, s in sorted(exp.shards.items()) if shard.startswith(name + "-")]
            examples, rows, tokens = (sum(p[k] for p in got) for k in ("examples", "rows", "tokens"))
            entry["packing"] = {"examples": examples, "rows": rows, "tokens": tokens,
                                "examples_per_row": examples / rows if rows else 0.0,
                                "fill_rate": tokens / (rows * seq_len) if rows else 0.0}
        splits[name] = entry
    return splits


def pack_rows(examples: list[tuple[list[int], list[int]]], seq_len: int, pad: int,
              window: int = pack.PACK_WINDOW_EXAMPLES) -> dict[str, list[list[int]]]:
    """Packed supervised rows, plainly: for each run of `window` examples, longest first (ties: earlier first), each
    into the first row of that run with room, else a new row; a row's examples in their original order, then
    padding. Per token: the id, the label (-100 on an example's first token), attention 1, its position in the
    example, the example's place in the row (1, 2, ...); per padding token: pad, -100, 0, 0, 1, 2, ... and 0."""
    columns: dict[str, list[list[int]]] = {k: [] for k in ("input_ids", "labels", "attention_mask", "position_ids",
                                                           "example_ids")}
    for start in range(0, len(examples), window):
        run = range(start, min(start + window, len(examples)))
        rows: list[list[int]] = []
        for i in sorted(run, key=lambda j: (-len(examples[j][0]), j)):
            for row in rows:
                if sum(len(examples[j][0]) for j in row) + len(examples[i][0]) <= seq_len:
                    row.append(i)
                    break
            else:
                rows.append([i])
        for row in rows:
            out: dict[str, list[int]] = {k: [] for k in columns}
            for place, i in enumerate(sorted(row), start=1):
                ids, labels = examples[i]
                out["input_ids"] += ids
                out["labels"] += [-100] + labels[1:]
                out["attention_mask"] += [1] * len(ids)
                out["position_ids"] += list(range(len(ids)))
                out["example_ids"] += [place] * len(ids)
            n = seq_len - len(out["input_ids"])
            for key, tail in (("input_ids", [pad] * n), ("labels", [-100] * n), ("attention_mask", [0] * n),
                              ("position_ids", list(range(n))), ("example_ids", [0] * n)):
                columns[key].append(out[key] + tail)
    return columns
