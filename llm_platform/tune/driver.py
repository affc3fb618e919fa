"""A Ray Tune sweep over the training stage, then the winner into the registry.

    space (YAML) -> Tuner(trial driver function) -> each trial: launch() a Ray Train run, reports -> scheduler
                 -> summary.csv, trials.jsonl, curves.png -> register the winner's export -> sweep.json (last)

Ray Train V2 no longer runs as `Tuner(TorchTrainer(...))`; instead each trial runs `_trial`, a driver function that
builds the trial's config and calls `llm_platform.train.launcher.launch`, whose `TorchTrainer` reports every
training report to Tune through `TuneReportCallback`. The trial's driver holds one CPU on top of its workers.

Each trial trains the run `runs/<sweep>-<trial_id>/`. With ASHA and FIFO, Tune sees no checkpoints in this pattern
(`Result.checkpoint` is empty), so the run and export URIs are derived from that name; a retried or resumed trial
reuses the name and so resumes from its run's latest checkpoint. With PBT (`tune/pbt.py`) every report carries a small
Tune checkpoint pointing at the run's checkpoint; a trial restarted from one (a PBT exploit) trains a new run with
`train.checkpoint.resume_from`, and the trial's last pointer names its final run.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from llm_platform import layout, names, storage
from llm_platform.config import as_dict, from_dict
from llm_platform.config.model import ModelConfig
from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError, StageError
from llm_platform.train.budget import check_budget, has_limits
from llm_platform.tune import space as spaces
from llm_platform.tune.summary import ERROR, FINISHED, STOPPED, TrialRecord, select_winner, write_summary

log = logging.getLogger("llm_platform.tune")
RECORD = "sweep.json"


@dataclass
class SweepResult:
    """A finished sweep: its folder, trials, winner and the registered version."""

    name: str
    uri: str
    trials: list[TrialRecord] = field(default_factory=list)
    winner: TrialRecord | None = None
    model_version: Any = None
    """The registry's ModelVersion of the winner (None when registration was off or no trial finished)."""
    table: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    """The sweep's record (sweep.json)."""


def run_name(sweep_name: str, trial_id: str) -> str:
    """The training run of a trial (`runs/<name>/`)."""
    return f"{sweep_name}-{trial_id}"


def run_sweep(tune_cfg: TuneConfig, model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, dataset_uri: str,
              storage_root: str, *, register: bool = True, callbacks: list | None = None,
              prices: PricesConfig | None = None) -> SweepResult:
    """Run (or resume) the sweep `tune_cfg.name` and register its winner (LATEST is not moved).

    Args:
        tune_cfg: the tune node (space, scheduler, search, concurrency, resume...).
        model, train, scaling: the base config of every trial; the space's keys override it.
        dataset_uri: a finished dataset folder.
        storage_root: the storage root; the sweep lives under `sweeps/<name>/`.
        register: register the winner (under `tune.register_as`, else the model preset's name), without moving
            LATEST: promoting it is the caller's decision.
        callbacks: extra Ray Tune callbacks (progress, tests).
        prices: the price table trials' costs and `tune.budget` are counted in (`plan.prices`); None: the default.

    Raises:
        ConfigError: a bad space, scheduler, search or an existing sweep without `tune.resume=true`.
        StageError: no trial finished.
    """
    from ray import tune

    from llm_platform.tune import budget as tune_budget

    names.check(tune_cfg.name, "tune.name")  # it becomes the folder sweeps/<name>/
    dims = spaces.parse_space(tune_cfg.space)
    check(tune_cfg, train, scaling, dims)
    sweep_uri = layout.sweep(storage_root, tune_cfg.name)
    base = {"model": as_dict(model), "train": {**as_dict(train), "register_as": None}, "scaling": as_dict(scaling)}
    fingerprint = storage.fingerprint({"tune": {k: v for k, v in as_dict(tune_cfg).items() if k != "resume"},
                                       **base, "dataset": dataset_uri})
    record_uri = storage.join(sweep_uri, RECORD)
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        if record.get("fingerprint") == fingerprint:
            log.info("sweep %s already finished with this config; nothing to do", sweep_uri)
            return SweepResult(name=tune_cfg.name, uri=sweep_uri, record=record,
                               table=storage.read_text(storage.join(sweep_uri, "summary.csv")))
        raise ConfigError(f"sweep {sweep_uri} already finished with another config: choose another tune.name")

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, keys=[d.key for d in dims], dataset_uri=dataset_uri,
                             storage_root=storage_root, storage_settings=storage.settings(),
                             sweep={"name": tune_cfg.name, "uri": sweep_uri}, pbt=tune_cfg.scheduler == "pbt",
                             prices=prices),
        {"CPU": 1},  # the trial's driver; its Ray Train workers reserve their own resources
    )
    fs, path = storage.pyarrow_filesystem(sweep_uri)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        if not tune_cfg.resume:
            raise ConfigError(f"sweep {sweep_uri} exists but did not finish: set tune.resume=true to continue it, "
                              f"or choose another tune.name")
        log.info("resuming sweep %s (finished trials are kept)", sweep_uri)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=tune_cfg.resume_errored, storage_filesystem=fs)
    else:
        parent_fs, parent = storage.pyarrow_filesystem(layout.sweeps(storage_root))
        search, stop, concurrency = budgeted(tune_cfg, sweep_uri)
        tuner = tune.Tuner(
            trainable,
            param_space=spaces.to_param_space(dims),
            tune_config=tune.TuneConfig(
                metric=tune_cfg.metric, mode=tune_cfg.mode, num_samples=tune_cfg.num_samples,
                max_concurrent_trials=concurrency, scheduler=make_scheduler(tune_cfg, train, dims),
                search_alg=search, trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=tune_cfg.name, storage_path=parent, storage_filesystem=parent_fs, stop=stop,
                failure_config=tune.FailureConfig(max_failures=tune_cfg.max_trial_failures),
                callbacks=[trial_lines(tune_cfg.metric, [d.key for d in dims], train.max_steps,
                                       expected_trials(tune_cfg, dims)), *(callbacks or [])],
                verbose=tune_cfg.verbose,
            ),
        )
    grid = tuner.fit()

    trials = collect(grid, [d.key for d in dims], tune_cfg.name, storage_root)
    # An interrupted fit (Ctrl+C, SIGUSR1) returns normally; it must not be mistaken for a finished sweep. A sweep
    # whose budget ran out launched fewer trials on purpose: it finishes with the trials it ran.
    expected = expected_trials(tune_cfg, dims)
    done = grid.num_terminated + grid.num_errors
    spent = tune_budget.SweepSpend(tune_cfg.budget, sweep_uri) if has_limits(tune_cfg.budget) else None
    over = spent.reached() if spent else None
    if done < len(grid) or (len(grid) < expected and not over):
        write_summary(sweep_uri, trials, tune_cfg.metric, tune_cfg.mode, None)
        raise StageError(f"sweep {tune_cfg.name!r} was interrupted after {done} of {expected} trials: run it again "
                         f"with tune.resume=true to finish it (finished trials are kept)")
    winner = select_winner(trials, tune_cfg.metric, tune_cfg.mode)
    table = write_summary(sweep_uri, trials, tune_cfg.metric, tune_cfg.mode, winner)
    log.debug("sweep %s:\n%s", sweep_uri, table)  # the command prints the table
    if winner is None:
        why = f": {over}, before any trial finished (raise tune.budget)" if over else ""
        raise StageError(f"no trial of sweep {tune_cfg.name!r} finished{why} "
                         f"(see {storage.join(sweep_uri, 'summary.csv')})")
    version = None
    if register:
        version = register_winner(storage_root, tune_cfg.register_as or model.name, winner, tune_cfg, sweep_uri)
    record = {
        "name": tune_cfg.name, "uri": sweep_uri, "fingerprint": fingerprint,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "metric": tune_cfg.metric, "mode": tune_cfg.mode, "scheduler": tune_cfg.scheduler, "search": tune_cfg.search,
        "trials": {s: sum(t.status == s for t in trials) for s in (FINISHED, STOPPED, ERROR)},
        "iterations": sum(t.iterations for t in trials),
        "winner": {"trial_id": winner.trial_id, "params": winner.params, "value": winner.last(tune_cfg.metric),
                   "run_uri": winner.run_uri, "export_uri": winner.export_uri},
        "model_version": ({"name": version.name, "version": version.version, "uri": version.uri}
                          if version else None),
        "cost": {key: sum(t.last(f"cost/{key}") or 0.0 for t in trials) for key in ("usd", "gpu_hours")},
        "budget": ({"spent": spent.total(), "stopped": over, "trials_launched": len(grid),
                    "trials_planned": expected} if spent else None),
    }
    storage.write_json(record_uri, record)  # the sweep's record, last
    return SweepResult(name=tune_cfg.name, uri=sweep_uri, trials=trials, winner=winner, model_version=version,
                       table=table, record=record)


def trial_lines(metric: str, keys: list[str], max_steps: int, total: int):
    """A Ray Tune callback printing one console line per trial event (started, finished, stopped early, failed), in
    place of Ray Tune's status tables (`tune.verbose=1` brings those back). Built here so that importing this module
    does not import Ray Tune."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self):
            self.done = 0

        def _params(self, trial) -> str:
            return " ".join(f"{k}={_short(v)}" for k, v in spaces.flatten_params(trial.config, keys).items())

        def on_trial_start(self, iteration, trials, trial, **info):
            log.info("trial %s started: %s", trial.trial_id, self._params(trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            last = trial.last_result or {}
            how = "stopped early" if int(last.get("step") or 0) < max_steps else "finished"
            log.info("trial %s %s (%d/%d): %s=%s after %s steps", trial.trial_id, how, self.done, total, metric,
                     _short(last.get(metric)), last.get("step", "?"))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log.warning("trial %s failed (%d/%d): see %s", trial.trial_id, self.done, total,
                        getattr(trial, "error_file", None) or "its error file in the sweep folder")

    return TrialLines()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_name(trial) -> str:
    return trial.trial_id


def _trial(config: dict, *, base: dict, keys: list[str], dataset_uri: str, storage_root: str,
           storage_settings: dict, sweep: dict, pbt: bool = False, prices: PricesConfig | None = None) -> None:
    """One trial's driver (in a Tune actor): the trial's config, then a Ray Train run reporting to Tune.

    With PBT the reports carry pointer checkpoints, and a trial (re)started from one trains a new run from the
    pointed checkpoint (`tune/pbt.py`).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llm_platform.train.launcher import launch

    storage.configure(storage_settings)
    params = spaces.flatten_params(config, keys)
    groups = spaces.apply_params(base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    name = run_name(sweep["name"], trial_id)
    lineage = {"sweep": {**sweep, "trial_id": trial_id, "params": params}}
    if not pbt:
        launch(from_dict(ModelConfig, groups["model"]), from_dict(TrainConfig, groups["train"]),
               from_dict(ScalingConfig, groups["scaling"]), dataset_uri, storage_root, run_name=name,
               callbacks=[TuneReportCallback()], extra_lineage=lineage, prices=prices)
        return
    from llm_platform.tune import pbt as pbt_

    pointer = pbt_.read_pointer(ray.tune.get_checkpoint())
    if pointer and pointer["step"] >= groups["train"]["max_steps"]:
        # Cloned at its last report: the source run has trained this trial's whole budget already.
        log.info("trial %s continues from %s at its last step: nothing left to train", trial_id,
                 pointer["checkpoint_uri"])
        return
    if pointer:
        name = pbt_.resumed_run_name(name, pointer)
        groups["train"]["checkpoint"]["resume_from"] = pointer["checkpoint_uri"]
        log.info("trial %s continues %s's run checkpoint %s as run %s", trial_id, pointer["trial_id"],
                 pointer["checkpoint_uri"], name)
    pbt_.train_reporting_pointers(
        lambda callbacks: launch(from_dict(ModelConfig, groups["model"]), from_dict(TrainConfig, groups["train"]),
                                 from_dict(ScalingConfig, groups["scaling"]), dataset_uri, storage_root,
                                 run_name=name, callbacks=callbacks, extra_lineage=lineage, prices=prices),
        run_uri=layout.run(storage_root, name), run_name=name, trial_id=trial_id)


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


def _saved_params(result) -> dict:
    """The trial folder's `params.json` (what Tune wrote when the trial started), or {}."""
    import json

    try:
        fs = result.filesystem
        with fs.open_input_stream(str(result.path).rstrip("/") + "/params.json") as f:
            return json.loads(f.read())
    except Exception:  # noqa: BLE001 - a missing or unreadable file leaves the params unknown, as before
        return {}


def _reports_frame(result):
    """A trial's reports as a DataFrame: Tune's `metrics_dataframe` (its result.json), or the trial folder's
    progress.csv when that holds more rows. Ray 2.60 rewrites result.json when a paused trial resumes (synchronous
    PBT pauses every trial), losing the earlier reports, while progress.csv keeps them."""
    import io

    import pandas as pd

    df = result.metrics_dataframe
    try:
        with result.filesystem.open_input_stream(str(result.path).rstrip("/") + "/progress.csv") as f:
            progress = pd.read_csv(io.BytesIO(f.read()), dtype={"trial_id": str})
    except Exception:  # noqa: BLE001 - no progress.csv (no report yet): Tune's frame as is
        return df
    return progress if df is None or len(progress) > len(df) else df


def collect(grid, keys: list[str], sweep_name: str, storage_root: str) -> list[TrialRecord]:
    """Tune's ResultGrid as TrialRecords: reports, params, status (finished = the run wrote its lineage)."""
    import math
    import os

    trials = []
    for result in grid:
        trial_id = os.path.basename(str(result.path).rstrip("/"))  # trial_dirname_creator names it by trial id
        df = _reports_frame(result)
        reports = []
        if df is not None and len(df):
            for row in df.to_dict("records"):
                reports.append({k: v for k, v in row.items()
                                if not (isinstance(v, float) and math.isnan(v)) and not k.startswith("config/")})
        run_uri = layout.run(storage_root, final_run_name(result, sweep_name, trial_id))
        export_uri = storage.join(run_uri, "export")
        if result.error is not None:
            status = ERROR
        elif storage.exists(storage.join(run_uri, "lineage.json")) and storage.exists(
                storage.join(export_uri, "config.json")):
            status = FINISHED
        else:
            status = STOPPED
        error = str(result.error).strip().splitlines()[-1][:200] if result.error is not None else None
        params = spaces.flatten_params(result.config or {}, keys)
        if all(v is None for v in params.values()):
            # A restored trial that errored before the restore has no config on its Result; Tune kept its params.json.
            params = spaces.flatten_params(_saved_params(result), keys)
        trials.append(TrialRecord(trial_id=trial_id, params=params,
                                  reports=reports, status=status, error=error, run_uri=run_uri,
                                  export_uri=export_uri if status == FINISHED else None))
    return sorted(trials, key=lambda t: t.trial_id)


def final_run_name(result, sweep_name: str, trial_id: str) -> str:
    """The run a trial trained last: its last PBT pointer's run, else `<sweep>-<trial_id>`."""
    if result.checkpoint is not None:
        from llm_platform.tune.pbt import read_pointer

        try:
            pointer = read_pointer(result.checkpoint)
        except OSError:  # a checkpoint folder that is gone leaves the default name, as without PBT
            pointer = None
        if pointer:
            return pointer["run_name"]
    return run_name(sweep_name, trial_id)


def register_winner(storage_root: str, name: str, winner: TrialRecord, tune_cfg: TuneConfig, sweep_uri: str):
    """Register the winner's export with its run's lineage plus the sweep (name, uri, trial, params, metric).

    LATEST is not moved: the caller promotes (`llm-platform tune` at once; `llm-platform run` only in its promote
    stage, after the winner's evaluation passed its gate), so in a run a regressing winner is never LATEST."""
    from llm_platform import registry

    lineage = dict(storage.read_json(storage.join(winner.run_uri, "lineage.json")))  # type: ignore[arg-type]
    lineage["sweep"] = {"name": tune_cfg.name, "uri": sweep_uri, "trial_id": winner.trial_id,
                        "params": winner.params, "metric": tune_cfg.metric, "mode": tune_cfg.mode,
                        "value": winner.last(tune_cfg.metric)}
    version = registry.register(storage_root, name, winner.export_uri, lineage,  # type: ignore[arg-type]
                                make_latest=False)
    log.info("registered the winner %s as %s %s", winner.trial_id, version.name, version.version)
    return version
