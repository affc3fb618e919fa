"""Admission into the running batch by the KV-cache memory the batch will allocate: plain Python, no model, no torch.

The engine's cache is one left-padded block per layer (`kv_cache.py`): every row is as wide as the widest (its prompt
and the tokens fed back so far, right-aligned) plus spare columns for the tokens still to come, enough for the row
with the most to go. So a batch holds rows x (width + room) token slots whatever its rows' own lengths: one
near-context prompt that wants one token beside many one-token prompts that want hundreds makes every row as wide as
the long prompt *and* as roomy as the longest generation, about twice what rows x the longest final length counts.

`BatchShape` is that block. The engine allocates exactly the shape the `Scheduler` admitted (kv_cache.py sizes its
buffers from a `BatchShape`), so what admission counts and what the buffers hold cannot drift apart; and the shape
of a batch only shrinks between admissions (each decode step adds a column and uses one of the room; finished rows
leave), so the budget bounds the cache at every step. A request whose own block is over the budget could never run
(the API answers 400): `Scheduler.fits_alone`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def room_for(max_tokens: int, generated: int) -> int:
    """Cache columns a sequence still adds after its current ones: one for each token it will still feed back.

    Its first token comes from the prefill's logits and its last is never fed back, so a sequence that has generated
    nothing yet adds `max_tokens - 1` columns after its prompt, and one with `generated` tokens (the last of them not
    in the cache yet) adds `max_tokens - generated`.
    """
    return max(0, max_tokens - max(generated, 1))


@dataclass(frozen=True)
class BatchShape:
    """A left-padded KV-cache block: `rows` rows of `width` filled columns plus `room` spare ones (per layer, keys and
    values each (rows, heads, width + room, head_dim))."""

    rows: int = 0
    width: int = 0
    room: int = 0

    @property
    def columns(self) -> int:
        """Columns allocated per row."""
        return self.width + self.room

    @property
    def slots(self) -> int:
        """Token slots the block holds (x the model's KV bytes per token: its bytes)."""
        return self.rows * self.columns

    def join(self, other: BatchShape) -> BatchShape:
        """The block of both batches' rows together: the widest width, the largest room."""
        return BatchShape(self.rows + other.rows, max(self.width, other.width), max(self.room, other.room))

    @classmethod
    def of_request(cls, prompt_tokens: int, max_tokens: int, n: int = 1) -> BatchShape:
        """The block of a request not yet prefilled: `n` rows of its prompt, room for `max_tokens` each."""
        return cls(n, prompt_tokens, room_for(max_tokens, 0))

    @classmethod
    def of_running(cls, width: int, rows: Iterable[tuple[int, int]]) -> BatchShape:
        """The block a running batch needs now: `width` columns (its padding mask's) and room for the row with the
        most to go; `rows` is each row's (max_tokens, tokens generated)."""
        rooms = [room_for(max_tokens, generated) for max_tokens, generated in rows]
        return cls(len(rooms), width if rooms else 0, max(rooms, default=0))


@dataclass(frozen=True)
class Candidate:
    """What admission needs of a waiting request."""

    prompt_tokens: int
    max_tokens: int
    n: int = 1


class Scheduler:
    """Which waiting requests join the running batch, first come first served, within the batch's limits.

    Args:
        max_batch_tokens: KV-cache budget in token slots (`BatchShape.slots`) of the whole batch.
        max_batch_size: rows (sequences) at most.
        max_prefill_tokens: prompt tokens prefilled in one iteration at most (the first request is always let in).
    """

    def __init__(self, max_batch_tokens: int, max_batch_size: int, max_prefill_tokens: int):
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.max_prefill_tokens = max_prefill_tokens

    def fits_alone(self, prompt_tokens: int, max_tokens: int, n: int = 1) -> bool:
        """Whether the request could ever run: its own block, in an empty batch, within the budget and batch size."""
        shape = BatchShape.of_request(prompt_tokens, max_tokens, n)
        return n <= self.max_batch_size and shape.slots <= self.max_batch_tokens

    def admit(self, running: BatchShape, waiting: Iterable[Candidate]) -> tuple[int, BatchShape]:
        """How many of `waiting` (from its head; the first that does not fit stops the rest, so nobody is overtaken)
        join the batch whose block is `running`, and the block the batch then needs: what the engine allocates."""
        shape, count, prefill = running, 0, self.max_prefill_tokens
        for c in waiting:
            if shape.rows + c.n > self.max_batch_size:
                break
            if count and c.prompt_tokens * c.n > prefill:
                break  # the next iteration prefills it; the running rows decode meanwhile
            joined = shape.join(BatchShape.of_request(c.prompt_tokens, c.max_tokens, c.n))
            if joined.slots > self.max_batch_tokens:
                break  # it waits until finished rows make room (one that never could fit was refused at submit)
            shape, count, prefill = joined, count + 1, prefill - c.prompt_tokens * c.n
        return count, shape
