"""A sweep whose driver is killed with SIGKILL, then resumed with `tune.resume=true`.

Load: a grid sweep of 3 trials (tiny GPT-2, 1 worker, 10 steps each, one trial at a time); one trial has a bad
`train.micro_batch_size` (0) and raises.
Fault: the sweep's driver process (a separate driver on the same Ray) gets SIGKILL once the first good trial has
finished and the next one is training. No graceful shutdown: Tune's experiment state is whatever it last saved.
What must hold: the rerun with `tune.resume=true` finishes the sweep; the trial that had finished is not trained
again (its run record and metrics are byte-for-byte the same); the raising trial is recorded as an error without
killing the sweep; the winner is registered with the right lineage. Without `tune.resume=true` the rerun refuses
with a message that says how to continue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_fixtures import make_dataset

from llm_platform import registry
from llm_platform.config import as_dict
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ParallelismConfig, ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError
from llm_platform.tune.driver import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=64)
TRAIN = TrainConfig(max_steps=10, micro_batch_size=4, log_interval_steps=5, eval_interval_steps=5, eval_batches=2,
                    checkpoint=CheckpointConfig(interval_steps=10, keep_latest=1),
                    optimizer=OptimizerConfig(warmup_steps=2, lr=3e-3), parallelism=ParallelismConfig(strategy="none"))
SCALING = ScalingConfig(num_workers=1, cpus_per_worker=1)
# Grid order is the trial order with one trial at a time: micro-batch 4 finishes first, 0 raises (the trial's own
# config check refuses it; a value outside a choice key's set would be refused before the sweep starts).
TUNE = TuneConfig(name="killed", space={"train.micro_batch_size": {"grid": [4, 0, 2]}}, num_samples=1,
                  max_concurrent_trials=1, scheduler="fifo", max_trial_failures=1, resume_errored=False, verbose=0)

DRIVER = """
import json, sys
from llm_platform import cluster
from llm_platform.config import from_dict
from llm_platform.config.cluster import ClusterConfig
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.tune.driver import run_sweep

spec = json.loads(sys.argv[1])
cluster.connect(ClusterConfig(address=spec["address"], log_to_driver=False))
run_sweep(from_dict(TuneConfig, spec["tune"]), from_dict(ModelConfig, spec["model"]),
          from_dict(TrainConfig, spec["train"]), from_dict(ScalingConfig, spec["scaling"]), spec["dataset"],
          spec["root"])
"""


def finished_runs(root: str) -> list[str]:
    runs = os.path.join(root, "runs")
    if not os.path.isdir(runs):
        return []
    return sorted(d for d in os.listdir(runs) if os.path.exists(os.path.join(runs, d, "lineage.json")))


def test_sweep_driver_sigkill_then_resume(ray_session, tmp_path, reliability_report):
    import ray

    dataset = make_dataset(str(tmp_path / "data"), "pretrain", seq_len=32)
    root = str(tmp_path / "store")
    spec = {"address": ray.get_runtime_context().gcs_address, "tune": as_dict(TUNE), "model": as_dict(MODEL),
            "train": as_dict(TRAIN), "scaling": as_dict(SCALING), "dataset": dataset, "root": root}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": spec["address"]})
    try:
        deadline = time.time() + 900
        while not finished_runs(root):
            if driver.poll() is not None:
                pytest.fail(f"sweep driver exited ({driver.returncode}): {driver.stderr.read().decode()[-3000:]}")
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.2)
        time.sleep(3)  # the next trial is scheduled: the driver dies mid-sweep, not between sweeps
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    killed_at = time.time()
    (first,) = finished_runs(root)
    first_dir = os.path.join(root, "runs", first)
    record_before = open(os.path.join(first_dir, "lineage.json")).read()
    metrics_before = open(os.path.join(first_dir, "metrics.jsonl")).read()
    assert not os.path.exists(os.path.join(root, "sweeps", "killed", "sweep.json")), "the sweep had finished"

    with pytest.raises(ConfigError, match="tune.resume=true"):
        run_sweep(TUNE, MODEL, TRAIN, SCALING, dataset, root)
    resumed_cfg = dataclasses.replace(TUNE, resume=True)
    result = run_sweep(resumed_cfg, MODEL, TRAIN, SCALING, dataset, root)

    by_batch = {t.params["train.micro_batch_size"]: t for t in result.trials}
    assert set(by_batch) == {4, 0, 2}
    assert by_batch[0].status == "error" and "train.micro_batch_size" in by_batch[0].error
    assert by_batch[4].status == "finished" and by_batch[2].status == "finished"
    # The trial that finished before the kill was not trained again.
    assert first.endswith(by_batch[4].trial_id)
    assert open(os.path.join(first_dir, "lineage.json")).read() == record_before
    assert open(os.path.join(first_dir, "metrics.jsonl")).read() == metrics_before
    # The winner is the finished trial with the best final val/loss (its export holds the final weights).
    best = min((t for t in result.trials if t.status == "finished"), key=lambda t: t.last("val/loss"))
    assert result.winner.trial_id == best.trial_id
    lineage = registry.get(root, "tiny", result.model_version.version).lineage
    assert lineage["sweep"]["trial_id"] == result.winner.trial_id and lineage["sweep"]["name"] == "killed"
    reliability_report("tune: 3-trial sweep, driver SIGKILLed after the first finished trial",
                       resumed_and_finished_in_s=round(time.time() - killed_at, 1),
                       trials={k: t.status for k, t in sorted(by_batch.items())}, retrained_finished_trials=0)
