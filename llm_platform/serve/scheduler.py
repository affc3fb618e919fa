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

The `Scheduler` owns the queue and the batch as the engine's loop sees them (vLLM's Scheduler): the waiting requests
in arrival order, the running rows in cache-row order, and `allocated`, the block the cache holds now. It never sees a
model or a tensor: a waiting request is anything with a `candidate`, a running row anything with the `Row` fields, so
its tests run on plain records. Nothing is ever preempted: a row is admitted with room for every token it may still
generate, so a running batch only shrinks (vLLM allocates blocks as tokens come and must preempt when they run out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


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


class Waiting(Protocol):
    """A request waiting for the batch (the engine's `Request`)."""

    @property
    def candidate(self) -> Candidate: ...


class Row(Protocol):
    """A running sequence, as admission counts it (the engine's `Seq`)."""

    @property
    def req(self) -> Any: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def generated(self) -> int: ...


W = TypeVar("W", bound=Waiting)
R = TypeVar("R", bound=Row)


def own_columns(row: Row) -> int:
    """Cache columns a running row fills: its prompt, then each token fed back (all but the last it generated)."""
    return row.prompt_tokens + max(row.generated - 1, 0)


class Scheduler(Generic[W, R]):
    """Which waiting requests join the running batch, first come first served, within the batch's limits, and the
    KV-cache block (`allocated`) the batch holds as rows join and leave.

    Args:
        max_batch_tokens: KV-cache budget in token slots (`BatchShape.slots`) of the whole batch.
        max_batch_size: rows (sequences) at most.
        max_prefill_tokens: prompt tokens prefilled in one iteration at most (the first request is always let in).
    """

    def __init__(self, max_batch_tokens: int, max_batch_size: int, max_prefill_tokens: int):
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: list[W] = []
        self.running: list[R] = []
        self.allocated = BatchShape()
        """The block the batch's cache holds now: what admission last granted, or less after rows left."""

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

    # ------------------------------------------------------------------ the queue and the batch
    def add(self, req: W) -> None:
        """Queue a request at the back."""
        self.waiting.append(req)

    def running_shape(self) -> BatchShape:
        """The block the running batch needs now: its rows, the widest row's columns (every row is left-padded to
        it), room for the row with the most to go."""
        return BatchShape.of_running(max((own_columns(r) for r in self.running), default=0),
                                     [(r.max_tokens, r.generated) for r in self.running])

    def schedule(self) -> tuple[list[W], BatchShape]:
        """The waiting requests that join the batch now (taken off the queue's head) and the block the batch then
        needs; the engine prefills them into a cache of that shape and calls `join`."""
        count, shape = self.admit(self.running_shape(), (r.candidate for r in self.waiting))
        admitted = self.waiting[:count]
        del self.waiting[:count]
        return admitted, shape

    def join(self, rows: list[R], shape: BatchShape) -> None:
        """The admitted requests' rows join the batch (after the running ones, in cache-row order) and the cache
        now holds `shape`, the block `schedule` granted."""
        self.running += rows
        self.allocated = shape

    def remove(self, leaves: Callable[[R], bool]) -> tuple[list[int], BatchShape] | None:
        """Take the rows `leaves` picks out of the batch: the cache rows that stay (indices, in order) and the block
        they need, now `allocated` (never more than before: fewer rows, and each step since admission moved a
        column from room to width); None if no row leaves."""
        keep = [i for i, r in enumerate(self.running) if not leaves(r)]
        if len(keep) == len(self.running):
            return None
        self.running = [self.running[i] for i in keep]
        self.allocated = self.running_shape() if self.running else BatchShape()
        return keep, self.allocated

    def cancel(self, req: Any) -> tuple[list[int], BatchShape] | None:
        """Drop a request: off the queue if it waits, its rows out of the batch if it runs (as `remove`)."""
        self.waiting = [r for r in self.waiting if r is not req]
        return self.remove(lambda row: row.req is req)

    def clear(self, waiting_too: bool = False) -> list[W]:
        """Empty the batch (a failed step: its cache may be half built), and the queue when `waiting_too`; returns
        the requests taken off the queue."""
        self.running, self.allocated = [], BatchShape()
        dropped, self.waiting = (self.waiting, []) if waiting_too else ([], self.waiting)
        return dropped
