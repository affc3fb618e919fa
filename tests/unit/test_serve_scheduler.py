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


# ------------------------------------------------------------------------------------------------ the scheduler's state
@dataclass(eq=False)
class Req:
    """A waiting request as the scheduler sees it (the engine's `Request` has the same `candidate`)."""

    prompt: int
    max_tokens: int
    n: int = 1

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.prompt, self.max_tokens, self.n)


@dataclass(eq=False)
class Seq:
    """A running row as the scheduler sees it (the engine's `Seq` has the same fields)."""

    req: Req
    generated: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.req.prompt

    @property
    def max_tokens(self) -> int:
        return self.req.max_tokens


def rows_of(reqs: list[Req]) -> list[Seq]:
    return [Seq(r) for r in reqs for _ in range(r.n)]


def test_schedule_takes_the_admitted_off_the_queue_and_join_allocates_the_granted_block():
    scheduler = Scheduler(max_batch_tokens=60, max_batch_size=8, max_prefill_tokens=4096)
    a, b, c = Req(4, 6), Req(2, 3, n=2), Req(10, 20)
    for r in (a, b, c):
        scheduler.add(r)
    admitted, shape = scheduler.schedule()
    # a and b: 3 rows x (4 wide + 5 to go) = 27; c would make it 4 x (10 + 19) = 116 > 60.
    assert admitted == [a, b] and shape == BatchShape(3, 4, 5) and scheduler.waiting == [c]
    assert scheduler.allocated == BatchShape()  # nothing is held until the rows join
    rows = rows_of(admitted)
    scheduler.join(rows, shape)
    assert scheduler.running == rows and scheduler.allocated == shape
    assert scheduler.schedule() == ([], scheduler.running_shape())  # c still does not fit beside them


def test_finishing_frees_the_rows_memory_and_lets_the_next_request_in():
    scheduler = Scheduler(max_batch_tokens=60, max_batch_size=8, max_prefill_tokens=4096)
    a, b, c = Req(4, 6), Req(2, 3, n=2), Req(10, 20)
    for r in (a, b, c):
        scheduler.add(r)
    admitted, shape = scheduler.schedule()
    scheduler.join(rows_of(admitted), shape)
    for s in scheduler.running:  # the prefill's token, then two decode steps
        s.generated = 3
    assert scheduler.schedule()[0] == []  # c: 4 x (10 + 19) = 116 > 60 beside the three rows
    kept, smaller = scheduler.remove(lambda s: s.req is b)  # b's rows reached max_tokens
    assert kept == [0] and scheduler.running[0].req is a
    assert smaller == scheduler.allocated == BatchShape(1, 6, 3) and smaller.slots < shape.slots
    assert scheduler.remove(lambda s: s.req is b) is None  # nothing left to remove: nothing changes
    # Beside a and b, c needed 4 x (10 + 19) = 116; beside a alone, 2 x (10 + 19) = 58 <= 60: it joins now.
    assert scheduler.schedule() == ([c], BatchShape(2, 10, 19)) and scheduler.waiting == []


def test_cancel_drops_a_waiting_request_or_a_running_one_rows():
    scheduler = Scheduler(max_batch_tokens=1000, max_batch_size=2, max_prefill_tokens=4096)
    a, b, c = Req(3, 4, n=2), Req(2, 2), Req(1, 2)
    for r in (a, b, c):
        scheduler.add(r)
    admitted, shape = scheduler.schedule()
    assert admitted == [a]  # two rows: the batch is full
    scheduler.join(rows_of(admitted), shape)
    assert scheduler.cancel(b) is None and scheduler.waiting == [c]  # waiting: off the queue, the batch unchanged
    assert scheduler.cancel(a) == ([], BatchShape()) and scheduler.allocated.slots == 0  # running: its rows go
    assert scheduler.schedule()[0] == [c]  # and the next in line gets the room


def test_clear_empties_the_batch_and_the_queue_only_when_asked():
    scheduler = Scheduler(max_batch_tokens=1000, max_batch_size=1, max_prefill_tokens=4096)
    a, b = Req(3, 4), Req(2, 2)
    scheduler.add(a)
    scheduler.add(b)
    admitted, shape = scheduler.schedule()
    scheduler.join(rows_of(admitted), shape)
    assert scheduler.clear() == [] and scheduler.running == [] and scheduler.allocated == BatchShape()
    assert scheduler.waiting == [b]
    assert scheduler.clear(waiting_too=True) == [b] and scheduler.waiting == []


# ------------------------------------------------------------------------------------------------ against a reference
def plain_block(rows: list[tuple[int, int, int]]) -> int:
    """Token slots a left-padded batch of `rows` ((prompt, max_tokens, generated)) holds, counted plainly: every
    row as wide as the widest filled row (its prompt and the tokens fed back, all but the last generated) plus
    room for the row with the most tokens still to feed back (its first comes from the prefill, its last is never
    fed back)."""
    if not rows:
        return 0
    width = max(p + max(g - 1, 0) for p, _, g in rows)
    room = max(max(0, m - max(g, 1)) for _, m, g in rows)
    return len(rows) * (width + room)


def plain_admit(running: list[tuple[int, int, int]], waiting: list[tuple[int, int, int]], budget: int,
                max_rows: int, max_prefill: int) -> int:
    """How many of `waiting` ((prompt, max_tokens, n)) join, plainly: from the head, while the rows, the prompt
    tokens of one prefill (the first always goes) and the block all fit; the first that does not stops the rest."""
    rows, count, prefill = list(running), 0, max_prefill
    for p, m, n in waiting:
        trial = rows + [(p, m, 0)] * n
        if len(trial) > max_rows or (count and p * n > prefill) or plain_block(trial) > budget:
            break
        rows, count, prefill = trial, count + 1, prefill - p * n
    return count


@st.composite
def scripts(draw):
    """Arrivals, engine iterations, sequences ending early (EOS, a stop string) and cancellations, interleaved."""
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("arrive"), st.integers(1, 40), st.integers(1, 40), st.integers(1, 3)),
        st.tuples(st.just("step")), st.tuples(st.just("step")),
        st.tuples(st.just("end"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 50))), min_size=1, max_size=60))
    alone = max([BatchShape.of_request(p, m, n).slots for op, *args in ops if op == "arrive" for p, m, n in [args]],
                default=1)
    return ops, alone + draw(st.integers(0, 3 * alone)), draw(st.integers(3, 8)), draw(st.sampled_from([4, 64, 4096]))


def running_tuples(scheduler) -> list[tuple[int, int, int]]:
    return [(s.prompt_tokens, s.max_tokens, s.generated) for s in scheduler.running]


@settings(max_examples=300)
@given(scripts())
def test_the_scheduler_admits_and_frees_as_a_plain_reference_counts(script):
    """Admission by the KV budget, first come first served, and finishing freeing memory, against `plain_block` and
    `plain_admit`: whatever arrives, runs, ends early or is cancelled, the scheduler admits what the reference
    admits, `allocated` is the reference's block whenever the batch changes and never exceeds the budget, and every
    request that was not cancelled runs, in arrival order."""
    ops, budget, max_rows, max_prefill = script
    scheduler: Scheduler[Req, Seq] = Scheduler(budget, max_rows, max_prefill)
    arrived: list[Req] = []
    started: list[Req] = []
    cancelled: set[int] = set()

    def step() -> None:
        waiting = [(r.prompt, r.max_tokens, r.n) for r in scheduler.waiting]
        want = plain_admit(running_tuples(scheduler), waiting, budget, max_rows, max_prefill)
        admitted, shape = scheduler.schedule()
        assert len(admitted) == want
        if admitted:
            rows = rows_of(admitted)
            scheduler.join(rows, shape)
            assert scheduler.allocated.slots == plain_block(running_tuples(scheduler)) <= budget
            started.extend(admitted)
            for s in rows:  # the prefill's token
                s.generated = 1
        else:
            assert scheduler.running or not scheduler.waiting, "the head of the queue never runs"
            for s in scheduler.running:
                s.generated += 1
        # The batch never outgrows what was granted: its block now fits inside the allocated one.
        assert plain_block(running_tuples(scheduler)) <= scheduler.allocated.slots
        leave(lambda s: s.generated >= s.max_tokens)

    def leave(which) -> None:
        before = scheduler.allocated.slots
        if scheduler.remove(which) is not None:
            assert scheduler.allocated.slots == plain_block(running_tuples(scheduler)) <= before

    for op, *args in ops:
        if op == "arrive":
            req = Req(*args)
            if scheduler.fits_alone(req.prompt, req.max_tokens, req.n):  # the engine refuses the rest at submit
                arrived.append(req)
                scheduler.add(req)
        elif op == "step":
            step()
        elif op == "end" and scheduler.running:
            row = scheduler.running[args[0] % len(scheduler.running)]
            leave(lambda s, row=row: s is row)
        elif op == "cancel" and arrived:
            req = arrived[args[0] % len(arrived)]
            cancelled.add(id(req))
            before = scheduler.allocated.slots
            scheduler.cancel(req)
            assert req not in scheduler.waiting and all(s.req is not req for s in scheduler.running)
            assert scheduler.allocated.slots == plain_block(running_tuples(scheduler)) <= before
    for _ in range(10_000):
        if not (scheduler.waiting or scheduler.running):
            break
        step()
    assert scheduler.allocated == BatchShape() and scheduler.allocated.slots == 0  # all finished: nothing held
    # First come, first served: the requests ran in the order they arrived, all but those cancelled while waiting.
    assert [id(r) for r in started] == [id(r) for r in arrived if id(r) not in cancelled or r in started]
