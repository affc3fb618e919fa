"""Tokenize one cleaned unit (a run of input files), no Ray: the first half of the data stage's last pass.

`encode_unit` keeps the unit's documents that are not duplicates, gives each its split and shard by its text hash,
tokenizes them, and writes the tokens bucketed by shard (exchange.py): flat token arrays and lengths for
pretraining, finished padded records for sft, chat, preference and seq2seq (unpadded ones with
`data.pack_supervised`). `shards.pack_shard` then packs each output shard from its buckets (see shards.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_platform import storage
from llm_platform.data import chat, dedup, mixture, pack, pairs
from llm_platform.data.exchange import PartitionedWriter
from llm_platform.data.results import EncodedUnit
from llm_platform.data.shards import COLUMN, EXAMPLE, ShardSpec, read_clean

_FIELDS = {"pretrain": ["text"], "sft": ["prompt", "response"], "seq2seq": ["prompt", "response"],
           "chat": ["messages"], "preference": ["messages"]}
_TOKENIZERS: dict[str, Any] = {}


def _chat_tokenizer(uri: str):
    """The whole HF tokenizer (its chat template included), loaded once per worker process."""
    if uri not in _TOKENIZERS:
        from llm_platform.data.dataset import load_tokenizer

        _TOKENIZERS[uri] = load_tokenizer(uri)
    return _TOKENIZERS[uri]


def _backend(uri: str):
    """The `tokenizers` tokenizer of `tokenizer.json`, loaded once per worker process (what the HF tokenizer's
    `backend_tokenizer` is, without importing transformers: about a CPU-second in every worker process)."""
    key = "backend:" + uri
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[key] = Tokenizer.from_str(storage.read_text(storage.join(uri, "tokenizer.json")))
    return _TOKENIZERS[key]


def encode(uri: str, texts: list[str]) -> list[list[int]]:
    return encode_with(_backend(uri), texts)


def encode_with(backend, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` (no special tokens), without the offsets nobody here reads (`encode_batch_fast`)."""
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in batch(texts, add_special_tokens=False)]


def split_and_shard(hashes: np.ndarray, spec: ShardSpec) -> np.ndarray:
    """Each document's shard as an index into `spec.shard_names()` (by its text hash: stable across runs)."""
    train, val = spec.counts.get("train", 0), spec.counts.get("val", 0)
    out = np.empty(hashes.shape[0], np.int64)
    for i, h in enumerate(hashes.tolist()):
        if dedup.split_of(h, spec.val_fraction) == "val":
            out[i] = train + h % max(1, val)
        else:
            out[i] = h % max(1, train)
    return out


@dataclass
class _Part:
    """One shard's share of an encoded chunk of documents: the arrays and counters written for it, and which of
    the chunk's documents those records are (`rows`) with their token counts (what a mixture counts)."""

    shard: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    rows: np.ndarray
    tokens: list[int]


def encode_unit(name: str, dup_ids: np.ndarray, spec: ShardSpec) -> EncodedUnit:
    """Tokenize one cleaned unit's kept, non-duplicate documents into runs bucketed by shard (`name`: the unit's, as
    `prepare.unit_name` gives it). With a mixture each written record keeps its source, draw bucket and token count
    (`mix:*` arrays) and is counted in the unit's histogram."""
    done = storage.join(spec.work, "tokens", f"{name}.json")
    if storage.exists(done):
        return EncodedUnit.from_json(storage.read_json(done))
    fields = _FIELDS[spec.kind]
    writer = PartitionedWriter(storage.join(spec.work, "tokens", name))
    token_dtype = np.uint16 if spec.vocab <= 1 << 16 else np.int32
    member = spec.membership
    hist = mixture.empty_histogram(len(member.names)) if member else None
    columns = ["doc_id", "text_hash", *fields] + (["language"] if member else [])
    for batch in read_clean(storage.join(spec.work, "clean", f"{name}.parquet"), columns):
        doc_ids = batch.column("doc_id").to_numpy()
        keep = ~np.isin(doc_ids, dup_ids)
        hashes = batch.column("text_hash").to_numpy()[keep]
        shards = split_and_shard(hashes, spec)
        values = {f: np.asarray(batch.column(f).to_pylist(), dtype=object)[keep] for f in fields}
        if member:
            languages = np.asarray(batch.column("language").to_pylist(), dtype=object)[keep].tolist()
            sources, buckets = member.assign(doc_ids[keep], languages), member.buckets(hashes)
        for start in range(0, hashes.shape[0], spec.batch):
            end = start + spec.batch
            chunk = {f: [str(v) for v in values[f][start:end]] for f in fields}
            for part in _encode_chunk(shards[start:end], chunk, spec, token_dtype):
                if hist is not None:
                    _count_mixture(part, hist, sources[start:end], buckets[start:end], spec)
                writer.add(part.shard, part.arrays, part.meta)
    result = EncodedUnit(unit=name, runs=writer.close(), mixture=None if hist is None else mixture.to_record(hist))
    storage.write_json(done, result.to_json())
    return result


def _count_mixture(part: _Part, hist: np.ndarray, sources: np.ndarray, buckets: np.ndarray, spec: ShardSpec
                   ) -> None:
    """Keep each of the part's records' source, bucket and tokens with it, and count them in the unit's `hist`."""
    source, bucket = sources[part.rows], buckets[part.rows]
    counts = np.asarray(part.tokens, np.int64)
    mixture.add(hist, source, 0 if part.shard < spec.counts.get("train", 0) else 1, bucket, counts)
    part.arrays.update({"mix:source": source, "mix:bucket": bucket, "mix:tokens": counts.astype(np.int32)})


def _encode_chunk(shards: np.ndarray, chunk: dict[str, list[str]], spec: ShardSpec, token_dtype) -> list[_Part]:
    """Encode one batch of documents; each shard's share, in document order."""
    if spec.kind == "pretrain":
        return _encode_text(shards, chunk["text"], spec, token_dtype)
    return [_encode_records(int(p), np.nonzero(shards == p)[0], chunk, spec) for p in np.unique(shards)]


def _encode_text(shards: np.ndarray, texts: list[str], spec: ShardSpec, token_dtype) -> list[_Part]:
    """Pretraining: each shard's documents as their lengths and one flat token array."""
    ids = encode(spec.tokenizer_uri, texts)
    sizes = np.fromiter(map(len, ids), np.int64, len(ids))
    # Flattened in C (chain), then each shard's documents cut out of the flat array: a generator over every
    # token cost about a seventh of the encode itself.
    flat = np.fromiter(itertools.chain.from_iterable(ids), token_dtype, int(sizes.sum()))
    ends = np.cumsum(sizes)
    parts = []
    for p in np.unique(shards):
        sel = np.nonzero(shards == p)[0]
        pieces = [flat[e - n:e] for e, n in zip(ends[sel].tolist(), sizes[sel].tolist())]
        arrays = {"length": sizes[sel].astype(np.int32), "tokens": np.concatenate(pieces) if pieces else flat[:0]}
        parts.append(_Part(int(p), arrays, {"documents": len(sel)}, sel, (sizes[sel] + 1).tolist()))  # with its EOS
    return parts


@dataclass
class _Records:
    """A shard's share of a chunk as finished records (sft, seq2seq, chat, preference)."""

    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    """Each document's prompt (sft, seq2seq) or rendered (chat, preference) length."""
    counted: list[np.ndarray] = field(default_factory=list)
    """The tokens whose frequencies the manifest reports."""
    kept: list[int] = field(default_factory=list)
    """Positions (among the shard's documents) of the records written, and their tokens."""
    kept_tokens: list[int] = field(default_factory=list)
    tokens_in: int = 0
    skipped_prompt_too_long: int = 0
    chat: dict[str, int] | None = None


def _encode_records(p: int, sel: np.ndarray, chunk: dict[str, list[str]], spec: ShardSpec) -> _Part:
    if spec.kind == "preference":  # two rows' worth per pair (data/pairs.py), never packed
        found = _preference([chunk["messages"][i] for i in sel], spec)
    elif spec.kind == "chat":
        found = _chat([chunk["messages"][i] for i in sel], spec)
    else:
        found = _prompt_response([chunk["prompt"][i] for i in sel], [chunk["response"][i] for i in sel], spec)
    meta: dict[str, Any] = {"documents": len(sel), "tokens_in": found.tokens_in,
                            "skipped_prompt_too_long": found.skipped_prompt_too_long}
    if found.chat is not None:
        meta["chat"] = found.chat
    if spec.pack_supervised:  # whole records, unpadded: pack_shard places them in rows
        arrays = {EXAMPLE + k: v for k, v in pack.unpadded(found.rows).items()}
    else:
        arrays = {COLUMN + k: np.stack(v) for k, v in found.rows.items()}
    arrays["length"] = np.asarray(found.lengths, np.int32)
    arrays["counted"] = (np.concatenate(found.counted) if found.counted else np.empty(0, np.int64)).astype(np.int64)
    return _Part(p, arrays, meta, sel[found.kept], found.kept_tokens)


def _preference(messages: list[str], spec: ShardSpec) -> _Records:
    rendered = pairs.pack_pairs(_chat_tokenizer(spec.tokenizer_uri), messages, seq_len=spec.seq_len, pad_id=spec.pad)
    found = rendered.columns
    out = _Records(lengths=rendered.lengths, kept=rendered.kept, tokens_in=sum(rendered.lengths), chat=rendered.counts)
    for side in pairs.SIDES:
        for ids, attended in zip(found.get(f"{side}_input_ids", []), found.get(f"{side}_attention_mask", [])):
            out.counted.append(np.asarray(ids)[np.asarray(attended) == 1])
    out.kept_tokens = [sum(int(np.count_nonzero(found[f"{side}_attention_mask"][r])) for side in pairs.SIDES)
                       for r in range(len(out.kept))]
    out.rows = {key: list(value) for key, value in found.items()}
    return out


def _chat(messages: list[str], spec: ShardSpec) -> _Records:
    rendered = chat.pack_chats(_chat_tokenizer(spec.tokenizer_uri), messages, seq_len=spec.seq_len, pad_id=spec.pad,
                               overflow=spec.chat_overflow)
    found = rendered.columns
    out = _Records(lengths=rendered.lengths, kept=rendered.kept, tokens_in=sum(rendered.lengths), chat=rendered.counts)
    for ids, attended in zip(found.get("input_ids", []), found.get("attention_mask", [])):
        out.counted.append(np.asarray(ids)[np.asarray(attended) == 1])
        out.kept_tokens.append(int(out.counted[-1].shape[0]))
    out.rows = {key: list(value) for key, value in found.items()}
    return out


def _prompt_response(prompts: list[str], responses: list[str], spec: ShardSpec) -> _Records:
    """sft and seq2seq: a padded record per pair, or skipped when its prompt leaves no room for the response."""
    out = _Records()
    for j, (p_ids, r_ids) in enumerate(zip(encode(spec.tokenizer_uri, prompts),
                                           encode(spec.tokenizer_uri, responses))):
        out.lengths.append(len(p_ids))
        out.counted.append(np.asarray(p_ids + r_ids, dtype=np.int64))
        out.tokens_in += len(p_ids) + len(r_ids) + 1
        rec = (pack.supervised(p_ids, r_ids, spec.seq_len, spec.eos, spec.pad) if spec.kind == "sft"
               else pack.seq2seq(p_ids, r_ids, spec.seq_len, spec.target_len, spec.eos, spec.pad))
        if isinstance(rec, str):
            out.skipped_prompt_too_long += 1
            continue
        out.kept.append(j)
        out.kept_tokens.append(int(np.count_nonzero(rec["attention_mask"]))  # seq2seq: and its target
                               + (int(np.count_nonzero(rec["labels"] != pack.IGNORE_INDEX))
                                  if spec.kind == "seq2seq" else 0))
        for key, column in rec.items():
            out.rows.setdefault(key, []).append(column)
    return out
