"""What the Tuner runs with: the trial scheduler (ASHA, FIFO or PBT), the search algorithm, and `tune.budget`
wrapped around both. Ray Tune is imported inside each function, so importing this module does not import it.
"""

from __future__ import annotations

import logging

from llm_platform.config.train import TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.train.budget import has_limits
from llm_platform.tune import space as spaces
from llm_platform.tune.checks import bound, reports_per_trial

log = logging.getLogger("llm_platform.tune")


def make_scheduler(tune_cfg: TuneConfig, train: TrainConfig, dims: list[spaces.Dimension]):
    """ASHA over training iterations (one per report), FIFO (no early stopping) or PBT (`tune/pbt.py`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tune_cfg.scheduler == "fifo":
        return FIFOScheduler()
    if tune_cfg.scheduler == "pbt":
        from llm_platform.tune import pbt

        return pbt.make_scheduler(tune_cfg, dims)
    reports = reports_per_trial(bound(train, dims, "max_steps", max), bound(train, dims, "eval_interval_steps", min),
                                bound(train, dims, "checkpoint.interval_steps", min))
    if tune_cfg.grace_period >= reports:
        log.warning("tune.grace_period=%d is not below the %d reports of a full trial: ASHA stops nothing",
                    tune_cfg.grace_period, reports)
    # ASHA stops every trial whose time reaches max_t; at the last report that would kill the trial's driver while
    # it exports, so max_t is one beyond the last report and only rungs stop trials.
    return ASHAScheduler(time_attr="training_iteration", max_t=reports + 1,
                         grace_period=min(tune_cfg.grace_period, reports), reduction_factor=tune_cfg.reduction_factor)


def budgeted(tune_cfg: TuneConfig, sweep_uri: str):
    """(search_alg, stopper, max_concurrent_trials) for the Tuner: Tune's own without `tune.budget`; with it the
    search algorithm (its concurrency limit built in) wrapped to launch no trial once the budget is reached, and a
    stopper ending running trials at their next checkpoint (tune/budget.py)."""
    from llm_platform.tune import budget as tune_budget

    search = make_search(tune_cfg)
    if not has_limits(tune_cfg.budget):
        return search, None, tune_cfg.max_concurrent_trials
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

    inner: BasicVariantGenerator | SearchGenerator
    if search is None:
        inner = BasicVariantGenerator(max_concurrent=tune_cfg.max_concurrent_trials)
    else:
        inner = SearchGenerator(ConcurrencyLimiter(search, max_concurrent=tune_cfg.max_concurrent_trials))
    spend = tune_budget.SweepSpend(tune_cfg.budget, sweep_uri)
    return tune_budget.BudgetedSearch(inner, spend), tune_budget.BudgetStopper(spend), None


def make_search(tune_cfg: TuneConfig):
    """None (Tune's random/grid variant generator) or Optuna's TPE sampler."""
    if tune_cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=tune_cfg.seed)
    return None
