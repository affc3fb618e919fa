"""`llm-platform run`'s promote stage: only it moves LATEST, and only after a passing gate on a fresh evaluation of
that version. The expensive stages are fast fakes (tests/fixtures/promotion_fakes.py); the registry, the sweep's
registration, the gate and the runner are real. No Ray."""

from __future__ import annotations

import os
import shutil

import pytest
from fixtures import promotion_fakes as fakes

from llm_platform import registry, storage
from llm_platform.errors import StageError
from llm_platform.runner import STAGES, promotion_verdict, run_all, stored_verdict


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A storage root with v0001 (perplexity 9) trained, evaluated without a gate and promoted, and the fakes."""
    root = str(tmp_path / "store")
    calls = fakes.install(monkeypatch)
    run_all(fakes.config(root, max_steps=10))
    assert fakes.latest(root) == "v0001"
    return {"root": root, "calls": calls}


def test_promote_is_a_stage_between_eval_and_serve():
    assert STAGES == ["data", "train", "register", "eval", "promote", "serve"]


def test_the_first_run_promotes_its_version_and_serves_it(world):
    record = storage.read_json(os.path.join(world["root"], "status", "last_run.json"))
    assert {k: v["result"] for k, v in record["stages"].items()} == dict.fromkeys(STAGES, "ran")
    assert "LATEST -> v0001" in record["stages"]["promote"]["output"]
    assert record["chain"]["model_version"] == "debug/v0001" and world["calls"]["served"] == ["v0001"]


def test_a_sweep_winner_that_fails_its_gate_never_becomes_latest(world):
    """Bug 1: the sweep registered its winner with LATEST moved, before the gate had a say."""
    root = world["root"]
    with pytest.raises(StageError, match="LATEST not moved"):  # perplexity 10 vs 9: 11% worse, limit 5%
        run_all(fakes.config(root, max_steps=20, use_tune=True, compare_to="v0001"))
    assert fakes.latest(root) == "v0001"
    assert [v.version for v in registry.list_versions(root, "debug")] == ["v0001", "v0002"]
    # A winner that passes is promoted by the run's promote stage, not by the sweep.
    summary = run_all(fakes.config(root, max_steps=30, use_tune=True, compare_to="v0001"))
    assert fakes.latest(root) == "v0003" and summary.stages["promote"]["result"] == "ran"


def test_the_sweep_registers_its_winner_without_moving_latest(world, tmp_path):
    from llm_platform.config.tune import TuneConfig
    from llm_platform.tune.driver import register_winner
    from llm_platform.tune.summary import TrialRecord

    run = fakes.launch(fakes.config(world["root"]).model, fakes.config(world["root"], max_steps=40).train,
                       fakes.config(world["root"]).scaling, "ds", world["root"], run_name="s-t1")
    trial = TrialRecord("t1", {}, [{"val/loss": 1.0}], run_uri=run.run_uri, export_uri=run.export_uri)
    version = register_winner(world["root"], "debug", trial, TuneConfig(name="s"), "sweeps/s")
    assert version.version == "v0002" and fakes.latest(world["root"]) == "v0001"


def test_a_rerun_after_a_failed_gate_refuses_again(world):
    """Bug 2: the rerun reused the stored metrics.json without its gate verdict, and promoted."""
    root = world["root"]
    failing = fakes.config(root, max_steps=20, compare_to="v0001")
    with pytest.raises(StageError, match="regressed against v0001.*LATEST not moved"):
        run_all(failing)
    evals = world["calls"]["evals"]
    with pytest.raises(StageError, match="regressed against v0001.*LATEST not moved"):
        run_all(failing)
    assert world["calls"]["evals"] == evals, "the stored evaluation (same version, same gate) is reused"
    with pytest.raises(StageError, match="gate failed"):
        run_all(fakes.config(root, max_steps=20, compare_to="v0001", from_stage="promote"))
    assert fakes.latest(root) == "v0001"


def test_until_register_never_moves_latest(world):
    """Bug 3: `--until register` promoted the new version with no evaluation at all."""
    root = world["root"]
    summary = run_all(fakes.config(root, max_steps=30, until_stage="register"))
    assert fakes.latest(root) == "v0001"
    assert summary.stages["register"]["result"] == "ran"
    held = summary.stages["promote"]
    assert held["result"] == "held" and "not promoted: no eval of debug/v0002" in held["output"], held
    assert "LATEST stays v0001" in held["output"] and "--from eval" in held["output"]
    # Then the rest of the run, from eval: the version waiting for promotion is evaluated and promoted.
    summary = run_all(fakes.config(root, max_steps=30, from_stage="eval"))
    assert fakes.latest(root) == "v0002" and summary.stages["promote"]["result"] == "ran"
    assert summary.chain["model_version"] == "debug/v0002"


def test_until_eval_evaluates_but_leaves_latest(world):
    root = world["root"]
    summary = run_all(fakes.config(root, max_steps=30, until_stage="eval"))
    assert fakes.latest(root) == "v0001"
    assert "the promote stage was not selected" in summary.stages["promote"]["output"]


def test_promote_alone_without_an_evaluation_names_what_to_run(world):
    root = world["root"]
    run_all(fakes.config(root, max_steps=30, until_stage="register"))
    with pytest.raises(StageError, match=r"no eval of debug/v0002; LATEST not moved.*--from eval"):
        run_all(fakes.config(root, max_steps=30, from_stage="promote"))
    with pytest.raises(StageError, match="no eval of debug/v0002"):
        run_all(fakes.config(root, max_steps=30, stages=["data", "train", "register", "promote"]))
    assert fakes.latest(root) == "v0001"


def test_an_evaluation_under_another_gate_config_is_not_reused(world):
    root = world["root"]
    # Passes with a 50% limit (11% worse); stopped before promote.
    run_all(fakes.config(root, max_steps=20, compare_to="v0001", max_regression_pct=50.0, until_stage="eval"))
    strict = fakes.config(root, max_steps=20, compare_to="v0001", max_regression_pct=5.0)
    with pytest.raises(StageError, match="max_regression_pct.*LATEST not moved.*--from eval"):
        run_all(fakes.config(root, max_steps=20, compare_to="v0001", from_stage="promote"))
    evals = world["calls"]["evals"]
    with pytest.raises(StageError, match="regressed against v0001"):
        run_all(strict)  # evaluated again under the gate in force, which fails
    assert world["calls"]["evals"] == evals + 1 and fakes.latest(root) == "v0001"
    # And no gate at all is a config of its own too: passing, so promoted.
    run_all(fakes.config(root, max_steps=20))
    assert fakes.latest(root) == "v0002" and world["calls"]["evals"] == evals + 2


def test_a_rerun_after_a_pass_promotes_once(world):
    root = world["root"]
    registry.promote(root, "debug", "v0001")
    summary = run_all(fakes.config(root, max_steps=10))
    assert summary.stages["eval"]["result"] == "skipped" and summary.stages["promote"]["result"] == "skipped"
    assert "LATEST is v0001 already" in summary.stages["promote"]["output"]
    summary = run_all(fakes.config(root, max_steps=30, compare_to="v0001"))
    assert summary.stages["promote"]["result"] == "ran" and fakes.latest(root) == "v0002"
    registry.promote(root, "debug", "v0001")  # a rollback by hand; the passing version is promotable again
    summary = run_all(fakes.config(root, max_steps=30, compare_to="v0001", from_stage="promote"))
    assert summary.stages["promote"]["result"] == "ran" and fakes.latest(root) == "v0002"


def test_an_evaluation_of_an_earlier_registration_of_the_same_number_is_not_trusted(world):
    root = world["root"]
    shutil.rmtree(os.path.join(root, "registry"))  # evals/ kept: an old debug/v0001 evaluation is still there
    shutil.rmtree(os.path.join(root, "runs"))
    run_all(fakes.config(root, max_steps=10, until_stage="register"))
    mv = registry.get(root, "debug", "v0001")
    folder = os.path.join(root, "evals", "debug", "v0001", "default")
    stale = stored_verdict(folder, mv, fakes.config(root).eval)
    assert stale.passed is None and "earlier registration" in stale.reason
    with pytest.raises(StageError, match="earlier registration"):
        run_all(fakes.config(root, max_steps=10, from_stage="promote"))
    assert fakes.latest(root) is None


def test_the_verdict_of_a_record(tmp_path):
    mv = registry.ModelVersion("debug", "v0002", "uri", {"registered_at": "t2"})
    cfg = fakes.config("root", compare_to="v0001")
    base = {"model": {"name": "debug", "version": "v0002"}, "model_registered_at": "t2",
            "config": {"compare_to": "v0001", "gate": {"guard_metrics": ["val/perplexity"],
                                                       "max_regression_pct": 5.0}},
            "gate": {"passed": True, "failures": []}}
    assert promotion_verdict(base, mv, cfg.eval).passed is True
    assert promotion_verdict(None, mv, cfg.eval).passed is None
    assert promotion_verdict({**base, "gate": {"passed": False, "failures": ["x worse"]}}, mv, cfg.eval).reason \
        == "gate failed against v0001: x worse"
    assert promotion_verdict({**base, "gate": None}, mv, cfg.eval).passed is None
    assert promotion_verdict({**base, "model": {"name": "debug", "version": "v0001"}}, mv, cfg.eval).passed is None
    assert promotion_verdict(base, mv, fakes.config("root", compare_to="v0003").eval).passed is None
    assert promotion_verdict(base, mv, fakes.config("root", compare_to="v0001", max_regression_pct=9).eval) \
        .passed is None
    # No gate configured: an evaluation of this version made without one passes.
    ungated = {**base, "config": {"compare_to": None, "gate": base["config"]["gate"]}, "gate": None}
    assert promotion_verdict(ungated, mv, fakes.config("root").eval).passed is True


def test_the_real_run_eval_record_gives_the_verdicts_the_fake_one_does(tmp_path):
    """The fakes write the record `run_eval` writes: checked here against the real `run_eval`, on a model with
    nothing to measure (no dataset, no tasks, no bias pairs), which loads no weights."""
    import dataclasses

    from llm_platform.config.evaluate import BiasConfig
    from llm_platform.evaluate.run import run_eval

    root = str(tmp_path / "store")
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "gpt2"}')
    versions = [registry.register(root, "tiny", str(export), {"run": {}}, make_latest=False) for _ in range(2)]
    for mv, compare_to in zip(versions, (None, "v0001")):
        cfg = dataclasses.replace(fakes.config(root, compare_to=compare_to).eval, model=f"registry:tiny/{mv.version}",
                                  bias=BiasConfig(enabled=False), use_ray=False)
        run_eval(cfg, root)
        folder = os.path.join(root, "evals", "tiny", mv.version, "default")
        assert stored_verdict(folder, mv, cfg).passed is True, stored_verdict(folder, mv, cfg).reason
        other = dataclasses.replace(cfg, compare_to="v0002")
        assert stored_verdict(folder, mv, other).passed is None


TUNE_COMMAND = """
import sys
import pytest
sys.path.insert(0, sys.argv[1])
from fixtures import promotion_fakes
from llm_platform import cluster
from llm_platform.cli import main
patch = pytest.MonkeyPatch()
promotion_fakes.install(patch)
patch.setattr(cluster, "connect", lambda cfg: None)
main(["tune", *sys.argv[2:]])
"""


@pytest.mark.slow
def test_the_tune_command_promotes_the_winner_it_registers_and_only_then(tmp_path):
    """`llm-platform tune` evaluates nothing: it moves LATEST to the winner it has just registered, as before
    (`run_sweep` itself no longer does); a sweep finished earlier is not promoted again (a rollback stays)."""
    import subprocess
    import sys

    root = str(tmp_path / "store")
    dataset = fakes.build_dataset(fakes.config(root).data, None, root).uri

    def tune(name: str) -> str:
        proc = subprocess.run([sys.executable, "-c", TUNE_COMMAND, os.path.dirname(os.path.dirname(__file__)),
                               f"storage.root={root}", f"train.dataset={dataset}", f"tune.name={name}",
                               "train.max_steps=10", f"log_dir={tmp_path / 'logs'}"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "LATEST -> v0001" in tune("first") and fakes.latest(root) == "v0001"
    assert "LATEST -> v0002" in tune("second") and fakes.latest(root) == "v0002"
    registry.promote(root, "debug", "v0001")
    assert "LATEST" not in tune("second") and fakes.latest(root) == "v0001"
