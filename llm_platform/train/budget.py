"""What a run has spent, and whether it may go on: the cost meter of the training loop and the budget check.

Cost is the placement the run really got, priced by `plan.prices` (llm_platform/costs.py): GPUs x the device's $/hour,
or, for CPU workers, vCPUs x the CPU price, times wall-clock hours since the workers started. What earlier attempts of
the run spent comes back from the checkpoint (`TrainState.spend`), so a resumed run keeps counting where it stopped;
the time between a checkpoint and a crash is not counted again (it is lost work, but not held in the record).

Plain Python, no Ray: the loop calls `CostMeter.spend` after each step and stops at a checkpoint when
`over_budget` names a reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import BudgetConfig
from llm_platform.config.tune import TuneBudgetConfig
from llm_platform.costs import placement_usd_per_hour
from llm_platform.errors import ConfigError

log = logging.getLogger("llm_platform.train")


@dataclasses.dataclass(frozen=True)
class Spend:
    """A run's accumulated use of its placement."""

    hours: float = 0.0
    """Wall-clock hours the workers held their placement."""
    gpu_hours: float = 0.0
    """GPUs x hours."""
    cost_usd: float = 0.0
    """Dollars at the price table's prices (NaN where the device has no price)."""

    def metrics(self) -> dict[str, float]:
        """As logged with the training metrics."""
        return {"cost/usd": self.cost_usd, "cost/gpu_hours": self.gpu_hours, "cost/hours": self.hours}

    def to_json(self) -> dict[str, float | None]:
        """As kept in train_state.json and lineage.json (an unpriced cost as null)."""
        return {k: None if math.isnan(v) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Placement:
    """What the workers hold, priced."""

    device: str
    """The accelerator's name (`NVIDIA H100 80GB HBM3`), or `cpu`."""
    num_gpus: int
    num_cpus: float
    usd_per_hour: float
    """NaN when the table has no price for the device (the run is then not priced)."""

    def describe(self) -> str:
        held = f"{self.num_gpus} x {self.device}" if self.num_gpus else f"{self.num_cpus:g} vCPUs"
        rate = "no price in plan.prices" if math.isnan(self.usd_per_hour) else f"${self.usd_per_hour:.4g}/hour"
        return f"{held} at {rate}"


def price_placement(prices: PricesConfig, *, device: str | None, world: int, cpus_per_worker: float,
                    budget: BudgetConfig) -> Placement:
    """The placement's $/hour: one GPU per worker on `device`, else `world x cpus_per_worker` vCPUs.

    A device without a price leaves the run unpriced (a warning), unless `train.budget.max_cost_usd` is set: a
    dollar budget cannot be kept without a price, so that is an error naming the key to add.
    """
    num_gpus = world if device else 0
    num_cpus = world * cpus_per_worker
    try:
        rate = placement_usd_per_hour(prices, gpu_type=device, num_gpus=num_gpus, num_cpus=num_cpus)
    except ConfigError as e:
        if budget.max_cost_usd is not None:
            raise ConfigError(f"train.budget.max_cost_usd={budget.max_cost_usd} needs a price for this run's "
                              f"device: {e}") from None
        log.warning("the run's cost is not tracked: %s", e)
        rate = float("nan")
    return Placement(device=device or "cpu", num_gpus=num_gpus, num_cpus=num_cpus, usd_per_hour=rate)


class CostMeter:
    """A run's spend so far: what the checkpoint it resumed from had spent, plus this attempt's time since `start`."""

    def __init__(self, placement: Placement, saved: Spend | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.placement = placement
        self.saved = saved or Spend()
        self.clock = clock
        self.start = clock()

    def spend(self) -> Spend:
        hours = max(self.clock() - self.start, 0.0) / 3600.0
        p = self.placement
        return Spend(hours=self.saved.hours + hours, gpu_hours=self.saved.gpu_hours + hours * p.num_gpus,
                     cost_usd=self.saved.cost_usd + hours * p.usd_per_hour)


def over_budget(spend: Spend, budget: BudgetConfig) -> str | None:
    """Why the run must stop (naming the key that limits it), or None while it is within budget."""
    if budget.max_cost_usd is not None and spend.cost_usd >= budget.max_cost_usd:
        return (f"it has spent ${spend.cost_usd:.4g}, reaching train.budget.max_cost_usd={budget.max_cost_usd:g}")
    if budget.max_gpu_hours is not None and spend.gpu_hours >= budget.max_gpu_hours:
        return (f"it has used {spend.gpu_hours:.4g} GPU-hours, reaching train.budget.max_gpu_hours="
                f"{budget.max_gpu_hours:g}")
    return None


def check_budget(budget: BudgetConfig | TuneBudgetConfig, key: str = "train.budget") -> None:
    """Refuse a limit that is not a positive number, naming the key (`train.budget` or `tune.budget`)."""
    for name in ("max_cost_usd", "max_gpu_hours"):
        value = getattr(budget, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}.{name}={value}: give a number > 0, or null for no limit")


def has_limits(budget: BudgetConfig | TuneBudgetConfig) -> bool:
    """A run's or a sweep's budget sets a limit."""
    return budget.max_cost_usd is not None or budget.max_gpu_hours is not None
