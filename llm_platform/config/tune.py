"""Schema of the `tune` group."""

from dataclasses import dataclass, field
from typing import Any

from llm_platform.config.choices import Mode, TuneScheduler, TuneSearch


@dataclass
class TuneBudgetConfig:
    """What a sweep may spend (tune/budget.py): once its trials together reach a limit, no trial is launched and
    running ones stop at their next checkpoint. Costs use `plan.prices`."""

    max_cost_usd: float | None = None
    """Dollars all trials together may spend; None: no limit."""
    max_gpu_hours: float | None = None
    """GPU-hours all trials together may use; None: no limit."""


@dataclass
class TuneConfig:
    """A Ray Tune sweep over the training stage."""

    name: str = "sweep"
    """Sweep folder `sweeps/<name>/`."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: config key -> distribution spec (loguniform, uniform, choice, randint, grid)."""
    num_samples: int = 4
    """Trials sampled (grid axes multiply it)."""
    metric: str = "val/loss"
    """Metric that ranks trials."""
    mode: Mode = Mode.min
    """min or max."""
    scheduler: TuneScheduler = TuneScheduler.asha
    """asha (early stopping on `metric`), fifo (none) or pbt (losers continue from a winner's checkpoint, mutated)."""
    search: TuneSearch = TuneSearch.random
    """random (and grid axes) or optuna (TPE)."""
    seed: int | None = None
    """Seed of the optuna sampler (None: unseeded)."""
    max_concurrent_trials: int = 2
    """Trials running at once."""
    grace_period: int = 1
    """ASHA: reports (validations or checkpoints) before a trial can be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the best 1/reduction_factor at each rung."""
    perturbation_interval_reports: int = 2
    """PBT: reports (validations or checkpoints) between two exploit/explore decisions of a trial."""
    pbt_synch: bool = False
    """PBT: pause trials at each perturbation until all reach it (reproducible; each pause restarts the run)."""
    max_trial_failures: int = 1
    """Retries of a failing trial before it is recorded as failed."""
    resume: bool = False
    """Resume an interrupted sweep of the same name (finished trials are not rerun)."""
    resume_errored: bool = True
    """On resume, also rerun trials that errored (from their run's latest checkpoint)."""
    verbose: int = 0
    """Ray Tune's own console output: 0 none (a line per trial event instead), 1 its status tables, 2 every
    report."""
    register_as: str | None = None
    """Registry model name for the winner (None uses the model preset name)."""
    budget: TuneBudgetConfig = field(default_factory=TuneBudgetConfig)
    """Spending limits of the whole sweep: `tune.budget.max_cost_usd`, `.max_gpu_hours`."""
