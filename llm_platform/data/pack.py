"""Tokenized documents to training records: fixed-length packed blocks, or padded supervised records, or several
whole supervised records per row. numpy only.

Packing concatenates documents with EOS after each and cuts the stream into `seq_len` blocks. Leftover tokens carry
over from one document batch to the next within a shard; only the shard's final partial block is not written, and
it is reported as the remainder, so tokens in = seq_len * blocks + remainder, exactly.

Packed supervised rows (`data.pack_supervised`, sft and chat): each record is first made as when padded (the same
truncate/skip rules), then its unpadded tokens are placed whole into `seq_len` rows by first-fit-decreasing inside
windows of `PACK_WINDOW_EXAMPLES` consecutive records of a shard (`plan_rows`). A window, not the whole shard: the
rows stay close to document order and the work is bounded; first-fit-decreasing, not greedy in order: on 20,000
log-normal chat lengths (median 150 tokens, sigma 1, seq_len 1024; padded rows are 23% full) greedy fills 82% of a
row, FFD over windows of 64 records 96% and of 256 records 99%. The plan depends only on the shard's records in
document order, so it is the same whatever tasks the stage ran. Each row also carries `position_ids` (0, 1, ...
restarting with every record; the padding at the row's end counts 0, 1, ... as one more run) and `example_ids`
(1, 2, ... the record's place in its row; 0 on padding): training passes `position_ids` to the model, from which
transformers builds the block-diagonal causal mask (models/packing.py); `example_ids` spells the same boundaries
out for other readers (a FlexAttention document mask, varlen `cu_seqlens`). A record's first label is written
-100: nothing in the record predicts it, and in a row the previous record's last token would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100
PACKED_KINDS = ("sft", "chat")  # the dataset kinds `data.pack_supervised` packs
PACKED_COLUMNS = ("position_ids", "example_ids")  # the columns only packed supervised rows have
PACK_WINDOW_EXAMPLES = 256  # records placed together by first-fit-decreasing (see the module docstring)
LENGTH_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 62]


@dataclass
class Packer:
    """Streams token lists into (seq_len,) blocks, carrying leftovers across calls."""

    seq_len: int
    eos_id: int
    buffer: list[int] = field(default_factory=list)
    tokens_in: int = 0

    def add(self, docs: list[list[int]]) -> np.ndarray:
        """Append documents (EOS after each); return the complete blocks, shape (num_blocks, seq_len) int32."""
        for ids in docs:
            self.buffer.extend(ids)
            self.buffer.append(self.eos_id)
            self.tokens_in += len(ids) + 1
        n = len(self.buffer) // self.seq_len
        blocks = np.asarray(self.buffer[: n * self.seq_len], dtype=np.int32).reshape(n, self.seq_len)
        del self.buffer[: n * self.seq_len]
        return blocks

    @property
    def remainder(self) -> int:
        return len(self.buffer)


def supervised(prompt_ids: list[int], response_ids: list[int], seq_len: int, eos_id: int,
               pad_id: int) -> dict[str, np.ndarray] | str:
    """One sft record: prompt + response + EOS, loss only on response and EOS, right-padded to seq_len.

    Returns the record, or a skip reason (`prompt_too_long`) when not one response token fits.
    """
    if len(prompt_ids) >= seq_len - 1:
        return "prompt_too_long"
    response = (response_ids + [eos_id])[: seq_len - len(prompt_ids)]
    ids = prompt_ids + response
    pad = seq_len - len(ids)
    return {
        "input_ids": np.asarray(ids + [pad_id] * pad, dtype=np.int32),
        "labels": np.asarray([IGNORE_INDEX] * len(prompt_ids) + response + [IGNORE_INDEX] * pad, dtype=np.int32),
        "attention_mask": np.asarray([1] * len(ids) + [0] * pad, dtype=np.int8),
    }


def seq2seq(source_ids: list[int], target_ids: list[int], seq_len: int, target_len: int, eos_id: int,
            pad_id: int) -> dict[str, np.ndarray]:
    """One encoder-decoder record: source (+EOS) padded to seq_len; target (+EOS) as labels padded with -100."""
    src = (source_ids[: seq_len - 1] + [eos_id])
    tgt = (target_ids[: target_len - 1] + [eos_id])
    return {
        "input_ids": np.asarray(src + [pad_id] * (seq_len - len(src)), dtype=np.int32),
        "attention_mask": np.asarray([1] * len(src) + [0] * (seq_len - len(src)), dtype=np.int8),
        "labels": np.asarray(tgt + [IGNORE_INDEX] * (target_len - len(tgt)), dtype=np.int32),
    }


def packs(kind: str, pack_supervised: bool) -> bool:
    """Whether a dataset of `kind` is written as packed supervised rows (`data.pack_supervised`: sft and chat)."""
    return bool(pack_supervised) and kind in PACKED_KINDS


def unpadded(records: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Right-padded records (`input_ids`, `labels`, `attention_mask`: one (seq_len,) array each) as flat examples:
    `tokens` and `labels` (int32, concatenated in record order) and `length` (int32, one per record)."""
    masks = records.get("attention_mask", [])
    length = np.fromiter((int(np.count_nonzero(m)) for m in masks), np.int32, len(masks))
    ids = [np.asarray(r[:n], np.int32) for r, n in zip(records.get("input_ids", []), length.tolist())]
    labels = [np.asarray(r[:n], np.int32) for r, n in zip(records.get("labels", []), length.tolist())]
    return {"tokens": np.concatenate(ids) if ids else np.empty(0, np.int32),
            "labels": np.concatenate(labels) if labels else np.empty(0, np.int32), "length": length}


def plan_rows(lengths: list[int], seq_len: int, window: int = PACK_WINDOW_EXAMPLES) -> list[list[int]]:
    """Which records go in each row: first-fit-decreasing inside each window of `window` consecutive records.

    Within a window records are placed longest first (ties: earlier record first), each into the first open row of
    the window with room; rows are numbered in the order they open and close with their window. A row lists its
    records in document order. Every length must be in [1, seq_len].
    """
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        ids = range(start, min(start + window, len(lengths)))
        free = np.empty(0, np.int64)  # room left in each of the window's open rows
        members: list[list[int]] = []
        for i in sorted(ids, key=lambda j: (-lengths[j], j)):
            fits = np.flatnonzero(free >= lengths[i])
            if fits.size:
                free[fits[0]] -= lengths[i]
                members[fits[0]].append(i)
            else:
                free = np.append(free, seq_len - lengths[i])
                members.append([i])
        rows += [sorted(m) for m in members]
    return rows


def pack_examples(tokens: np.ndarray, labels: np.ndarray, lengths: np.ndarray, *, seq_len: int, pad_id: int,
                  window: int = PACK_WINDOW_EXAMPLES) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Whole records into (rows, seq_len) columns `input_ids`, `labels`, `attention_mask`, `position_ids`,
    `example_ids` (see the module docstring), and the counts `examples`, `rows`, `tokens` (not padding).

    Args:
        tokens, labels: the records' tokens and labels, concatenated in document order (`unpadded`).
        lengths: each record's length, 1..seq_len.
    """
    lengths = np.asarray(lengths, np.int64)
    plan = plan_rows(lengths.tolist(), seq_len, window)
    n_rows = len(plan)
    row_of = np.empty(lengths.shape[0], np.int64)
    offset = np.empty(lengths.shape[0], np.int64)
    slot = np.empty(lengths.shape[0], np.int64)
    fill = np.zeros(n_rows, np.int64)
    for r, members in enumerate(plan):
        sizes = lengths[members]
        row_of[members], slot[members] = r, np.arange(1, len(members) + 1)
        offset[members] = np.cumsum(sizes) - sizes
        fill[r] = sizes.sum()
    starts = np.cumsum(lengths) - lengths  # each record's first token in the flat arrays
    within = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)  # token's place in its record
    dest = np.repeat(row_of * seq_len + offset, lengths) + within  # flat index into (rows, seq_len)
    place = np.arange(seq_len)[None, :] - fill[:, None]  # (rows, seq_len): padding counts from 0 past the fill
    columns: dict[str, np.ndarray] = {
        "input_ids": np.full((n_rows, seq_len), pad_id, np.int32),
        "labels": np.full((n_rows, seq_len), IGNORE_INDEX, np.int32),
        "attention_mask": (place < 0).astype(np.int8),
        "position_ids": np.where(place < 0, 0, place).astype(np.int32),
        "example_ids": np.zeros((n_rows, seq_len), np.int32),
    }
    first = labels.astype(np.int32, copy=True)
    first[starts[lengths > 0]] = IGNORE_INDEX  # nothing in the record predicts its first token
    columns["input_ids"].reshape(-1)[dest] = tokens
    columns["labels"].reshape(-1)[dest] = first
    columns["position_ids"].reshape(-1)[dest] = within
    columns["example_ids"].reshape(-1)[dest] = np.repeat(slot, lengths)
    return columns, {"examples": int(lengths.shape[0]), "rows": n_rows, "tokens": int(lengths.sum())}


def packing_summary(examples: int, rows: int, tokens: int, seq_len: int) -> dict[str, float | int]:
    """The manifest's `packing` entry of a split: counts, examples per row and the fill rate (tokens that are not
    padding over rows x seq_len)."""
    return {"examples": examples, "rows": rows, "tokens": tokens,
            "examples_per_row": examples / rows if rows else 0.0,
            "fill_rate": tokens / (rows * seq_len) if rows else 0.0}


def length_histogram(lengths: list[int]) -> list[int]:
    """Counts of document lengths (tokens) in LENGTH_EDGES bins."""
    counts, _ = np.histogram(np.asarray(lengths, dtype=np.int64), bins=np.asarray(LENGTH_EDGES, dtype=np.int64))
    return counts.astype(int).tolist()
