"""A sweep's budget (`tune.budget`): once the trials together have spent it, no trial is launched, and each running
trial stops at its next checkpoint.

Every trial's reports carry its run's accumulated `cost/usd` and `cost/gpu_hours` (train/budget.py). `SweepSpend`
adds them up on the driver: per trial the last value, plus what its earlier runs had reached (a PBT trial that
restarts from another's checkpoint starts a new run, whose cost starts again from zero). It is kept in the sweep
folder (`budget.json`) so that a resumed sweep goes on counting.

A Ray Tune seam module (tune/driver.py and tune/schedulers.py import it only when a sweep runs). Two Tune objects
read the spend: `BudgetedSearch` wraps the search algorithm and stops handing out trials, and `BudgetStopper` (the
RunConfig's `stop`) ends a running trial at its next report that carries a checkpoint.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune import Stopper
from ray.tune.search import SearchAlgorithm

from llm_platform import storage
from llm_platform.config.tune import TuneBudgetConfig

log = logging.getLogger("llm_platform.tune")
RECORD = "budget.json"


class SweepSpend:
    """What the sweep's trials have spent so far, and whether the budget is reached."""

    def __init__(self, budget: TuneBudgetConfig, sweep_uri: str):
        self.budget = budget
        self.uri = storage.join(sweep_uri, RECORD)
        self.last: dict[str, dict[str, float]] = {}
        """Per trial: its current run's latest `usd` and `gpu_hours`."""
        self.closed: dict[str, float] = {"usd": 0.0, "gpu_hours": 0.0}
        """What trials' earlier runs had spent (a trial's cost that went down started a new run)."""
        self.announced = False
        self._load()

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": self.budget, "uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:  # a restored sweep: what was spent is in the record
        self.__init__(state["budget"], "")  # type: ignore[misc]
        self.uri = state["uri"]
        self._load()

    def _load(self) -> None:
        if self.uri and storage.exists(self.uri):
            record = storage.read_json(self.uri)
            self.last = record.get("last", {})
            self.closed = record.get("closed", self.closed)

    def add(self, trial_id: str, result: dict[str, Any]) -> None:
        """Take a trial's report into account (reports without cost figures change nothing)."""
        now = {k: _number(result.get(f"cost/{k}")) for k in ("usd", "gpu_hours")}
        if all(v is None for v in now.values()):
            return
        before = self.last.get(trial_id, {})
        if (now["usd"] or 0.0) < before.get("usd", 0.0) or (now["gpu_hours"] or 0.0) < before.get("gpu_hours", 0.0):
            for k in self.closed:
                self.closed[k] += before.get(k, 0.0)
        self.last[trial_id] = {k: v or 0.0 for k, v in now.items()}
        storage.write_json(self.uri, {"last": self.last, "closed": self.closed, "total": self.total(),
                                      "reached": self.reached()})

    def total(self) -> dict[str, float]:
        return {k: self.closed[k] + sum(t.get(k, 0.0) for t in self.last.values()) for k in self.closed}

    def reached(self) -> str | None:
        """Why no more trials may run (naming the key), or None."""
        total = self.total()
        if self.budget.max_cost_usd is not None and total["usd"] >= self.budget.max_cost_usd:
            return (f"the trials have spent ${total['usd']:.4g}, reaching tune.budget.max_cost_usd="
                    f"{self.budget.max_cost_usd:g}")
        if self.budget.max_gpu_hours is not None and total["gpu_hours"] >= self.budget.max_gpu_hours:
            return (f"the trials have used {total['gpu_hours']:.4g} GPU-hours, reaching tune.budget.max_gpu_hours="
                    f"{self.budget.max_gpu_hours:g}")
        return None

    def announce(self) -> str | None:
        """`reached()`, logged once."""
        reason = self.reached()
        if reason and not self.announced:
            self.announced = True
            log.warning("sweep budget: %s; no more trials are launched and running ones stop at their next "
                        "checkpoint", reason)
        return reason


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class BudgetedSearch(SearchAlgorithm):
    """A search algorithm that hands out no trial once the sweep's spend reached its budget; the rest is the
    wrapped algorithm's."""

    def __init__(self, inner: SearchAlgorithm, spend: SweepSpend):
        self.inner = inner
        self.spend = spend

    def __getattr__(self, name):  # everything else (e.g. `searcher`, which Tune inspects) is the inner one's
        if name in ("inner", "spend"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def metric(self):
        return self.inner.metric

    @property
    def total_samples(self):
        return self.inner.total_samples

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments):
        self.inner.add_configurations(experiments)

    def next_trial(self):
        return None if self.spend.announce() else self.inner.next_trial()

    def on_trial_result(self, trial_id: str, result: dict):
        self.spend.add(trial_id, result)
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result:
            self.spend.add(trial_id, result)
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def is_finished(self) -> bool:
        return bool(self.spend.reached()) or self.inner.is_finished()

    def set_finished(self):
        self.inner.set_finished()

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.inner.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs):
        self.inner.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath: str):
        self.inner.restore_from_dir(dirpath)


class BudgetStopper(Stopper):
    """Ends each running trial at its next report that carries a checkpoint with steps left (`budget/can_stop`)
    once the sweep's budget is reached; a trial whose next checkpoint is its last finishes (and is exported)."""

    def __init__(self, spend: SweepSpend):
        self.spend = spend

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.spend.add(trial_id, result)
        return bool(self.spend.announce()) and bool(result.get("budget/can_stop"))

    def stop_all(self) -> bool:
        return False
