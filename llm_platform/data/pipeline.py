"""The data stage on Ray Data: read -> clean -> dedup -> split -> tokenizer -> tokenize and pack -> manifest.

Phases commit their output under `<dataset>/_work/` with a marker, so an interrupted run resumes at the first
unfinished phase (packed shards resume one by one). `manifest.json` is written last; a dataset folder without it is
never read. A second run with the same inputs and config finds the manifest and does nothing.

    phase       Ray Data                                              output
    read+clean  from_items(files) -> map_batches(read, clean)           _work/clean/*.parquet (+ _SUCCESS)
    dedup       map(keys) -> repartition(keys=[key]) -> map(block dups) _work/dups.parquet
    tokenizer   stream a deterministic sample of train docs to BPE    tokenizer/
    pack        map(split, shard) -> groupby(shard).map_groups(pack)   train/part-*.parquet val/part-*.parquet
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from llm_platform import console, names, storage
from llm_platform.config.data import DataConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data import chat, clean, dedup, pack, sample, sources
from llm_platform.data import tokenizer as tokenizers
from llm_platform.data.dataset import MANIFEST, read_parquet
from llm_platform.data.report import summary_table
from llm_platform.errors import ConfigError, DataError

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # bump when the shard layout or any phase's semantics change: it is part of the fingerprint
SHARD_TARGET_BYTES = 64 << 20
# Knobs that change speed, not output: left out of the fingerprint.
_NOT_FINGERPRINTED = ("tokenize_batch_size", "tokenize_concurrency", "max_records_reported", "name")


@dataclass
class DatasetResult:
    """A finished dataset folder and its manifest."""

    uri: str
    manifest: dict[str, Any]
    reused: bool = False

    def summary(self) -> str:
        head = "already complete, nothing to do" if self.reused else "built"
        return f"dataset {self.uri} ({head})\n" + summary_table(self.manifest)


def validate(cfg: DataConfig, tok: TokenizerConfig) -> None:
    """Refuse a config that cannot work, naming the key. (Keys with a set of choices are Enums in the schema:
    another value never gets here.)"""
    names.check(cfg.name, "data.name")  # it becomes the folder datasets/<name>/
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if cfg.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.seq_len} must be at least 2")
    if not 0.0 < cfg.dedup.threshold <= 1.0:
        raise ConfigError(f"data.dedup.threshold={cfg.dedup.threshold} must be in (0, 1]")
    if tok.kind == "bpe" and tok.vocab_size < 300:
        raise ConfigError(f"tokenizer.vocab_size={tok.vocab_size} must be at least 300 (256 bytes + special tokens)")


def sample_corpus_uri(cfg: DataConfig, root: str) -> str:
    return storage.join(root, "corpora", f"sample-n{cfg.sample.num_documents}-s{cfg.sample.seed}", "sample.jsonl")


def _inputs(cfg: DataConfig, root: str, create: bool) -> tuple[list[dict], list[dict]]:
    patterns = list(cfg.sources)
    if not patterns:
        uri = sample_corpus_uri(cfg, root)
        if not storage.exists(uri):
            if not create:
                return [], []
            storage.write_bytes(uri, sample.to_jsonl(sample.generate(cfg.sample.num_documents, cfg.sample.seed)))
        patterns = [uri]
    return sources.list_inputs(patterns, cfg.format)


def fingerprint(cfg: DataConfig, tok: TokenizerConfig, inputs: list[dict], root: str | None = None) -> str:
    """Hash of the inputs (uri, size, etag/mtime), the output-relevant config and the tokenizer config (with the
    files of a pretrained tokenizer; `root` resolves a `registry:` tokenizer path)."""
    data = {k: v for k, v in asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    tok_record = tokenizers.fingerprint_record(tok, root or ".")
    listing = [(m["uri"], m["size"], m["marker"], m["format"]) for m in inputs]
    return storage.fingerprint({"v": FORMAT_VERSION, "inputs": listing, "data": data, "tokenizer": tok_record})


def resolve_dataset(cfg: DataConfig, tok: TokenizerConfig, root: str) -> str | None:
    """The URI of the finished dataset the data stage produces for this config, or None if it does not exist."""
    names.check(cfg.name, "data.name")
    inputs, _ = _inputs(cfg, root, create=False)
    if not inputs:
        return None
    uri = storage.join(root, "datasets", cfg.name, fingerprint(cfg, tok, inputs, root))
    return uri if storage.exists(storage.join(uri, MANIFEST)) else None


def build_dataset(cfg: DataConfig, tok: TokenizerConfig, root: str, *, progress: bool | None = None,
                  connect=None) -> DatasetResult:
    """Run the data stage (see the module docstring). Ray must be connected (`cluster.connect`), or `connect` given:
    it is called only when there is work for Ray (a dataset already complete is returned without starting Ray)."""
    import ray.data

    validate(cfg, tok)
    inputs, missing = _inputs(cfg, root, create=True)
    if missing and cfg.on_error == "fail":
        first = missing[0]
        raise DataError(f"{first['source']}: {first['reason']} (data.on_error=fail)")
    if not inputs:
        reasons = "; ".join(f"{m['source']}: {m['reason']}" for m in missing) or "data.sources is empty"
        raise DataError(f"no readable input files: {reasons}")
    fp = fingerprint(cfg, tok, inputs, root)
    out = storage.join(root, "datasets", cfg.name, fp)
    if storage.exists(storage.join(out, MANIFEST)):
        log.info("dataset %s is complete; nothing to do", out)
        return DatasetResult(out, storage.read_json(storage.join(out, MANIFEST)), reused=True)
    if connect is not None:
        connect()

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = console.progress_enabled() if progress is None else progress
    work = storage.join(out, "_work")
    timings: dict[str, float] = {}
    resumed: list[str] = []  # phases found complete from an interrupted earlier run
    try:
        t = time.perf_counter()
        _read_and_clean(inputs, cfg, work, resumed)
        timings["read_clean_s"] = time.perf_counter() - t
        t = time.perf_counter()
        dups = _deduplicate(cfg, work, resumed)
        timings["dedup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tok_record = _tokenizer(cfg, tok, work, out, dups, resumed, root)
        timings["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        shards = _pack(cfg, inputs, work, out, dups, tok_record)
        if any(s.get("resumed") for s in shards):
            resumed.append(f"pack:{sum(1 for s in shards if s.get('resumed'))}/{len(shards)} shards")
        timings["tokenize_pack_s"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - Ray wraps task errors; surface a DataError raised in a worker as itself
        raise _unwrap(e) from None
    manifest = _manifest(cfg, tok, fp, inputs, missing, work, dups, tok_record, shards, timings)
    manifest["resumed_phases"] = resumed
    storage.write_json(storage.join(out, MANIFEST), manifest)
    storage.delete(work)
    return DatasetResult(out, manifest)


def _unwrap(error: BaseException) -> BaseException:
    """The DataError a Ray worker raised (Ray wraps it in RayTaskError and UserCodeException), or `error` itself."""
    import re

    seen: BaseException | None = error
    while seen is not None:
        cause = getattr(seen, "cause", None)
        if isinstance(cause, DataError) and cause.args:
            return DataError(str(cause.args[0]))
        if type(seen) is DataError:
            return seen
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    found = re.search(r"DataError: (.+)", str(error))
    return DataError(found.group(1).strip()) if found else error


# ----------------------------------------------------------------------------------------------- read + clean
def _read_and_clean(inputs: list[dict], cfg: DataConfig, work: str, resumed: list[str]) -> None:
    import ray.data

    marker = storage.join(work, "clean", "_SUCCESS")
    if storage.exists(marker):
        log.info("read+clean: done by an earlier run, resuming after it")
        resumed.append("read_clean")
        return
    storage.delete(storage.join(work, "clean"))  # a partial earlier attempt
    files = [{**m, "compression": m["compression"] or "", "file_index": i} for i, m in enumerate(inputs)]
    spec = sources.ReadSpec.from_config(cfg)
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    # One file per read task; generator batches keep a task's memory bounded however large its file is.
    ds = ds.map_batches(_read_task, batch_size=1, fn_kwargs={"spec": spec, "settings": storage.settings()},
                        num_cpus=0.5)
    ds = ds.map_batches(_clean_batch, batch_format="pandas", num_cpus=0.5,
                        fn_kwargs={"form": cfg.normalize, "pii": cfg.scrub_pii, "filters": cfg.filters})
    fs, path = storage.pyarrow_filesystem(storage.join(work, "clean"))
    ds.write_parquet(path, filesystem=fs)
    storage.write_text(marker, "")


def _read_task(batch: dict, spec: sources.ReadSpec, settings: dict):
    batch = {k: list(v) for k, v in batch.items()}
    batch["compression"] = [c or None for c in batch["compression"]]
    with storage.using(settings):  # the driver's endpoint, not the one this pooled worker started with
        yield from sources.read_many(batch, spec)


def _clean_batch(df, form: str, pii: bool, filters):
    records = [clean.clean_record(r, form, pii, filters) for r in df.to_dict("records")]
    import pandas as pd

    out = pd.DataFrame.from_records(records, columns=[*sources.COLUMNS, "pii_replacements"])
    out["pii_replacements"] = out["pii_replacements"].fillna(0).astype("int64")
    out["text_hash"] = [dedup.text_hash(t) if not r else 0 for t, r in zip(out["text"], out["drop_reason"])]
    return out


def _read_clean(work: str, columns: list[str]):
    fs, path = storage.pyarrow_filesystem(storage.join(work, "clean"))
    return read_parquet(path, fs, columns=columns, file_extensions=["parquet"])  # V1 reader: see its docstring


# ----------------------------------------------------------------------------------------------------- dedup
def _deduplicate(cfg: DataConfig, work: str, resumed: list[str]) -> dict[str, np.ndarray]:
    """Duplicate doc ids with the id they duplicate and the reason (exact or near)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = storage.join(work, "dups.parquet")
    if storage.exists(done):
        resumed.append("dedup")
        table = pq.read_table(io.BytesIO(storage.read_bytes(done)))
        return {c: table[c].to_numpy() for c in table.column_names}
    empty = {"doc_id": np.empty(0, np.int64), "dup_of": np.empty(0, np.int64), "exact": np.empty(0, bool)}
    result = empty
    if cfg.dedup.exact or cfg.dedup.near:
        params = _key_params(cfg)
        ds = _read_clean(work, ["doc_id", "text", "text_hash", "drop_reason"])
        keys = ds.map_batches(_key_rows, batch_format="numpy", fn_kwargs={"params": params}, num_cpus=0.5)
        # Equal keys meet in one block; ~1 partition per 32 MB of key rows keeps blocks whole (see dedup.py).
        num_docs = max(1, _read_clean(work, ["doc_id"]).count())
        partitions = max(2, math.ceil(num_docs * (params["bands"] + 1) * (17 + cfg.dedup.num_perm) / (32 << 20)))
        dups = keys.repartition(partitions, keys=["key"]).map_batches(
            _block_dups, batch_size=None, batch_format="numpy", fn_kwargs={"threshold": cfg.dedup.threshold},
            num_cpus=0.5)
        parts = list(dups.iter_batches(batch_format="numpy", batch_size=None))
        if parts:
            result = {k: np.concatenate([p[k] for p in parts]) for k in ("doc_id", "dup_of", "exact")}
            result = _one_row_per_dup(result)
    buf = io.BytesIO()
    pq.write_table(pa.table(result), buf)
    storage.write_bytes(done, buf.getvalue())
    return result


def _key_params(cfg: DataConfig) -> dict:
    """What `_key_rows` needs from the dedup config, with the LSH banding for its threshold."""
    bands, rows = dedup.lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
    return {"exact": cfg.dedup.exact, "near": cfg.dedup.near, "num_perm": cfg.dedup.num_perm, "seed": cfg.dedup.seed,
            "shingle": cfg.dedup.shingle_words, "bands": bands, "rows": rows}


def _key_rows(batch: dict, params: dict) -> dict:
    """Per document: its exact key (kind 0) and one row per LSH band (kind 1), with the b-bit signature that
    `block_duplicates` verifies near candidates with (a quarter of the full signature's bytes in the shuffle)."""
    a, b = dedup.permutations(params["num_perm"], params["seed"])
    keep = batch["drop_reason"] == ""
    ids = batch["doc_id"][keep].astype(np.int64)
    width, n = params["num_perm"], int(keep.sum())
    keys, doc_ids, kinds, sigs = [], [], [], []
    if params["exact"]:
        keys.append(batch["text_hash"][keep].astype(np.int64)), doc_ids.append(ids)
        kinds.append(np.zeros(n, np.int8)), sigs.append(np.zeros((n, width), np.uint8))
    if params["near"] and n:
        full = dedup.signatures([str(t) for t in batch["text"][keep]], a, b, params["shingle"])
        bands = params["bands"]
        keys.append(dedup.band_keys(full, bands, params["rows"]).reshape(-1)), doc_ids.append(np.repeat(ids, bands))
        kinds.append(np.ones(n * bands, np.int8)), sigs.append(np.repeat(dedup.bbit(full), bands, axis=0))
    if not keys:
        return {"key": np.empty(0, np.int64), "doc_id": np.empty(0, np.int64), "kind": np.empty(0, np.int8),
                "sig": np.empty((0, width), np.uint8)}
    return {"key": np.concatenate(keys), "doc_id": np.concatenate(doc_ids), "kind": np.concatenate(kinds),
            "sig": np.concatenate(sigs)}


def _block_dups(block: dict, threshold: float) -> dict:
    out_ids, out_of, out_exact = [], [], []
    for kind in (0, 1):
        sel = block["kind"] == kind
        if not sel.any():
            continue
        ids, of = dedup.block_duplicates(block["key"][sel], block["doc_id"][sel],
                                         None if kind == 0 else block["sig"][sel], threshold)
        out_ids.append(ids), out_of.append(of), out_exact.append(np.full(ids.shape[0], kind == 0))
    if not out_ids:
        return {"doc_id": np.empty(0, np.int64), "dup_of": np.empty(0, np.int64), "exact": np.empty(0, bool)}
    return {"doc_id": np.concatenate(out_ids), "dup_of": np.concatenate(out_of), "exact": np.concatenate(out_exact)}


def _one_row_per_dup(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A document found by several blocks keeps one row; exact beats near (it is the stronger reason)."""
    order = np.lexsort((~d["exact"], d["doc_id"]))
    d = {k: v[order] for k, v in d.items()}
    keep = np.ones(d["doc_id"].shape[0], dtype=bool)
    keep[1:] = d["doc_id"][1:] != d["doc_id"][:-1]
    return {k: v[keep] for k, v in d.items()}


# ------------------------------------------------------------------------------------------------- tokenizer
def _selected_docs(work: str, dups: dict, val_fraction: float, columns: list[str]):
    """Kept, non-duplicate documents with their split, as a Ray Dataset."""
    ds = _read_clean(work, [*columns, "doc_id", "text_hash", "drop_reason"])
    return ds.map_batches(_select, batch_format="numpy", num_cpus=0.5,
                          fn_kwargs={"dup_ids": dups["doc_id"], "val_fraction": val_fraction})


def _select(batch: dict, dup_ids: np.ndarray, val_fraction: float) -> dict:
    keep = (batch["drop_reason"] == "") & ~np.isin(batch["doc_id"], dup_ids)
    out = {k: v[keep] for k, v in batch.items() if k != "drop_reason"}
    out["split"] = np.asarray([dedup.split_of(int(h), val_fraction) for h in out["text_hash"]], dtype=object)
    return out


def _tokenizer(cfg: DataConfig, tok_cfg: TokenizerConfig, work: str, out: str, dups: dict,
               resumed: list[str], root: str) -> dict:
    from llm_platform.data.dataset import load_tokenizer

    uri = storage.join(out, "tokenizer")
    base: dict[str, Any] = {}
    if tok_cfg.kind == "pretrained":  # the model's own tokenizer: copied unaltered unless tokens are added
        tok, source, added = tokenizers.load_pretrained(tok_cfg, root)
        base = {"source": source, "base_sha256": storage.file_sha256(storage.join(source, "tokenizer.json")),
                "base_vocab_size": len(tok) - len(added), "added": added}
        tokenizers.check_usable(tok, cfg.kind, f"tokenizer.path={tok_cfg.path!r}")
    if storage.exists(storage.join(uri, "tokenizer.json")):
        resumed.append("tokenizer")
        return tokenizers.describe(load_tokenizer(uri), storage.file_sha256(storage.join(uri, "tokenizer.json")),
                                   **base)
    if tok_cfg.kind == "pretrained":
        sha = tokenizers.save(tok, uri, copy_from=None if base["added"] else base["source"])
        return tokenizers.describe(tok, sha, **base)
    else:
        docs = _selected_docs(work, dups, cfg.val_fraction, ["text"])
        total = _read_clean(work, ["doc_id"]).count()  # from parquet metadata: an upper bound on kept docs
        # A deterministic sample (by doc hash), whatever order Ray Data streams the rows in.
        stride = max(1, math.ceil(total / max(1, tok_cfg.max_training_documents)))

        def texts():
            for batch in docs.iter_batches(batch_format="numpy", batch_size=4096):
                chosen = (batch["split"] == "train") & (batch["text_hash"] % stride == 0)
                yield from (str(t) for t in batch["text"][chosen])

        tok = tokenizers.train_bpe(texts(), tok_cfg)
    sha = tokenizers.save(tok, uri)
    return tokenizers.describe(tok, sha)


# ------------------------------------------------------------------------------------------------------ pack
def _num_shards(cfg: DataConfig, inputs: list[dict]) -> dict[str, int]:
    if cfg.num_shards:
        train = cfg.num_shards
    else:
        train = max(1, math.ceil(sum(m["size"] for m in inputs) / SHARD_TARGET_BYTES))
    val = max(1, math.ceil(train * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    return {"train": train, "val": val}


def _pack(cfg: DataConfig, inputs: list[dict], work: str, out: str, dups: dict, tok_record: dict) -> list[dict]:
    counts = _num_shards(cfg, inputs)
    docs = _selected_docs(work, dups, cfg.val_fraction, ["text", "prompt", "response", "messages"])
    docs = docs.map_batches(_shard_key, batch_format="numpy", fn_kwargs={"counts": counts}, num_cpus=0.25)
    params = {"kind": cfg.kind, "seq_len": cfg.seq_len, "target_len": cfg.target_len, "out": out, "work": work,
              "tokenizer_uri": storage.join(out, "tokenizer"), "eos": tok_record["eos_token_id"],
              "pad": tok_record["pad_token_id"], "vocab": tok_record["vocab_size"],
              "batch": cfg.tokenize_batch_size, "storage": storage.settings(), "chat_overflow": cfg.chat_overflow}
    # One group per output shard: map_groups sees a whole shard, so leftovers carry over inside it.
    stats = docs.groupby("shard", num_partitions=max(1, sum(counts.values()))).map_groups(
        _pack_shard, batch_format="pandas", fn_kwargs={"params": params}, num_cpus=0.5)
    return [dict(r) for r in stats.take_all()]


def _shard_key(batch: dict, counts: dict[str, int]) -> dict:
    shard = [f"{s}-{int(h) % max(1, counts[s]):05d}" for s, h in zip(batch["split"], batch["text_hash"])]
    return {**batch, "shard": np.asarray(shard, dtype=object)}


_TOKENIZERS: dict[str, Any] = {}


def _encode(uri: str, texts: list[str]) -> list[list[int]]:
    if uri not in _TOKENIZERS:
        from llm_platform.data.dataset import load_tokenizer

        _TOKENIZERS[uri] = load_tokenizer(uri).backend_tokenizer
    backend = _TOKENIZERS[uri]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _chat_tokenizer(uri: str):
    """The whole tokenizer (chat template included), loaded once per worker process."""
    key = "chat:" + uri
    if key not in _TOKENIZERS:
        from llm_platform.data.dataset import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(uri)
    return _TOKENIZERS[key]


def _pack_shard(df, params: dict):
    with storage.using(params["storage"]):  # the driver's endpoint, not the one this pooled worker started with
        return _pack_one_shard(df, params)


SHARD_ROW_GROUP_ROWS = 256


def _pack_one_shard(df, params: dict):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(df["shard"].iloc[0])
    split, index = name.rsplit("-", 1)
    done = storage.join(params["work"], "shards", f"{name}.json")
    if storage.exists(done):  # resumed run: this shard was written before the interruption
        return pd.DataFrame([{**storage.read_json(done), "resumed": True}])
    df = df.sort_values("doc_id")  # deterministic record order whatever order the shuffle delivered
    uri_rel = f"{split}/part-{index}.parquet"
    token_counts = np.zeros(params["vocab"], dtype=np.int64)
    lengths: list[int] = []
    stat = {"shard": name, "split": split, "file": uri_rel, "documents": len(df), "records": 0, "tokens_in": 0,
            "tokens_out": 0, "remainder": 0, "skipped_prompt_too_long": 0, "chat": {}}
    columns: dict[str, list] = {"input_ids": []}
    packer = pack.Packer(params["seq_len"], params["eos"])
    blocks: list[np.ndarray] = []  # pretrain: (n, seq_len) int32 arrays
    for start in range(0, len(df), params["batch"]):
        chunk = df.iloc[start:start + params["batch"]]
        if params["kind"] == "pretrain":
            ids = _encode(params["tokenizer_uri"], [str(t) for t in chunk["text"]])
            lengths += [len(x) for x in ids]
            blocks.append(packer.add(ids))
            continue
        if params["kind"] == "chat":  # rendered with the tokenizer's chat template, loss on assistant turns
            rows, chat_lengths, chat_counts = chat.pack_chats(
                _chat_tokenizer(params["tokenizer_uri"]), [str(m) for m in chunk["messages"]],
                seq_len=params["seq_len"], pad_id=params["pad"], overflow=params["chat_overflow"])
            lengths += chat_lengths
            stat["tokens_in"] += sum(chat_lengths)
            for key, n in chat_counts.items():
                stat["chat"][key] = stat["chat"].get(key, 0) + n
            for key, value in rows.items():
                columns.setdefault(key, []).extend(value)
            for ids, attended in zip(rows.get("input_ids", []), rows.get("attention_mask", [])):
                token_counts += np.bincount(ids[attended == 1].astype(np.int64),
                                            minlength=params["vocab"])[:params["vocab"]]
            continue
        prompts = _encode(params["tokenizer_uri"], [str(t) for t in chunk["prompt"]])
        responses = _encode(params["tokenizer_uri"], [str(t) for t in chunk["response"]])
        for p, r in zip(prompts, responses):
            lengths.append(len(p))
            token_counts += np.bincount(np.asarray(p + r, dtype=np.int64), minlength=params["vocab"])[:params["vocab"]]
            stat["tokens_in"] += len(p) + len(r) + 1
            rec = (pack.supervised(p, r, params["seq_len"], params["eos"], params["pad"]) if params["kind"] == "sft"
                   else pack.seq2seq(p, r, params["seq_len"], params["target_len"], params["eos"], params["pad"]))
            if isinstance(rec, str):
                stat["skipped_prompt_too_long"] += 1
                continue
            for key, value in rec.items():
                columns.setdefault(key, []).append(value)
    if params["kind"] == "pretrain":
        stat.update(tokens_in=packer.tokens_in, remainder=packer.remainder)
        packed = np.concatenate(blocks) if blocks else np.empty((0, params["seq_len"]), np.int32)
        # The blocks and the remainder hold every document's tokens plus one EOS after each: count them in one
        # pass and take the EOS back out, instead of a bincount per document.
        token_counts = (np.bincount(packed.reshape(-1), minlength=params["vocab"])[:params["vocab"]] +
                        np.bincount(np.asarray(packer.buffer, dtype=np.int64), minlength=params["vocab"])
                        [:params["vocab"]])
        token_counts[params["eos"]] -= len(df)
        columns["input_ids"] = packed
    stat["records"] = len(columns["input_ids"])
    stat["tokens_out"] = stat["records"] * params["seq_len"]
    if stat["records"]:
        table = pa.table({k: _list_column(vals, pa.int8() if k == "attention_mask" else pa.int32())
                          for k, vals in columns.items()})
        buf = io.BytesIO()
        # Small row groups: a training worker reads whole groups, and only those of its own partitions
        # (train/reader.py), so a group is the unit of what it reads beyond its share.
        pq.write_table(table, buf, row_group_size=SHARD_ROW_GROUP_ROWS)
        storage.write_bytes(storage.join(params["out"], uri_rel), buf.getvalue())
    stat["token_counts"] = token_counts.tolist()
    stat["length_hist"] = pack.length_histogram(lengths)
    storage.write_json(done, stat)
    return pd.DataFrame([{**stat, "resumed": False}])


def _list_column(rows, item_type):
    """A list<item_type> column from equal-length rows (a 2-D array or a list of 1-D ones), built from flat
    buffers: a Python list per row cost about as much CPU as the BPE encode of its tokens."""
    import pyarrow as pa

    flat = np.asarray(rows).reshape(len(rows), -1)
    offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1), type=item_type))


# -------------------------------------------------------------------------------------------------- manifest
def _empty_split() -> dict[str, Any]:
    return {"files": [], "num_records": 0, "num_tokens": 0, "documents": 0, "tokens_in": 0, "remainder_tokens": 0,
            "skipped_prompt_too_long": 0, "chat": {}}


def _manifest(cfg, tok, fp, inputs, missing, work, dups, tok_record, shards, timings) -> dict:
    counts: dict[str, Any] = {"files": len(inputs), "records_in": 0, "dropped": {}, "pii_replacements": 0}
    # The sample of skipped records is the first ones by (file, line), not the first ones Ray Data happens to
    # stream back (its block order varies from run to run), so the same inputs always give the same manifest.
    limit = max(0, cfg.max_records_reported - len(missing))
    dropped: list[dict] = []
    for batch in _read_clean(work, ["source", "line", "drop_reason", "detail", "pii_replacements"]).iter_batches(
            batch_format="numpy", batch_size=65536):
        counts["records_in"] += len(batch["drop_reason"])
        counts["pii_replacements"] += int(batch["pii_replacements"].sum())
        reasons, freq = np.unique(batch["drop_reason"][batch["drop_reason"] != ""], return_counts=True)
        for reason, n in zip(reasons, freq):
            counts["dropped"][str(reason)] = counts["dropped"].get(str(reason), 0) + int(n)
        rows = sorted(np.nonzero(batch["drop_reason"] != "")[0], key=lambda i: (batch["source"][i], batch["line"][i]))
        dropped += [{"source": str(batch["source"][i]), "line": int(batch["line"][i]),
                     "reason": str(batch["detail"][i] or batch["drop_reason"][i])} for i in rows[:limit]]
        dropped = sorted(dropped, key=lambda r: (r["source"], r["line"]))[:limit]
    skipped = list(missing) + dropped
    for m in missing:
        reason = m["reason"].split(":")[0]
        counts["dropped"][reason] = counts["dropped"].get(reason, 0) + 1
    counts["exact_duplicates"] = int(dups["exact"].sum())
    counts["near_duplicates"] = int((~dups["exact"]).sum())
    splits: dict[str, dict] = {}
    token_counts = np.zeros(tok_record["vocab_size"], dtype=np.int64)
    hist = np.zeros(len(pack.LENGTH_EDGES) - 1, dtype=np.int64)
    for s in sorted(shards, key=lambda r: r["shard"]):
        split = splits.setdefault(s["split"], _empty_split())
        if s["records"]:
            split["files"].append(s["file"])
        split["num_records"] += int(s["records"])
        split["num_tokens"] += int(s["tokens_out"])
        split["documents"] += int(s["documents"])
        split["tokens_in"] += int(s["tokens_in"])
        split["remainder_tokens"] += int(s["remainder"])
        split["skipped_prompt_too_long"] += int(s["skipped_prompt_too_long"])
        for key, n in (s.get("chat") or {}).items():  # chat: truncated and skipped conversations by reason
            split["chat"][key] = split["chat"].get(key, 0) + int(n)
        if s["split"] == "train":
            token_counts += np.asarray(s["token_counts"], dtype=np.int64)
            hist += np.asarray(s["length_hist"], dtype=np.int64)
    for name in ("train", "val"):
        splits.setdefault(name, _empty_split())
    counts["documents_kept"] = sum(s["documents"] for s in splits.values())
    total = max(1, int(token_counts.sum()))
    return {
        "name": cfg.name, "fingerprint": fp, "format_version": FORMAT_VERSION, "kind": cfg.kind,
        "seq_len": cfg.seq_len, "target_len": cfg.target_len, "tokenizer": tok_record, "splits": splits,
        "counts": counts, "skipped": skipped[: cfg.max_records_reported],
        "inputs": [{k: m[k] for k in ("uri", "size", "marker", "format")} for m in inputs],
        "config": {"data": asdict(cfg), "tokenizer": asdict(tok)},
        "stats": {"token_frequencies": (token_counts / total).tolist(),
                  "doc_length_tokens": {"edges": pack.LENGTH_EDGES, "counts": hist.tolist()}},
        "timings_s": timings, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
