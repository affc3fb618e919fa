"""The data stage's last pass, no Ray: tokenize each cleaned unit (a run of input files), then pack each output shard.

`encode_unit` (one per cleaned unit of input files, prepare.py) keeps the documents that are not duplicates, gives
each its split and shard by its text hash, tokenizes them, and writes the tokens bucketed by shard (exchange.py):
flat token arrays and lengths for pretraining, finished padded records for sft, chat and seq2seq. `pack_shard` (one
per output shard) reads its segment of every unit's runs in file order, which is document order (doc ids are piece
index << 32 | line), so it packs exactly what sorting the shard's documents by id would give, without shuffling
any text or sorting.

    pretrain   documents joined by EOS, cut into seq_len blocks; the last partial block is the remainder
    sft        prompt + response + EOS, loss on the response, padded (pack.supervised)
    seq2seq    source and target padded apart (pack.seq2seq)
    chat       rendered with the tokenizer's chat template, loss on assistant turns (chat.pack_chats)
    sft, chat with `data.pack_supervised`: those records unpadded, then several whole ones per row
               (pack.pack_examples, per shard in document order)
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_platform import storage
from llm_platform.data import chat, dedup, mixture, pack, pairs
from llm_platform.data.exchange import PartitionedWriter, read_partition

SHARD_ROW_GROUP_ROWS = 256
_COLUMN = "col:"  # prefix of the arrays that become parquet columns (in the order they are added)
_EXAMPLE = "ex:"  # prefix of the unpadded records that pack_shard packs (data.pack_supervised)


@dataclass(frozen=True)
class ShardSpec:
    """What the encode and pack calls need (plain values: it pickles to Ray workers as is)."""

    kind: str
    seq_len: int
    target_len: int
    val_fraction: float
    counts: dict[str, int]
    """Output shards per split."""
    tokenizer_uri: str
    eos: int
    pad: int
    vocab: int
    batch: int
    chat_overflow: str
    work: str
    out: str
    pack_supervised: bool = False
    """sft/chat: records go whole, several per row (`pack.pack_examples`), not padded one per row."""
    membership: mixture.Membership | None = None
    """`data.mixture`: each record's source and draw are kept with it, and counted (mixture.py)."""
    plan: mixture.Plan | None = None
    """`data.mixture`: what each source takes, set by the driver before the shards are packed."""

    def shard_names(self) -> list[str]:
        """Every shard's name, in partition order: train-00000 ... then val-00000 ..."""
        return [f"{s}-{i:05d}" for s in ("train", "val") for i in range(self.counts.get(s, 0))]


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


def read_clean(uri: str, columns: list[str]):
    """Record batches of a cleaned file (one parquet row group at a time)."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        yield from pq.ParquetFile(f).iter_batches(columns=columns, batch_size=8192)


def encode_unit(name: str, dup_ids: np.ndarray, spec: ShardSpec) -> dict[str, Any]:
    """Tokenize one cleaned unit's kept, non-duplicate documents into runs bucketed by shard (`name`: the unit's, as
    `prepare.unit_name` gives it)."""
    done = storage.join(spec.work, "tokens", f"{name}.json")
    if storage.exists(done):
        return {**storage.read_json(done), "resumed": True}
    fields = {"pretrain": ["text"], "sft": ["prompt", "response"], "seq2seq": ["prompt", "response"],
              "chat": ["messages"], "preference": ["messages"]}[spec.kind]
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
        draws = None
        if member:
            languages = np.asarray(batch.column("language").to_pylist(), dtype=object)[keep].tolist()
            draws = (member.assign(doc_ids[keep], languages), member.buckets(hashes))
        for start in range(0, hashes.shape[0], spec.batch):
            part = shards[start:start + spec.batch]
            chunk = {f: [str(v) for v in values[f][start:start + spec.batch]] for f in fields}
            mix = None if draws is None or hist is None else (draws[0][start:start + spec.batch],
                                                              draws[1][start:start + spec.batch], hist)
            _encode_chunk(writer, part, chunk, spec, token_dtype, mix)
    runs = writer.close()
    record: dict[str, Any] = {"unit": name, "runs": runs}
    if hist is not None:
        record["mixture"] = mixture.to_record(hist)
    storage.write_json(done, record)
    return {**record, "resumed": False}


def _encode_chunk(writer: PartitionedWriter, shards: np.ndarray, chunk: dict[str, list[str]], spec: ShardSpec,
                  token_dtype, mix: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """Encode one batch of documents and hand each shard its share, in document order. With a mixture (`mix`: the
    documents' sources and draw buckets, and the unit's histogram) each written record keeps its source, bucket and
    token count (`mix:*` arrays), and is counted in the histogram."""
    train_shards = spec.counts.get("train", 0)

    def mixed(arrays: dict[str, np.ndarray], p: int, sel: np.ndarray, kept: list[int], tokens: list[int]) -> None:
        if mix is None:
            return
        source, bucket = mix[0][sel][kept], mix[1][sel][kept]
        counts = np.asarray(tokens, np.int64)
        mixture.add(mix[2], source, 0 if p < train_shards else 1, bucket, counts)
        arrays.update({"mix:source": source, "mix:bucket": bucket, "mix:tokens": counts.astype(np.int32)})

    if spec.kind == "pretrain":
        ids = encode(spec.tokenizer_uri, chunk["text"])
        sizes = np.fromiter(map(len, ids), np.int64, len(ids))
        # Flattened in C (chain), then each shard's documents cut out of the flat array: a generator over every
        # token cost about a seventh of the encode itself.
        flat = np.fromiter(itertools.chain.from_iterable(ids), token_dtype, int(sizes.sum()))
        ends = np.cumsum(sizes)
        for p in np.unique(shards):
            sel = np.nonzero(shards == p)[0]
            pieces = [flat[e - n:e] for e, n in zip(ends[sel].tolist(), sizes[sel].tolist())]
            arrays = {"length": sizes[sel].astype(np.int32),
                      "tokens": np.concatenate(pieces) if pieces else flat[:0]}
            mixed(arrays, int(p), sel, list(range(len(sel))), (sizes[sel] + 1).tolist())  # with its EOS
            writer.add(int(p), arrays, {"documents": len(sel)})
        return
    for p in np.unique(shards):
        sel = np.nonzero(shards == p)[0]
        rows: dict[str, list[np.ndarray]] = {}
        meta: dict[str, Any] = {"documents": len(sel), "tokens_in": 0, "skipped_prompt_too_long": 0}
        lengths: list[int] = []
        counted: list[np.ndarray] = []  # the tokens whose frequencies the manifest reports
        kept: list[int] = []  # positions in `sel` of the records written, and their tokens
        kept_tokens: list[int] = []
        if spec.kind == "preference":  # two rows' worth per pair (data/pairs.py), never packed
            found, lengths, counts = pairs.pack_pairs(_chat_tokenizer(spec.tokenizer_uri),
                                                      [chunk["messages"][i] for i in sel], seq_len=spec.seq_len,
                                                      pad_id=spec.pad, kept=kept)
            meta["tokens_in"], meta["chat"] = sum(lengths), counts
            for side in pairs.SIDES:
                for ids, attended in zip(found.get(f"{side}_input_ids", []), found.get(f"{side}_attention_mask", [])):
                    counted.append(np.asarray(ids)[np.asarray(attended) == 1])
            kept_tokens = [sum(int(np.count_nonzero(found[f"{side}_attention_mask"][r])) for side in pairs.SIDES)
                           for r in range(len(kept))]
            for key, value in found.items():
                rows.setdefault(key, []).extend(value)
        elif spec.kind == "chat":
            found, lengths, counts = chat.pack_chats(_chat_tokenizer(spec.tokenizer_uri),
                                                     [chunk["messages"][i] for i in sel],
                                                     seq_len=spec.seq_len, pad_id=spec.pad,
                                                     overflow=spec.chat_overflow, kept=kept)
            meta["tokens_in"], meta["chat"] = sum(lengths), counts
            for ids, attended in zip(found.get("input_ids", []), found.get("attention_mask", [])):
                counted.append(np.asarray(ids)[np.asarray(attended) == 1])
                kept_tokens.append(int(counted[-1].shape[0]))
            for key, value in found.items():
                rows.setdefault(key, []).extend(value)
        else:
            prompts = encode(spec.tokenizer_uri, [chunk["prompt"][i] for i in sel])
            responses = encode(spec.tokenizer_uri, [chunk["response"][i] for i in sel])
            for j, (p_ids, r_ids) in enumerate(zip(prompts, responses)):
                lengths.append(len(p_ids))
                counted.append(np.asarray(p_ids + r_ids, dtype=np.int64))
                meta["tokens_in"] += len(p_ids) + len(r_ids) + 1
                rec = (pack.supervised(p_ids, r_ids, spec.seq_len, spec.eos, spec.pad) if spec.kind == "sft"
                       else pack.seq2seq(p_ids, r_ids, spec.seq_len, spec.target_len, spec.eos, spec.pad))
                if isinstance(rec, str):
                    meta["skipped_prompt_too_long"] += 1
                    continue
                kept.append(j)
                kept_tokens.append(int(np.count_nonzero(rec["attention_mask"]))  # seq2seq: and its target
                                   + (int(np.count_nonzero(rec["labels"] != pack.IGNORE_INDEX))
                                      if spec.kind == "seq2seq" else 0))
                for key, column in rec.items():
                    rows.setdefault(key, []).append(column)
        if spec.pack_supervised:  # whole records, unpadded: pack_shard places them in rows
            arrays = {_EXAMPLE + k: v for k, v in pack.unpadded(rows).items()}
        else:
            arrays = {_COLUMN + k: np.stack(v) for k, v in rows.items()}
        arrays["length"] = np.asarray(lengths, np.int32)
        arrays["counted"] = (np.concatenate(counted) if counted else np.empty(0, np.int64)).astype(np.int64)
        mixed(arrays, int(p), sel, kept, kept_tokens)
        writer.add(int(p), arrays, meta)


def pack_shard(name: str, segs: list[dict[str, Any]], spec: ShardSpec) -> dict[str, Any]:
    """Write output shard `name` from its segments (in document order); returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split, index = name.rsplit("-", 1)
    done = storage.join(spec.work, "shards", f"{name}.json")
    if storage.exists(done):  # resumed run: this shard was written before the interruption
        return {**storage.read_json(done), "resumed": True}
    cat, meta = read_partition(segs)
    chosen = _mixture_selection(cat, split, spec)
    lengths = cat.get("length", np.empty(0, np.int32))
    uri_rel = f"{split}/part-{index}.parquet"
    stat: dict[str, Any] = {"shard": name, "split": split, "file": uri_rel, "documents": int(meta.get("documents", 0)),
                            "records": 0, "tokens_in": int(meta.get("tokens_in", 0)), "tokens_out": 0, "remainder": 0,
                            "skipped_prompt_too_long": int(meta.get("skipped_prompt_too_long", 0)),
                            "chat": meta.get("chat", {})}
    if spec.kind == "pretrain":
        tokens = cat.get("tokens", np.empty(0, np.int32)).astype(np.int32)
        # The stream: each document's tokens, then EOS (what pack.Packer builds), cut into seq_len blocks.
        stream = np.empty(tokens.shape[0] + lengths.shape[0], np.int32)
        eos_at = np.cumsum(lengths.astype(np.int64) + 1) - 1
        is_eos = np.zeros(stream.shape[0], dtype=bool)
        is_eos[eos_at] = True
        stream[is_eos], stream[~is_eos] = spec.eos, tokens
        blocks = stream.shape[0] // spec.seq_len
        columns = {"input_ids": stream[: blocks * spec.seq_len].reshape(blocks, spec.seq_len)}  # (blocks, seq_len)
        stat.update(tokens_in=int(stream.shape[0]), remainder=int(stream.shape[0] - blocks * spec.seq_len))
        counted = tokens.astype(np.int64)
    else:
        columns = {k[len(_COLUMN):]: v for k, v in cat.items() if k.startswith(_COLUMN)}
        counted = cat.get("counted", np.empty(0, np.int64))
        if spec.pack_supervised:  # several whole records per row, in document order (pack.py's docstring)
            none = np.empty(0, np.int32)
            columns, stat["packing"] = pack.pack_examples(
                cat.get(_EXAMPLE + "tokens", none), cat.get(_EXAMPLE + "labels", none),
                cat.get(_EXAMPLE + "length", none), seq_len=spec.seq_len, pad_id=spec.pad)
    if chosen is not None:  # a mixture: what each source wrote, and the documents and tokens written
        stat["documents"] = int(chosen["idx"].shape[0])
        stat["mixture"] = {str(s): [int(n), int(t)] for s, n, t in _per_source(chosen)}
        if spec.kind != "pretrain":
            stat["tokens_in"] = int(chosen["tokens"].sum())
    stat["records"] = int(len(next(iter(columns.values())))) if columns else 0
    stat["tokens_out"] = stat["records"] * spec.seq_len
    if stat["records"]:
        table = pa.table({k: _list_column(v, pa.int8() if k.endswith("attention_mask") else pa.int32())
                          for k, v in columns.items()})
        buf = io.BytesIO()
        # Small row groups: a training worker reads whole groups, and only those of its own partitions
        # (train/reader.py), so a group is the unit of what it reads beyond its share.
        pq.write_table(table, buf, row_group_size=SHARD_ROW_GROUP_ROWS)
        storage.write_bytes(storage.join(spec.out, uri_rel), buf.getvalue())
        meta = pq.ParquetFile(pa.BufferReader(buf.getbuffer())).metadata
        stat["row_groups"] = row_group_runs([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    stat["token_counts"] = np.bincount(counted, minlength=spec.vocab)[:spec.vocab].tolist()
    stat["length_hist"] = pack.length_histogram(lengths.tolist())
    storage.write_json(done, stat)
    return {**stat, "resumed": False}


def _mixture_selection(cat: dict[str, np.ndarray], split: str, spec: ShardSpec) -> dict[str, np.ndarray] | None:
    """With a mixture plan, keep (and repeat) the shard's records as the plan says, in place in `cat` (records in
    pass order: mixture.order); returns the chosen records' sources and token counts. None without a mixture."""
    if spec.plan is None:
        return None
    source = cat.pop("mix:source", np.empty(0, np.int16))
    bucket = cat.pop("mix:bucket", np.empty(0, np.int16))
    tokens = cat.pop("mix:tokens", np.empty(0, np.int32))
    idx = mixture.order(spec.plan.copies(source, bucket, split))
    if spec.kind == "pretrain":
        lengths = cat.get("length", np.empty(0, np.int32))
        cat["tokens"] = mixture.gather(cat.get("tokens", np.empty(0, np.int32)), lengths, idx)
        cat["length"] = lengths[idx]
    else:
        for key in [k for k in cat if k.startswith(_COLUMN)]:
            cat[key] = cat[key][idx]
        if _EXAMPLE + "length" in cat:
            ex_len = cat[_EXAMPLE + "length"]
            for key in (_EXAMPLE + "tokens", _EXAMPLE + "labels"):
                cat[key] = mixture.gather(cat[key], ex_len, idx)
            cat[_EXAMPLE + "length"] = ex_len[idx]
        # The records' own token counts (unpadded) stand for what the manifest counts: the kept records only.
        cat["length"] = tokens[idx]
        cat["counted"] = _attended_tokens(cat)
    return {"idx": idx, "source": source[idx], "tokens": tokens[idx].astype(np.int64)}


def _per_source(chosen: dict[str, np.ndarray]) -> list[tuple[int, int, int]]:
    """(source, records, tokens) of each source among the chosen records."""
    sources = chosen["source"].astype(np.int64)
    records, tokens = np.bincount(sources), np.bincount(sources, weights=chosen["tokens"])
    return [(s, int(records[s]), int(tokens[s])) for s in np.flatnonzero(records).tolist()]


def _attended_tokens(cat: dict[str, np.ndarray]) -> np.ndarray:
    """The tokens of the chosen records that are not padding (their frequencies go into the manifest)."""
    if _EXAMPLE + "tokens" in cat:
        return cat[_EXAMPLE + "tokens"].astype(np.int64)
    parts = []
    for key in [k for k in cat if k.startswith(_COLUMN) and k.endswith("input_ids")]:
        mask = cat.get(key[:-len("input_ids")] + "attention_mask")
        ids = cat[key]
        parts.append((ids[mask == 1] if mask is not None else ids.reshape(-1)).astype(np.int64))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def row_group_runs(sizes: list[int]) -> list[list[int]]:
    """A file's row-group sizes as [size, count] runs (a shard is 256-row groups and a last smaller one: two runs,
    whatever its length)."""
    runs: list[list[int]] = []
    for n in sizes:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([int(n), 1])
    return runs


def _list_column(rows: np.ndarray, item_type):
    """A list<item_type> column from a (rows, width) array, built from flat buffers (a Python list per row cost
    about as much CPU as the BPE encode of its tokens)."""
    import pyarrow as pa

    flat = np.asarray(rows).reshape(len(rows), -1)
    offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1), type=item_type))
