"""The stage records of `llm-platform run` (`runner/stages.py`): the runner asks each selected stage's done-check
before running it, runs only the `--from`..`--until` slice, and refuses an unknown stage name at compose time. The
stages here are small recording fakes in place of `PIPELINE`; no Ray, no storage but a temporary root."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from hydra.errors import ConfigCompositionException

import llm_platform.runner as runner
from llm_platform import registry
from llm_platform.config import PlatformConfig, compose
from llm_platform.config.choices import Stage
from llm_platform.runner.stages import (
    PIPELINE,
    STAGES,
    DatasetResult,
    EvaluatedResult,
    Outcome,
    RegisteredResult,
    RunContext,
    ServedResult,
    StageResult,
    StageSpec,
    TrainedResult,
    canonical,
)


@pytest.fixture
def root(tmp_path) -> str:
    """A storage root with one registered version of `debug`, the model the default config names."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "gpt2"}')
    root = str(tmp_path / "store")
    registry.register(root, "debug", str(export), {"run": {}}, make_latest=False)
    return root


def _result(stage: Stage, outcome: Outcome, output: str) -> StageResult:
    """The typed result each stage returns, with made-up contents."""
    if stage is Stage.data:
        return DatasetResult(outcome, output, uri="ds")
    if stage is Stage.train:
        return TrainedResult(outcome, output)
    if stage is Stage.register:
        return RegisteredResult(outcome, output, version=registry.ModelVersion("debug", "v0009", "uri", {}))
    if stage is Stage.eval:
        return EvaluatedResult(outcome, output, uri="evals/debug/v0009")
    if stage is Stage.serve:
        return ServedResult(outcome, output, url="http://endpoint")
    return StageResult(outcome, output)


def _config(root: str, **run) -> PlatformConfig:
    cfg = PlatformConfig()
    cfg.storage = dataclasses.replace(cfg.storage, root=root)
    cfg.run = dataclasses.replace(cfg.run, keep_serving=False, **run)
    return cfg


def _pipeline(calls: list[str], stored: set[Stage]) -> list[StageSpec]:
    """A record per stage: `done` finds an output for the stages in `stored`; `run` records that it ran."""

    def done(stage: Stage):
        def check(ctx: RunContext) -> StageResult | None:
            calls.append(f"done {stage}")
            return _result(stage, Outcome.skipped, f"{stage} stored") if stage in stored else None
        return check

    def run(stage: Stage):
        def go(ctx: RunContext) -> StageResult:
            calls.append(f"run {stage}")
            return _result(stage, Outcome.ran, f"{stage} made")
        return go

    def unselected(ctx: RunContext) -> StageResult | None:
        return StageResult(Outcome.held, "left out") if Stage.eval in ctx.todo else None

    return [StageSpec(s, run=run(s), done=done(s), unselected=unselected if s is Stage.promote else None)
            for s in STAGES]


def test_the_pipeline_is_the_stages_in_order_with_promote_between_eval_and_serve():
    assert [spec.name for spec in PIPELINE] == STAGES == ["data", "train", "register", "eval", "promote", "serve"]
    assert all(isinstance(s, Stage) for s in STAGES)


def test_a_stage_whose_done_check_finds_its_output_is_skipped_and_not_run(root, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(runner, "PIPELINE", _pipeline(calls, stored={Stage.data, Stage.eval}))
    summary = runner.run_all(_config(root))
    assert {k: v["result"] for k, v in summary.stages.items()} == {
        "data": "skipped", "train": "ran", "register": "ran", "eval": "skipped", "promote": "ran", "serve": "ran"}
    assert "run data" not in calls and "run eval" not in calls
    assert calls.index("done train") < calls.index("run train") < calls.index("done register")
    assert summary.stages["eval"]["output"] == "eval stored" and summary.stages["serve"]["output"] == "serve made"
    # The summary is what `llm-platform status` reads back.
    record = json.load(open(os.path.join(root, "status", "last_run.json")))
    assert record["stages"] == summary.stages
    # The chain reads the typed results: this run's version, its evaluation, its endpoint.
    assert summary.chain["model_version"] == "debug/v0009" and summary.chain["eval_report"] == "evals/debug/v0009"
    assert summary.endpoint == summary.chain["endpoint"] == "http://endpoint"


@pytest.mark.parametrize("start,stop,ran", [
    (None, None, ["data", "train", "register", "eval", "promote", "serve"]),
    ("train", "eval", ["train", "register", "eval"]),
    ("tune", "tune", ["train"]),
    ("promote", None, ["promote", "serve"]),
    (None, "data", ["data"]),
])
def test_from_and_until_select_the_stages_that_run(root, monkeypatch, start, stop, ran):
    calls: list[str] = []
    monkeypatch.setattr(runner, "PIPELINE", _pipeline(calls, stored=set()))
    cfg = _config(root, from_stage=start and Stage(start), until_stage=stop and Stage(stop))
    summary = runner.run_all(cfg)
    assert [c.split()[1] for c in calls if c.startswith("run ")] == ran
    # An unselected stage reports only what its `unselected` says: promote is held when eval ran without it.
    held = {"promote": "held"} if "eval" in ran and "promote" not in ran else {}
    assert {k: v["result"] for k, v in summary.stages.items()} == {**dict.fromkeys(ran, "ran"), **held}
    # A slice that starts after register works on the newest registered version.
    version = "v0009" if "register" in ran else "v0001" if {"eval", "promote"} & set(ran) else None
    assert summary.chain.get("model_version") == (version and f"debug/{version}")


def test_tune_counts_as_train_everywhere():
    assert canonical(Stage.tune) is Stage.train and canonical("tune") is Stage.train
    assert canonical("eval") is Stage.eval
    cfg = _config("root", stages=[Stage.data, Stage.tune, Stage.register], until_stage=Stage.tune)
    assert runner.selected_stages(cfg) == [Stage.data, Stage.train]


def test_a_result_is_kept_under_its_stage_and_only_there():
    ctx = RunContext(_config("root"), lambda: None, list(STAGES))
    result = StageResult(Outcome.ran, "x")
    ctx.record(Stage.promote, result)
    assert ctx.promote is result and ctx.eval is None
    with pytest.raises(AttributeError, match="no field for stage tune"):
        ctx.record(Stage.tune, result)


@pytest.mark.parametrize("override,key", [("run.from_stage=deploy", "run.from_stage"),
                                          ("run.until_stage=deploy", "run.until_stage"),
                                          ("run.stages=[data,train,deploy]", "run.stages")])
def test_an_unknown_stage_fails_at_compose_time_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose("run", [override])
    text = f"{err.value} {err.value.__cause__}"
    assert key in text and "'deploy'" in text and "data, train, tune, register, eval, promote, serve" in text
