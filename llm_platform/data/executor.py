"""How the data stage runs a phase's tasks: on Ray Data (`ray_tasks`, the stage's one Ray seam) or one after another
in this process (`in_process`, the same task code with no Ray at all: the property tests compare the two).

An executor is `executor(fn, items, *, num_cpus, **kwargs) -> Ran`: `fn(*item, **kwargs)` for every item, the
results in the items' order with the tasks' own CPU and wall seconds. `PhaseRunner` runs the stage's phases through one
and keeps each phase's timings for the manifest.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llm_platform import cluster, storage
from llm_platform.errors import DataError


@dataclass(frozen=True)
class Ran:
    """A phase's task results, in the items' order, with the tasks' own CPU and wall seconds summed (the manifest's
    timings show work against waiting)."""

    values: list[Any]
    cpu_s: float = 0.0
    wall_s: float = 0.0


@dataclass(frozen=True)
class _Outcome:
    """One task's result as it crosses the Ray Data row (pickled into the `result` column): the value, or the
    message of the `DataError` it raised; and its own CPU and wall seconds."""

    error: str | None
    value: Any
    cpu_s: float
    wall_s: float


class Executor(Protocol):
    def __call__(self, fn: Callable[..., Any], items: list[tuple], *, num_cpus: float, **kwargs: Any) -> Ran: ...


def ray_tasks(fn: Callable[..., Any], items: list[tuple], *, num_cpus: float, **kwargs: Any) -> Ran:
    """`fn(*item, **kwargs)` for every item, one Ray Data task each (progress bars, retries, backpressure). Items and
    results travel pickled in a binary column. Each task runs with the driver's storage settings (endpoint, region,
    retries): a pooled worker process serves many stages and runs. A `DataError` raised in a task comes back as a
    value and is raised here as itself, naming the file or record."""
    import ray.data

    if not items:
        return Ran([])
    rows = [{"i": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
    items_ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # On a local Ray (more logical CPUs than cores) a task per core, plus one to cover a task's I/O waits and the
    # end of a phase; more only adds worker processes to start (`cluster.cpu_task_slots`).
    slots = cluster.cpu_task_slots()
    # Ray's annotation of map_batches' fn does not model the extra arguments that fn_kwargs supplies.
    ds = items_ds.map_batches(_call, batch_size=1, num_cpus=num_cpus,  # type: ignore[arg-type]
                              compute=ray.data.TaskPoolStrategy(  # `concurrency=` is deprecated in Ray 2.60
                                  size=None if slots is None else min(len(rows), slots + 1)),
                              fn_kwargs={"fn": fn, "kwargs": kwargs, "settings": storage.settings()})
    outcomes: list[_Outcome] = [_Outcome(None, None, 0.0, 0.0)] * len(items)
    for row in ds.iter_rows():  # a task's DataError is raised as soon as its row arrives
        outcomes[int(row["i"])] = _checked(pickle.loads(row["result"]))
    return _ran(outcomes)


def in_process(fn: Callable[..., Any], items: list[tuple], *, num_cpus: float, **kwargs: Any) -> Ran:
    """`ray_tasks` without Ray: every item's task in turn in this process, through the same pickling and task wrapper
    (a task sees only what it would receive on a worker)."""
    batch = _call({"i": list(range(len(items))), "item": [pickle.dumps(item) for item in items]}, fn,
                  pickle.loads(pickle.dumps(kwargs)), storage.settings())
    return _ran([pickle.loads(r) for r in batch["result"]])


def _checked(outcome: _Outcome) -> _Outcome:
    if outcome.error is not None:
        raise DataError(outcome.error)
    return outcome


def _ran(outcomes: list[_Outcome]) -> Ran:
    """The phase's values, in the items' order; the first task's `DataError`, raised here."""
    outcomes = [_checked(o) for o in outcomes]
    return Ran([o.value for o in outcomes], sum(o.cpu_s for o in outcomes), sum(o.wall_s for o in outcomes))


def _call(batch: dict, fn: Callable[..., Any], kwargs: dict[str, Any], settings: dict[str, Any]) -> dict:
    out = []
    with storage.using(settings), _one_thread_tokenizers():
        for item in batch["item"]:
            start, wall = time.process_time(), time.perf_counter()  # the task's own CPU (with its threads)
            try:
                value = fn(*pickle.loads(item), **kwargs)
                outcome = _Outcome(None, value, time.process_time() - start, time.perf_counter() - wall)
            except DataError as e:
                outcome = _Outcome(str(e), None, 0.0, 0.0)
            out.append(pickle.dumps(outcome))
    return {"i": batch["i"], "result": out}


@contextlib.contextmanager
def _one_thread_tokenizers():
    """`tokenizers` encodes a batch on a thread per core unless told not to: the stage already runs a task per
    core, so in a task its threads only contend (about 15% more CPU for the same encode, measured). Read at each
    call; restored after the task, since a pooled worker process also serves other work."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def parallelism(executor: Executor | None) -> int:
    """How many tasks of a phase run at once: the local instance's task slots (`ray_tasks`), a cluster's CPUs, or 1
    for an in-process executor."""
    if executor is not None:
        return 1
    import ray

    slots = cluster.cpu_task_slots()
    return slots + 1 if slots is not None else max(1, int(ray.cluster_resources().get("CPU", 1)))


def start_ray(connect: Callable[[], Any] | None, progress: bool) -> None:
    """Connect (when `connect` is given) and set Ray Data's progress bars for this stage."""
    import ray.data

    if connect is not None:
        connect()
    ray.data.DataContext.get_current().enable_progress_bars = progress


@dataclass
class PhaseRunner:
    """Runs the stage's tasks through `executor` and records each phase's timings (`timed`): its wall seconds and
    its tasks' own CPU and wall seconds."""

    executor: Executor
    timings: dict[str, float] = field(default_factory=dict)
    _cpu_s: float = 0.0
    _wall_s: float = 0.0

    def tasks(self, fn: Callable[..., Any], items: list[tuple], *, num_cpus: float, **kwargs: Any) -> list[Any]:
        """`fn(*item, **kwargs)` for every item; the results in the items' order."""
        ran = self.executor(fn, items, num_cpus=num_cpus, **kwargs)
        self._cpu_s += ran.cpu_s
        self._wall_s += ran.wall_s
        return ran.values

    def timed(self, phase: str, call: Callable[[], Any]) -> Any:
        """`call()`, timed as `phase`."""
        start, cpu_start, wall_start = time.perf_counter(), self._cpu_s, self._wall_s
        value = call()
        self.timings[f"{phase}_s"] = time.perf_counter() - start
        self.timings[f"{phase}_tasks_cpu_s"] = self._cpu_s - cpu_start
        self.timings[f"{phase}_tasks_wall_s"] = self._wall_s - wall_start
        return value
