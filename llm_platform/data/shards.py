"""Pack each output shard, no Ray: the second half of the data stage's last pass (encode.py tokenizes the units).

`pack_shard` (one per output shard) reads its segment of every unit's runs in file order, which is document order
(doc ids are piece index << 32 | line), so it packs exactly what sorting the shard's documents by id would give,
without shuffling any text or sorting.

    pretrain   documents joined by EOS, cut into seq_len blocks; the last partial block is the remainder
    sft        prompt + response + EOS, loss on the response, padded (pack.supervised)
    seq2seq    source and target padded apart (pack.seq2seq)
    chat       rendered with the tokenizer's chat template, loss on assistant turns (chat.pack_chats)
    sft, chat with `data.pack_supervised`: those records unpadded, then several whole ones per row
               (pack.pack_examples, per shard in document order)
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_platform import storage
from llm_platform.data import mixture, pack
from llm_platform.data.exchange import read_partition
from llm_platform.data.results import ShardResult

SHARD_ROW_GROUP_ROWS = 256
COLUMN = "col:"  # prefix of the arrays that become parquet columns (in the order they are added)
EXAMPLE = "ex:"  # prefix of the unpadded records that pack_shard packs (data.pack_supervised)


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


def read_clean(uri: str, columns: list[str]):
    """Record batches of a cleaned file (one parquet row group at a time)."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        yield from pq.ParquetFile(f).iter_batches(columns=columns, batch_size=8192)


def pack_shard(name: str, segs: list[dict[str, Any]], spec: ShardSpec) -> ShardResult:
    """Write output shard `name` from its segments (in document order); returns its manifest entry."""
    split, index = name.rsplit("-", 1)
    done = storage.join(spec.work, "shards", f"{name}.json")
    if storage.exists(done):  # resumed run: this shard was written before the interruption
        return ShardResult.from_json(storage.read_json(done))
    cat, meta = read_partition(segs)
    chosen = _mixture_selection(cat, split, spec)
    lengths = cat.get("length", np.empty(0, np.int32))
    rows = _pretrain_rows(cat, lengths, spec) if spec.kind == "pretrain" else _record_rows(cat, spec)
    documents = int(meta.get("documents", 0))
    tokens_in = int(meta.get("tokens_in", 0)) if rows.tokens_in is None else rows.tokens_in
    written = None
    if chosen is not None:  # a mixture: what each source wrote, and the documents and tokens written
        documents = int(chosen["idx"].shape[0])
        written = {str(s): [int(n), int(t)] for s, n, t in _per_source(chosen)}
        if spec.kind != "pretrain":
            tokens_in = int(chosen["tokens"].sum())
    records = int(len(next(iter(rows.columns.values())))) if rows.columns else 0
    uri_rel = f"{split}/part-{index}.parquet"
    result = ShardResult(
        shard=name, split=split, file=uri_rel, documents=documents, records=records, tokens_in=tokens_in,
        tokens_out=records * spec.seq_len, remainder=rows.remainder,
        skipped_prompt_too_long=int(meta.get("skipped_prompt_too_long", 0)), chat=meta.get("chat", {}),
        token_counts=np.bincount(rows.counted, minlength=spec.vocab)[:spec.vocab].tolist(),
        length_hist=pack.length_histogram(lengths.tolist()),
        row_groups=_write(rows.columns, storage.join(spec.out, uri_rel)) if records else None,
        packing=rows.packing, mixture=written)
    storage.write_json(done, result.to_json())
    return result


@dataclass(frozen=True)
class _Rows:
    """A shard's rows as parquet columns, and what the manifest counts of them."""

    columns: dict[str, np.ndarray]
    counted: np.ndarray
    """The tokens whose frequencies the manifest reports."""
    tokens_in: int | None = None
    """pretrain: the stream's tokens (documents and their EOS); None: the encode tasks' count stands."""
    remainder: int = 0
    packing: dict[str, int] | None = None


def _pretrain_rows(cat: dict[str, np.ndarray], lengths: np.ndarray, spec: ShardSpec) -> _Rows:
    """The stream: each document's tokens, then EOS (what pack.Packer builds), cut into seq_len blocks."""
    tokens = cat.get("tokens", np.empty(0, np.int32)).astype(np.int32)
    stream = np.empty(tokens.shape[0] + lengths.shape[0], np.int32)
    eos_at = np.cumsum(lengths.astype(np.int64) + 1) - 1
    is_eos = np.zeros(stream.shape[0], dtype=bool)
    is_eos[eos_at] = True
    stream[is_eos], stream[~is_eos] = spec.eos, tokens
    blocks = stream.shape[0] // spec.seq_len
    columns = {"input_ids": stream[: blocks * spec.seq_len].reshape(blocks, spec.seq_len)}  # (blocks, seq_len)
    return _Rows(columns, tokens.astype(np.int64), tokens_in=int(stream.shape[0]),
                 remainder=int(stream.shape[0] - blocks * spec.seq_len))


def _record_rows(cat: dict[str, np.ndarray], spec: ShardSpec) -> _Rows:
    """sft, seq2seq, chat, preference: the records as encoded, or several whole ones per row, in document order
    (`data.pack_supervised`, pack.py's docstring)."""
    columns = {k[len(COLUMN):]: v for k, v in cat.items() if k.startswith(COLUMN)}
    counted = cat.get("counted", np.empty(0, np.int64))
    if not spec.pack_supervised:
        return _Rows(columns, counted)
    none = np.empty(0, np.int32)
    columns, packing = pack.pack_examples(cat.get(EXAMPLE + "tokens", none), cat.get(EXAMPLE + "labels", none),
                                          cat.get(EXAMPLE + "length", none), seq_len=spec.seq_len, pad_id=spec.pad)
    return _Rows(columns, counted, packing=packing)


def _write(columns: dict[str, np.ndarray], uri: str) -> list[list[int]]:
    """Write the shard's parquet file; returns its row groups as [rows, count] runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: _list_column(v, pa.int8() if k.endswith("attention_mask") else pa.int32())
                      for k, v in columns.items()})
    buf = io.BytesIO()
    # Small row groups: a training worker reads whole groups, and only those of its own partitions
    # (train/reader.py), so a group is the unit of what it reads beyond its share.
    pq.write_table(table, buf, row_group_size=SHARD_ROW_GROUP_ROWS)
    storage.write_bytes(uri, buf.getvalue())
    meta = pq.ParquetFile(pa.BufferReader(buf.getbuffer())).metadata
    return row_group_runs([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])


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
        for key in [k for k in cat if k.startswith(COLUMN)]:
            cat[key] = cat[key][idx]
        if EXAMPLE + "length" in cat:
            ex_len = cat[EXAMPLE + "length"]
            for key in (EXAMPLE + "tokens", EXAMPLE + "labels"):
                cat[key] = mixture.gather(cat[key], ex_len, idx)
            cat[EXAMPLE + "length"] = ex_len[idx]
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
    if EXAMPLE + "tokens" in cat:
        return cat[EXAMPLE + "tokens"].astype(np.int64)
    parts = []
    for key in [k for k in cat if k.startswith(COLUMN) and k.endswith("input_ids")]:
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
