"""A Ray Tune sweep over the training stage, then the winner into the registry.

    space (YAML) -> Tuner(trial driver function) -> each trial: launch() a Ray Train run, reports -> scheduler
                 -> summary.csv, trials.jsonl, curves.png -> register the winner's export -> sweep.json (last)

Ray Train V2 no longer runs as `Tuner(TorchTrainer(...))`; instead each trial runs `trial.run_trial`, a driver
function that applies the trial's parameters onto the typed base config and calls `train.launcher.launch`, whose
`TorchTrainer` reports every training report to Tune through `TuneReportCallback`. The trial's driver holds one CPU
on top of its workers.

Each trial trains the run `runs/<sweep>-<trial_id>/`. With ASHA and FIFO, Tune sees no checkpoints in this pattern
(`Result.checkpoint` is empty), so the run and export URIs are derived from that name; a retried or resumed trial
reuses the name and so resumes from its run's latest checkpoint. With PBT (`tune/pbt.py`) every report carries a small
Tune checkpoint pointing at the run's checkpoint; a trial restarted from one (a PBT exploit) trains a new run with
`train.checkpoint.resume_from`, and the trial's last pointer names its final run.

The checks before any trial (`checks.py`), the scheduler and search (`schedulers.py`), one trial (`trial.py`) and
reading the results back (`results.py`) live beside this module.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from llm_platform import storage
from llm_platform.config import as_dict
from llm_platform.config.model import ModelConfig
from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError, StageError
from llm_platform.storage import layout, names
from llm_platform.train.budget import has_limits
from llm_platform.tune import space as spaces
from llm_platform.tune.checks import check, expected_trials
from llm_platform.tune.results import collect
from llm_platform.tune.schedulers import budgeted, make_scheduler
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


@dataclass
class SweepSetup:
    """What every trial of one sweep shares: where it runs, what it trains on, and the typed base config."""

    tune: TuneConfig
    base: spaces.TrialConfig
    dims: list[spaces.Dimension]
    dataset_uri: str
    storage_root: str
    uri: str
    prices: PricesConfig | None = None

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]


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
    names.check(tune_cfg.name, "tune.name")  # it becomes the folder sweeps/<name>/
    dims = spaces.parse_space(tune_cfg.space)
    check(tune_cfg, train, scaling, dims)
    setup = SweepSetup(tune=tune_cfg, base=spaces.TrialConfig(model=model, train=train, scaling=scaling), dims=dims,
                       dataset_uri=dataset_uri, storage_root=storage_root,
                       uri=layout.sweep(storage_root, tune_cfg.name), prices=prices)
    fingerprint = sweep_fingerprint(setup)
    done = finished_sweep(setup, fingerprint)
    if done is not None:
        return done
    grid = make_tuner(setup, callbacks).fit()
    trials = collect(grid, setup.keys, tune_cfg.name, storage_root)
    winner, table, budget = settle(setup, grid, trials)
    version = None
    if register:
        version = register_winner(storage_root, tune_cfg.register_as or model.name, winner, tune_cfg, setup.uri)
    record = sweep_record(setup, fingerprint, trials, winner, version, budget)
    storage.write_json(storage.join(setup.uri, RECORD), record)  # the sweep's record, last
    return SweepResult(name=tune_cfg.name, uri=setup.uri, trials=trials, winner=winner, model_version=version,
                       table=table, record=record)


def sweep_fingerprint(setup: SweepSetup) -> str:
    """What decides a sweep's outcome, hashed (sweep.json's `fingerprint`). `train.register_as` is recorded as null:
    trials never register (the sweep registers its winner), and sweeps recorded so must keep their fingerprint."""
    base = setup.base
    return storage.fingerprint({"tune": {k: v for k, v in as_dict(setup.tune).items() if k != "resume"},
                                "model": as_dict(base.model), "train": {**as_dict(base.train), "register_as": None},
                                "scaling": as_dict(base.scaling), "dataset": setup.dataset_uri})


def finished_sweep(setup: SweepSetup, fingerprint: str) -> SweepResult | None:
    """The result of a sweep that already finished with this config; None when there is none.

    Raises:
        ConfigError: the sweep finished with another config.
    """
    record_uri = storage.join(setup.uri, RECORD)
    if not storage.exists(record_uri):
        return None
    record = storage.read_json(record_uri)
    if record.get("fingerprint") != fingerprint:
        raise ConfigError(f"sweep {setup.uri} already finished with another config: choose another tune.name")
    log.info("sweep %s already finished with this config; nothing to do", setup.uri)
    return SweepResult(name=setup.tune.name, uri=setup.uri, record=record,
                       table=storage.read_text(storage.join(setup.uri, "summary.csv")))


def make_tuner(setup: SweepSetup, callbacks: list | None):
    """The Tuner of the sweep: restored from its folder when it started before (with `tune.resume=true`), else new."""
    from ray import tune

    from llm_platform.tune.trial import run_trial

    tune_cfg = setup.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=setup.base, keys=setup.keys, dataset_uri=setup.dataset_uri,
                             storage_root=setup.storage_root, storage_settings=storage.settings(),
                             sweep={"name": tune_cfg.name, "uri": setup.uri}, pbt=tune_cfg.scheduler == "pbt",
                             prices=setup.prices),
        {"CPU": 1},  # the trial's driver; its Ray Train workers reserve their own resources
    )
    fs, path = storage.pyarrow_filesystem(setup.uri)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        if not tune_cfg.resume:
            raise ConfigError(f"sweep {setup.uri} exists but did not finish: set tune.resume=true to continue it, "
                              f"or choose another tune.name")
        log.info("resuming sweep %s (finished trials are kept)", setup.uri)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=tune_cfg.resume_errored, storage_filesystem=fs)
    return new_tuner(setup, trainable, callbacks)


def new_tuner(setup: SweepSetup, trainable, callbacks: list | None):
    """A Tuner for a sweep that has not started: its space, scheduler, search, budget and console lines."""
    from ray import tune

    tune_cfg, train = setup.tune, setup.base.train
    parent_fs, parent = storage.pyarrow_filesystem(layout.sweeps(setup.storage_root))
    search, stop, concurrency = budgeted(tune_cfg, setup.uri)
    return tune.Tuner(
        trainable,
        param_space=spaces.to_param_space(setup.dims),
        tune_config=tune.TuneConfig(
            metric=tune_cfg.metric, mode=tune_cfg.mode, num_samples=tune_cfg.num_samples,
            max_concurrent_trials=concurrency, scheduler=make_scheduler(tune_cfg, train, setup.dims),
            search_alg=search, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=tune_cfg.name, storage_path=parent, storage_filesystem=parent_fs, stop=stop,
            failure_config=tune.FailureConfig(max_failures=tune_cfg.max_trial_failures),
            callbacks=[trial_lines(tune_cfg.metric, setup.keys, train.max_steps,
                                   expected_trials(tune_cfg, setup.dims)), *(callbacks or [])],
            verbose=tune_cfg.verbose,
        ),
    )


def settle(setup: SweepSetup, grid, trials: list[TrialRecord]) -> tuple[TrialRecord, str, dict | None]:
    """(winner, summary table, budget record) of a fitted sweep, its summary written.

    Raises:
        StageError: the fit was interrupted (resume it), or no trial finished.
    """
    from llm_platform.tune import budget as tune_budget

    tune_cfg = setup.tune
    # An interrupted fit (Ctrl+C, SIGUSR1) returns normally; it must not be mistaken for a finished sweep. A sweep
    # whose budget ran out launched fewer trials on purpose: it finishes with the trials it ran.
    expected = expected_trials(tune_cfg, setup.dims)
    done = grid.num_terminated + grid.num_errors
    spent = tune_budget.SweepSpend(tune_cfg.budget, setup.uri) if has_limits(tune_cfg.budget) else None
    over = spent.reached() if spent else None
    if done < len(grid) or (len(grid) < expected and not over):
        write_summary(setup.uri, trials, tune_cfg.metric, tune_cfg.mode, None)
        raise StageError(f"sweep {tune_cfg.name!r} was interrupted after {done} of {expected} trials: run it again "
                         f"with tune.resume=true to finish it (finished trials are kept)")
    winner = select_winner(trials, tune_cfg.metric, tune_cfg.mode)
    table = write_summary(setup.uri, trials, tune_cfg.metric, tune_cfg.mode, winner)
    log.debug("sweep %s:\n%s", setup.uri, table)  # the command prints the table
    if winner is None:
        why = f": {over}, before any trial finished (raise tune.budget)" if over else ""
        raise StageError(f"no trial of sweep {tune_cfg.name!r} finished{why} "
                         f"(see {storage.join(setup.uri, 'summary.csv')})")
    budget = ({"spent": spent.total(), "stopped": over, "trials_launched": len(grid), "trials_planned": expected}
              if spent else None)
    return winner, table, budget


def sweep_record(setup: SweepSetup, fingerprint: str, trials: list[TrialRecord], winner: TrialRecord, version,
                 budget: dict | None) -> dict[str, Any]:
    """sweep.json: the sweep's config fingerprint, trial counts, winner, registered version, cost and budget."""
    tune_cfg = setup.tune
    return {
        "name": tune_cfg.name, "uri": setup.uri, "fingerprint": fingerprint,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "metric": tune_cfg.metric, "mode": tune_cfg.mode, "scheduler": tune_cfg.scheduler, "search": tune_cfg.search,
        "trials": {s: sum(t.status == s for t in trials) for s in (FINISHED, STOPPED, ERROR)},
        "iterations": sum(t.iterations for t in trials),
        "winner": {"trial_id": winner.trial_id, "params": winner.params, "value": winner.last(tune_cfg.metric),
                   "run_uri": winner.run_uri, "export_uri": winner.export_uri},
        "model_version": ({"name": version.name, "version": version.version, "uri": version.uri}
                          if version else None),
        "cost": {key: sum(t.last(f"cost/{key}") or 0.0 for t in trials) for key in ("usd", "gpu_hours")},
        "budget": budget,
    }


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
