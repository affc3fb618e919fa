"""The stages of `llm-platform run` as records: a name, a done-check and a run, each returning a typed result.

    data -> train (or tune) -> register -> eval -> promote -> serve

`runner.run_all` walks `PIPELINE` in order. For each selected stage it asks `done` first (the stored output for the
same inputs and config, which the summary shows as `skipped`) and calls `run` only when that gives nothing. A stage
reads the results of the stages before it from the typed `RunContext`, never from a dict of names; a stage that the
slice left out has no result there, so it reads the previous stage's output from storage, as if it ran alone.

The data and train stages have no done-check of their own: `build_dataset` and `launch` fingerprint their inputs and
reuse a finished output themselves (their result says so). Promotion is a stage like the others, and the only one
that moves LATEST; see `runner/promotion.py` for when a stored evaluation lets it.

How to add a stage: add its name to `config.choices.Stage`, write a result dataclass (a `StageResult`) and its
`run` (and `done`, if its output can be found without running it), add a field for the result to `RunContext` and
the record to `PIPELINE` in its place.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llm_platform import registry, storage
from llm_platform.config import PlatformConfig
from llm_platform.config.choices import Choice, Stage
from llm_platform.errors import StageError
from llm_platform.runner.promotion import (
    Verdict,
    eval_folder,
    gate_failed,
    latest_version,
    not_promoted,
    stored_verdict,
)

if TYPE_CHECKING:
    from llm_platform.train.launcher import TrainResult
    from llm_platform.tune.driver import SweepResult

log = logging.getLogger("llm_platform.run")


class Outcome(Choice):
    """A stage's row in the summary: it ran, its stored output was reused, or (promote, unselected) it was held."""

    ran = "ran"
    skipped = "skipped"
    held = "held"


@dataclass(frozen=True)
class StageResult:
    """What every stage reports: whether it ran, and its output in a line (a URI, or what happened to LATEST)."""

    outcome: Outcome
    output: str | None


@dataclass(frozen=True)
class DatasetResult(StageResult):
    uri: str


@dataclass(frozen=True)
class TrainedResult(StageResult):
    """A training run, or a sweep (`run.use_tune`), which registers its winner itself."""

    run: TrainResult | None = None
    sweep: SweepResult | None = None


@dataclass(frozen=True)
class RegisteredResult(StageResult):
    version: registry.ModelVersion


@dataclass(frozen=True)
class EvaluatedResult(StageResult):
    uri: str
    metrics: dict[str, float] | None = None
    gate: dict[str, Any] | None = None


@dataclass(frozen=True)
class ServedResult(StageResult):
    url: str
    sample: dict[str, Any] | None = None


@dataclass
class RunContext:
    """What a stage reads: the whole config (the runner is an entry point), Ray's connect, the selected stages, and
    the typed result of each stage before it that ran in this run (None where the slice left it out)."""

    cfg: PlatformConfig
    connect: Callable[[], object]
    todo: list[Stage]
    data: DatasetResult | None = None
    train: TrainedResult | None = None
    register: RegisteredResult | None = None
    eval: EvaluatedResult | None = None
    promote: StageResult | None = None
    serve: ServedResult | None = None
    _newest: registry.ModelVersion | None = None

    def record(self, stage: Stage, result: StageResult) -> None:
        """Keep `result` as `stage`'s (its field is named as the stage)."""
        if not hasattr(self, stage.value):
            raise AttributeError(f"RunContext has no field for stage {stage}")
        setattr(self, stage.value, result)

    @property
    def root(self) -> str:
        return self.cfg.storage.root

    def candidate(self) -> registry.ModelVersion:
        """The version this run evaluates and promotes: the one registered now, else (a slice that starts after
        register) the newest registered one, which need not be LATEST."""
        if self.register is not None:
            return self.register.version
        if self._newest is None:
            self._newest = newest_or_fail(self.root, model_name(self.cfg))
        return self._newest


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name, a done-check (its stored output, or None: run it) and its run."""

    name: Stage
    run: Callable[[RunContext], StageResult]
    done: Callable[[RunContext], StageResult | None] | None = None
    unselected: Callable[[RunContext], StageResult | None] | None = None
    """What the stage reports when the slice leaves it out (None: no row)."""


def canonical(stage: Stage | str) -> Stage:
    """The stage a configured name runs: `tune` is the train stage run as a sweep."""
    stage = Stage(stage)
    return Stage.train if stage is Stage.tune else stage


def model_name(cfg: PlatformConfig) -> str:
    return cfg.tune.register_as or cfg.train.register_as or cfg.model.name


def newest_or_fail(root: str, name: str) -> registry.ModelVersion:
    """The newest registered version of `name` (the candidate for promotion), which need not be LATEST."""
    versions = registry.list_versions(root, name)
    if not versions:
        raise StageError(f"model {name!r} has no registered version in {root}: run the train stage first "
                         f"(run.from_stage=train)")
    return versions[-1]


def _ran(reused: bool) -> Outcome:
    return Outcome.skipped if reused else Outcome.ran


def run_data(ctx: RunContext) -> DatasetResult:
    from llm_platform.data.pipeline import build_dataset

    result = build_dataset(ctx.cfg.data, ctx.cfg.tokenizer, ctx.root, connect=ctx.connect)
    return DatasetResult(_ran(result.reused), result.uri, uri=result.uri)


def _dataset_uri(ctx: RunContext) -> str:
    from llm_platform.data.pipeline import resolve_dataset

    cfg = ctx.cfg
    uri = (ctx.data.uri if ctx.data else None) or cfg.train.dataset or resolve_dataset(cfg.data, cfg.tokenizer,
                                                                                        ctx.root)
    if not uri:
        raise StageError(f"no finished dataset for data.name={cfg.data.name!r} with this data and tokenizer config "
                         f"under {ctx.root}: start the run at the data stage (--from data), give the same overrides "
                         f"as the run that built it, or set train.dataset=<dataset folder>")
    return uri


def run_train(ctx: RunContext) -> TrainedResult:
    cfg, dataset_uri = ctx.cfg, _dataset_uri(ctx)
    if cfg.run.use_tune:
        from llm_platform.tune.driver import run_sweep

        ctx.connect()
        sweep = run_sweep(cfg.tune, cfg.model, cfg.train, cfg.scaling, dataset_uri, ctx.root, prices=cfg.plan.prices)
        return TrainedResult(Outcome.ran, sweep.uri, sweep=sweep)
    from llm_platform.train.launcher import launch

    result = launch(cfg.model, cfg.train, cfg.scaling, dataset_uri, ctx.root, connect=ctx.connect,
                    prices=cfg.plan.prices)
    return TrainedResult(_ran(result.reused), result.export_uri, run=result)


def registered(ctx: RunContext) -> RegisteredResult | None:
    """Done-check of register: the version this run's training is registered as already, or (a slice from register
    on) the newest one; None: register it."""
    trained = ctx.train
    if trained is None:
        mv = newest_or_fail(ctx.root, model_name(ctx.cfg))
    elif trained.sweep is not None:  # the sweep registered its winner already (without moving LATEST)
        mv = _sweep_version(ctx.root, trained.sweep)
    else:
        run = trained.run
        assert run is not None
        existing = [v for v in registry.list_versions(ctx.root, model_name(ctx.cfg))
                    if v.lineage.get("source_uri") == run.export_uri
                    and v.lineage.get("run", {}).get("config") == run.lineage["run"]["config"]
                    and v.lineage.get("created_at") == run.lineage.get("created_at")]
        if not existing:
            return None
        mv = existing[-1]
    return RegisteredResult(Outcome.skipped, mv.uri, version=mv)


def run_register(ctx: RunContext) -> RegisteredResult:
    run = ctx.train.run if ctx.train else None
    assert run is not None and run.export_uri, "register runs only after a training run (see `registered`)"
    mv = registry.register(ctx.root, model_name(ctx.cfg), run.export_uri, run.lineage, make_latest=False)
    return RegisteredResult(Outcome.ran, mv.uri, version=mv)


def _sweep_version(root: str, sweep: SweepResult) -> registry.ModelVersion:
    """The version a sweep registered its winner as, from its record (also for a sweep finished earlier)."""
    ref = sweep.record.get("model_version")
    if not ref:
        raise StageError(f"sweep {sweep.uri} registered no model version (see its sweep.json): rerun it with another "
                         f"tune.name")
    return registry.get(root, ref["name"], ref["version"])


def _evaluation(ctx: RunContext, outcome: Outcome) -> EvaluatedResult | None:
    """The stored evaluation of the candidate when it is fresh (None: evaluate); a failed gate is an error, also
    with `--until eval`, as `llm-platform eval` exits 1."""
    mv = ctx.candidate()
    folder = eval_folder(ctx.cfg, mv)
    verdict = stored_verdict(folder, mv, ctx.cfg.eval)
    if verdict.passed is None:
        if outcome is Outcome.ran:  # run_eval's record and promotion_verdict disagree: a bug, not bad input
            raise StageError(f"eval: the evaluation just written to {folder} cannot be read back: {verdict.reason}")
        if storage.exists(storage.join(folder, "metrics.json")):
            log.info("eval: %s; evaluating again", verdict.reason)
        return None
    if verdict.passed is False:
        raise StageError(gate_failed(mv, ctx.cfg.eval, verdict, folder))
    record = storage.read_json(storage.join(folder, "metrics.json"))
    return EvaluatedResult(outcome, folder, uri=folder, metrics=record.get("metrics"), gate=record.get("gate"))


def evaluated(ctx: RunContext) -> EvaluatedResult | None:
    return _evaluation(ctx, Outcome.skipped)


def run_eval_stage(ctx: RunContext) -> EvaluatedResult:
    from llm_platform.evaluate.run import run_eval

    mv = ctx.candidate()
    run_eval(dataclasses.replace(ctx.cfg.eval, model=f"registry:{mv.name}/{mv.version}"), ctx.root,
             connect=ctx.connect)
    result = _evaluation(ctx, Outcome.ran)
    assert result is not None
    return result


def _passing_verdict(ctx: RunContext) -> Verdict:
    """The stored verdict on the candidate, which must be a pass under the gate config in force."""
    mv = ctx.candidate()
    folder = eval_folder(ctx.cfg, mv)
    verdict = stored_verdict(folder, mv, ctx.cfg.eval)
    if verdict.passed is None:
        ref = f"{mv.name}/{mv.version}"
        raise StageError(f"promote: {verdict.reason}; LATEST not moved. Evaluate it first: `llm-platform run "
                         f"--from eval` with the same overrides, or `llm-platform eval eval.model=registry:{ref}` "
                         f"with the same eval.* overrides")
    if verdict.passed is False:
        raise StageError(gate_failed(mv, ctx.cfg.eval, verdict, folder))
    return verdict


def promoted(ctx: RunContext) -> StageResult | None:
    """Done-check of promote: LATEST is at the candidate already (after its verdict is checked: a version that
    fails the gate in force is an error even where LATEST is)."""
    verdict, mv = _passing_verdict(ctx), ctx.candidate()
    if latest_version(ctx.root, mv.name) != mv.version:
        return None
    return StageResult(Outcome.skipped, f"LATEST is {mv.version} already ({verdict.reason})")


def run_promote(ctx: RunContext) -> StageResult:
    verdict, mv = _passing_verdict(ctx), ctx.candidate()
    registry.promote(ctx.root, mv.name, mv.version)
    log.info("promote: LATEST -> %s/%s (%s)", mv.name, mv.version, verdict.reason)
    return StageResult(Outcome.ran, f"LATEST -> {mv.version} ({verdict.reason})")


def held(ctx: RunContext) -> StageResult | None:
    """Promote left out of the slice: why this run's version is not LATEST (None: it is, or there is none), for the
    summary: a version left behind silently looks like a deployment that happened."""
    if ctx.register is None and Stage.eval not in ctx.todo:  # no version of this run's to speak of
        return None
    mv = ctx.candidate()
    reason = not_promoted(ctx.cfg, mv)
    if reason is None:
        return None
    log.info("promote: %s/%s %s", mv.name, mv.version, reason)
    return StageResult(Outcome.held, reason)


def run_serve(ctx: RunContext) -> ServedResult:
    from llm_platform.serve.app import deploy

    cfg = ctx.cfg
    serve_cfg = dataclasses.replace(cfg.serve, model=f"registry:{model_name(cfg)}")
    ctx.connect()
    url = deploy(serve_cfg, ctx.root, storage.settings())
    return ServedResult(Outcome.ran, url, url=url, sample=sample_query(url, cfg.run.query, cfg.serve.auth.api_key_env))


def sample_query(url: str, prompt: str, api_key_env: str) -> dict[str, Any]:
    """One completion against the endpoint, through the OpenAI API."""
    import os

    import httpx

    key = (os.environ.get(api_key_env) or "").split(",")[0].strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["data"]
    body = {"model": models[0]["id"], "prompt": prompt, "max_tokens": 32, "temperature": 0.7, "seed": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    reply.raise_for_status()
    return {"prompt": prompt, "completion": reply.json()["choices"][0]["text"], "model": models[0]["id"]}


PIPELINE: list[StageSpec] = [
    StageSpec(Stage.data, run=run_data),
    StageSpec(Stage.train, run=run_train),
    StageSpec(Stage.register, run=run_register, done=registered),
    StageSpec(Stage.eval, run=run_eval_stage, done=evaluated),
    StageSpec(Stage.promote, run=run_promote, done=promoted, unselected=held),
    StageSpec(Stage.serve, run=run_serve),
]
STAGES: list[Stage] = [spec.name for spec in PIPELINE]
