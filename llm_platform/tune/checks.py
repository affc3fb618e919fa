"""The checks a sweep must pass before any trial starts, and the counts they rest on (trials, reports per trial).

Plain Python over the typed tune, train and scaling nodes; each error names the key.
"""

from __future__ import annotations

import logging
from typing import Any

from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError
from llm_platform.train.budget import check_budget
from llm_platform.tune import space as spaces

log = logging.getLogger("llm_platform.tune")


def check(tune_cfg: TuneConfig, train: TrainConfig, scaling: ScalingConfig, dims: list[spaces.Dimension]) -> None:
    """Refuse a sweep that cannot work, before any trial starts, naming the key."""
    import ray

    if tune_cfg.search == "optuna" and any(d.kind == "grid" for d in dims):
        raise ConfigError("tune.search=optuna cannot sample grid axes: use choice instead of grid in tune.space")
    if tune_cfg.scheduler == "pbt":
        from llm_platform.tune import pbt

        ckpt_steps = bound(train, dims, "checkpoint.interval_steps", min)
        pbt.check(tune_cfg, train, dims, reports_per_trial(bound(train, dims, "max_steps", max), ckpt_steps,
                                                           ckpt_steps))
        if tune_cfg.max_concurrent_trials < expected_trials(tune_cfg, dims):
            log.warning("tune.scheduler=pbt with tune.max_concurrent_trials=%d below the %d trials: PBT compares "
                        "trials that run together", tune_cfg.max_concurrent_trials, expected_trials(tune_cfg, dims))

    check_budget(tune_cfg.budget, "tune.budget")
    for key in ("num_samples", "max_concurrent_trials", "grace_period", "reduction_factor"):
        if getattr(tune_cfg, key) < 1:
            raise ConfigError(f"tune.{key}={getattr(tune_cfg, key)} must be at least 1")
    if tune_cfg.scheduler == "asha" and tune_cfg.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor={tune_cfg.reduction_factor} must be at least 2")
    if not tune_cfg.metric.startswith(("val/", "train/")):
        raise ConfigError(f"tune.metric={tune_cfg.metric!r}: trials report train/* and val/* metrics")
    # Every report must carry the metric (Tune refuses a result without it): a checkpoint-only report happens
    # before the first validation when checkpoints come more often than validations.
    eval_steps = bound(train, dims, "eval_interval_steps", max)
    ckpt_steps = bound(train, dims, "checkpoint.interval_steps", min)
    if tune_cfg.metric.startswith("val/") and ckpt_steps < eval_steps and ckpt_steps < bound(train, dims, "max_steps",
                                                                                             min):
        raise ConfigError(f"train.checkpoint.interval_steps={ckpt_steps} is below train.eval_interval_steps="
                          f"{eval_steps}: the first report would have no {tune_cfg.metric} to rank trials by "
                          f"(make the checkpoint interval a multiple of the eval interval)")
    if ray.is_initialized() and scaling.check_resources:
        need = 1 + scaling.num_workers * scaling.cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0)
        if have < need:
            raise ConfigError(f"one trial needs {need:g} CPUs (1 for its driver + scaling.num_workers x "
                              f"scaling.cpus_per_worker); the cluster has {have:g}")
        if have < need * tune_cfg.max_concurrent_trials:
            log.warning("tune.max_concurrent_trials=%d trials need %g CPUs; the cluster has %g: fewer will run at "
                        "once", tune_cfg.max_concurrent_trials, need * tune_cfg.max_concurrent_trials, have)


def bound(train: TrainConfig, dims: list[spaces.Dimension], key: str, pick) -> int:
    """`pick` (min or max) over a train key's values (`key` dotted below `train`, as `checkpoint.interval_steps`):
    the base value, or the space's values when it is tuned."""
    for d in dims:
        if d.key == f"train.{key}":
            return int(pick(d.values))
    node: Any = train
    for part in key.split("."):
        node = getattr(node, part)
    return int(node)


def reports_per_trial(max_steps: int, eval_interval: int, checkpoint_interval: int) -> int:
    """How many times a full run reports (every validation or checkpoint, and at the end): ASHA's `max_t`."""
    return sum(1 for s in range(1, max_steps + 1)
               if s % eval_interval == 0 or s % checkpoint_interval == 0 or s == max_steps)


def expected_trials(tune_cfg: TuneConfig, dims: list[spaces.Dimension]) -> int:
    """Trials of a complete sweep: num_samples times every grid combination."""
    total = tune_cfg.num_samples
    for d in dims:
        if d.kind == "grid":
            total *= len(d.args)
    return total
