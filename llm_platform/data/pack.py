"""Tokenized documents to training records: fixed-length packed blocks, or padded supervised records. numpy only.

Packing concatenates documents with EOS after each and cuts the stream into `seq_len` blocks. Leftover tokens carry
over from one document batch to the next within a shard; only the shard's final partial block is not written, and
it is reported as the remainder, so tokens in = seq_len * blocks + remainder, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100
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


def length_histogram(lengths: list[int]) -> list[int]:
    """Counts of document lengths (tokens) in LENGTH_EDGES bins."""
    counts, _ = np.histogram(np.asarray(lengths, dtype=np.int64), bins=np.asarray(LENGTH_EDGES, dtype=np.int64))
    return counts.astype(int).tolist()
