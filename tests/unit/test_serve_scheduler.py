"""Admission by the KV-cache block the batch will allocate (llm_platform/serve/scheduler.py), without a model.

The engine's cache is left-padded: every row is as wide as the widest and has room for the longest-to-go, so a batch
allocates rows x (widest + most room). The scheduler must count that block, and the kv_cache buffers are sized from
the very `BatchShape` it admitted. A plain simulation of the engine's loop (prefill joins, decode steps, finished rows
leaving) checks that no admitted batch ever needs more columns than were allocated, and that the allocation never
exceeds the budget, for generated workloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_platform.serve.kv_cache import gathered_layer
from llm_platform.serve.scheduler import BatchShape, Candidate, Scheduler, room_for


def test_a_near_context_prompt_beside_long_generations_is_counted_at_the_block_it_allocates():
    """Issue #24: rows x the longest final length counted 4 x 101 = 404 for one 100-token prompt wanting 1 token
    beside three 1-token prompts wanting 100; the left-padded block is 4 x (100 + 99) = 796, twice that."""
    budget = 404
    scheduler = Scheduler(max_batch_tokens=budget, max_batch_size=8, max_prefill_tokens=4096)
    shorts = [Candidate(prompt_tokens=1, max_tokens=100)] * 3
    long = Candidate(prompt_tokens=100, max_tokens=1)
    count, shape = scheduler.admit(BatchShape(), shorts + [long])
    assert count == 3 and shape == BatchShape(rows=3, width=1, room=99)
    # Two decode steps later the three rows are 3 columns wide with 97 to go; the long prompt would widen them all.
    running = BatchShape.of_running(3, [(100, 3)] * 3)
    assert running == BatchShape(3, 3, 97)
    count, shape = scheduler.admit(running, [long])
    assert count == 0 and shape == running
    assert running.join(BatchShape.of_request(100, 1)).slots == 4 * (100 + 97) > budget
    # Alone (or beside one short row) it fits, and it is admitted the moment it does.
    assert scheduler.admit(BatchShape(), [long]) == (1, BatchShape(1, 100, 0))
    assert scheduler.admit(BatchShape.of_running(3, [(100, 3)]), [long]) == (1, BatchShape(2, 100, 97))


def test_room_is_the_columns_a_sequence_still_feeds_back():
    # Its first token comes from the prefill and its last is never fed back.
    assert room_for(max_tokens=1, generated=0) == 0
    assert room_for(max_tokens=5, generated=0) == 4
    assert room_for(max_tokens=5, generated=1) == 4  # the first token: still to be fed, like the three after it
    assert room_for(max_tokens=5, generated=4) == 1
    assert room_for(max_tokens=0, generated=0) == 0


def test_fits_alone_is_the_request_own_block():
    scheduler = Scheduler(max_batch_tokens=40, max_batch_size=4, max_prefill_tokens=4096)
    assert scheduler.fits_alone(2, 8) and BatchShape.of_request(2, 8).slots == 9
    assert not scheduler.fits_alone(2, 32, n=2)  # 2 x (2 + 31) = 66
    assert scheduler.fits_alone(20, 21, n=1) and not scheduler.fits_alone(20, 22, n=1)  # 40 / 41
    assert not scheduler.fits_alone(1, 1, n=5)  # more rows than the batch holds


def test_admission_is_first_come_first_served_within_rows_and_prefill_tokens():
    scheduler = Scheduler(max_batch_tokens=10_000, max_batch_size=4, max_prefill_tokens=10)
    waiting = [Candidate(8, 4), Candidate(3, 4), Candidate(1, 4)]
    # The first is always let in; the second would take 11 prompt tokens in one prefill; nobody overtakes it.
    assert scheduler.admit(BatchShape(), waiting)[0] == 1
    assert scheduler.admit(BatchShape(), [Candidate(2, 4, n=2), Candidate(1, 4, n=2), Candidate(1, 4)])[0] == 2
    full = BatchShape(4, 5, 3)
    assert scheduler.admit(full, waiting) == (0, full)


def test_the_cache_buffers_are_allocated_at_the_admitted_shape():
    shape = BatchShape(rows=3, width=5, room=4)
    keys = torch.randn(2, 2, 4, 8)  # (rows, heads, columns, head_dim) of a running batch
    layer = gathered_layer([(keys, keys.clone(), None, 0)], shape)
    assert layer.kbuf.shape == (3, 2, 9, 8) and layer.vbuf.shape == (3, 2, 9, 8)
    assert (layer.kbuf.numel() // (2 * 8)) == shape.slots
    assert torch.equal(layer.kbuf[:2, :, 1:5], keys) and not layer.kbuf[:, :, :1].any()  # right-aligned at width


@dataclass
class Row:
    """A sequence in the simulated batch."""

    max_tokens: int
    own: int  # columns of its own in the cache: its prompt, then each token fed back
    generated: int = 0


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 12))
    requests = [(draw(st.integers(1, 60)), draw(st.integers(1, 60)), draw(st.integers(1, 3))) for _ in range(n)]
    alone = max(BatchShape.of_request(*r).slots for r in requests)
    budget = alone + draw(st.integers(0, 3 * alone))
    return requests, budget, draw(st.integers(3, 8)), draw(st.sampled_from([4, 64, 4096]))


@settings(max_examples=300)
@given(workloads())
def test_simulated_batches_never_outgrow_their_buffers_or_the_budget(workload):
    """The engine's loop in miniature: admit (one prefill: each new row gets its first token), else one decode step
    (every row feeds its last token: one more column), and finished rows leave (the cache shrinks to the rows left,
    trimmed to the widest of them). Plainly: every row's columns fit the allocated block at every step."""
    requests, budget, max_rows, prefill = workload
    scheduler = Scheduler(budget, max_rows, prefill)
    waiting = list(requests)
    rows: list[Row] = []
    allocated, admitted_order, steps = BatchShape(), [], 0
    while waiting or rows:
        steps += 1
        assert steps < 10_000
        width = max((r.own for r in rows), default=0)
        running = BatchShape.of_running(width, [(r.max_tokens, r.generated) for r in rows]) if rows else BatchShape()
        count, shape = scheduler.admit(running, [Candidate(*r) for r in waiting])
        if count:
            for prompt, max_tokens, n in waiting[:count]:
                rows += [Row(max_tokens, own=prompt) for _ in range(n)]
            admitted_order += waiting[:count]
            del waiting[:count]
            allocated = shape
            for r in rows:  # the prefill samples each new row's first token; the running rows wait
                r.generated = max(r.generated, 1)
        else:
            assert rows, "nothing runs and the head of the queue is never admitted"
            for r in rows:
                r.own += 1
                r.generated += 1
        assert allocated.slots <= budget and len(rows) == allocated.rows
        # The columns in use, and every row's columns to come, fit the block: no buffer is ever outgrown (kv_cache
        # would concatenate, allocating past what was admitted).
        in_use = max(r.own for r in rows)
        assert all(in_use + (r.max_tokens - r.generated) <= allocated.columns for r in rows)
        left = [r for r in rows if r.generated < r.max_tokens]
        if len(left) != len(rows):
            rows = left
            shrunk = BatchShape.of_running(max((r.own for r in rows), default=0),
                                           [(r.max_tokens, r.generated) for r in rows]) if rows else BatchShape()
            assert shrunk.slots <= allocated.slots  # a shrink never allocates more than was admitted
            allocated = shrunk
    assert admitted_order == requests  # first come, first served; every request ran
