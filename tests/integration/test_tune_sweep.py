"""Tune stage on the local Ray: real sweeps of a tiny GPT-2 (1 worker per trial, 2 trials at once).

- ASHA stops the trial with a tiny learning rate early; the registered winner is the finished trial with the
  lowest validation loss, with the right LATEST pointer and lineage; summary files are written.
(A trial that raises, and a sweep whose driver is killed and then resumed: tests/reliability/test_sweep_resume.py.)
"""

from __future__ import annotations

import csv
import json
import os

import pytest
from fixtures.training import make_dataset
from fixtures.waiting import wait_until

from llm_platform import registry
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ParallelismConfig, ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.tune.driver import run_sweep

# A sweep is several Ray Train runs; on the shared, overloaded CI box one trial's first validation alone can take
# minutes (Ray Data start-up), so these tests get more than the suite's 900 s default.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]

MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=64)
TRAIN = TrainConfig(max_steps=20, micro_batch_size=4, log_interval_steps=5, eval_interval_steps=5, eval_batches=2,
                    checkpoint=CheckpointConfig(interval_steps=10, keep_latest=1),
                    optimizer=OptimizerConfig(warmup_steps=2, lr=3e-3), parallelism=ParallelismConfig(strategy="none"))
SCALING = ScalingConfig(num_workers=1, cpus_per_worker=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), "pretrain", seq_len=32)


def test_asha_sweep_registers_the_best_finished_trial(ray_session, dataset, tmp_path, another_ray_instance):
    root = str(tmp_path / "store")
    # The tiny learning rate comes last, so the two good trials have set ASHA's first rung when it reports.
    cfg = TuneConfig(name="lr-sweep", space={"train.optimizer.lr": {"grid": [1e-2, 3e-3, 1e-6]}}, num_samples=1,
                     max_concurrent_trials=2, scheduler="asha", grace_period=1, reduction_factor=2,
                     register_as="tiny-tuned", verbose=0)
    result = run_sweep(cfg, MODEL, TRAIN, SCALING, dataset, root)

    by_lr = {t.params["train.optimizer.lr"]: t for t in result.trials}
    assert set(by_lr) == {1e-2, 3e-3, 1e-6}
    bad = by_lr[1e-6]
    assert bad.status == "stopped" and bad.iterations < 4, (bad.status, bad.reports)
    # ASHA is asynchronous: of the two good trials running together, the one behind at a rung may be stopped too.
    finished = [t for t in result.trials if t.status == "finished"]
    assert finished and all(t.iterations == 4 and t.reports[-1]["step"] == 20 for t in finished)
    assert all(t.params["train.optimizer.lr"] != 1e-6 for t in finished)

    # The winner: the lowest final val/loss, recomputed here from the sweep's own trials.jsonl.
    sweep_dir = os.path.join(root, "sweeps", "lr-sweep")
    lines = [json.loads(line) for line in open(os.path.join(sweep_dir, "trials.jsonl"))]
    final = {}
    for line in lines:
        if line["status"] == "finished" and "val/loss" in line["metrics"]:
            final[line["trial_id"]] = line["metrics"]["val/loss"]  # in report order: the last one stays
    expected = min(final, key=final.get)
    assert result.winner.trial_id == expected
    assert {line["trial_id"] for line in lines} == {t.trial_id for t in result.trials}

    # Registry: v0001 holds the winner's export, and its lineage names the sweep and trial. LATEST is not moved:
    # promotion is the caller's (`llm-platform tune` at once, `llm-platform run` after a passing gate).
    version = registry.get(root, "tiny-tuned", "v0001")
    assert version.version == "v0001" == result.model_version.version
    with pytest.raises(registry.RegistryError):
        registry.latest(root, "tiny-tuned")
    lineage = version.lineage
    assert lineage["sweep"]["trial_id"] == expected and lineage["sweep"]["name"] == "lr-sweep"
    assert lineage["sweep"]["params"] == {"train.optimizer.lr": result.winner.params["train.optimizer.lr"]}
    assert lineage["sweep"]["uri"] == os.path.join(root, "sweeps", "lr-sweep")
    assert lineage["run"]["name"] == f"lr-sweep-{expected}"
    assert lineage["run"]["config"]["train"]["optimizer"]["lr"] == result.winner.params["train.optimizer.lr"]
    assert lineage["run"]["metrics"]["val/loss"] == pytest.approx(final[expected])
    assert lineage["dataset"]["manifest_sha256"] and lineage["code_version"]
    assert os.path.exists(os.path.join(version.uri, "config.json"))
    assert os.path.exists(os.path.join(version.uri, "model.safetensors"))

    # The stopped trial's Ray Train workers gave their CPUs back: Ray Train V2's cleaner removes the placement group
    # of a killed controller, which needs the State API (the local Ray runs its dashboard for this). Leaked groups
    # deadlocked a sweep with more trials than CPUs. Another Ray instance runs on this machine meanwhile (fixture):
    # the cleaner must still find its own instance's API server (cluster.connect), not give up on finding two.
    import ray

    def live_groups():
        return [(pg["name"], pg["state"], pg["bundles"]) for pg in ray.util.placement_group_table().values()
                if pg["state"] != "REMOVED"]

    wait_until(lambda: not live_groups(), 60, lambda: f"every placement group to be removed (live: {live_groups()})")

    rows = list(csv.DictReader(open(os.path.join(sweep_dir, "summary.csv"))))
    assert sorted(r["status"] for r in rows) == sorted(t.status for t in result.trials)
    assert os.path.getsize(os.path.join(sweep_dir, "curves.png")) > 5000
    record = json.load(open(os.path.join(sweep_dir, "sweep.json")))
    assert record["winner"]["trial_id"] == expected
    assert record["trials"] == {"finished": len(finished), "stopped": 3 - len(finished), "error": 0}

    # The same sweep again is already done: nothing reruns, nothing new is registered.
    again = run_sweep(cfg, MODEL, TRAIN, SCALING, dataset, root)
    assert again.record["winner"]["trial_id"] == expected
    assert [v.version for v in registry.list_versions(root, "tiny-tuned")] == ["v0001"]
