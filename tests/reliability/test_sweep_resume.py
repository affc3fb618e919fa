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
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from fixtures.training import make_dataset
from fixtures.waiting import wait_until

from llm_platform import registry
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

# The typed configs reach the driver process pickled, as they cross every other process boundary.
DRIVER = """
import pickle, sys
from llm_platform import cluster
from llm_platform.config.cluster import ClusterConfig
from llm_platform.tune.driver import run_sweep

spec = pickle.loads(bytes.fromhex(sys.argv[1]))
cluster.connect(ClusterConfig(address=spec["address"], log_to_driver=False))
run_sweep(spec["tune"], spec["model"], spec["train"], spec["scaling"], spec["dataset"], spec["root"])
"""


def run_folders(root: str) -> list[str]:
    runs = os.path.join(root, "runs")
    return sorted(os.listdir(runs)) if os.path.isdir(runs) else []


def finished_runs(root: str) -> list[str]:
    return [d for d in run_folders(root) if os.path.exists(os.path.join(root, "runs", d, "lineage.json"))]


def test_sweep_driver_sigkill_then_resume(ray_session, tmp_path, reliability_report):
    import ray

    dataset = make_dataset(str(tmp_path / "data"), "pretrain", seq_len=32)
    root = str(tmp_path / "store")
    address = ray.get_runtime_context().gcs_address
    spec = {"address": address, "tune": TUNE, "model": MODEL, "train": TRAIN, "scaling": SCALING, "dataset": dataset,
            "root": root}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, pickle.dumps(spec).hex()], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": address})

    def alive_and(condition):
        def check():
            if driver.poll() is not None:
                pytest.fail(f"sweep driver exited ({driver.returncode}): {driver.stderr.read().decode()[-3000:]}")
            return condition()
        return check

    try:
        wait_until(alive_and(lambda: finished_runs(root)), 900, "the first trial to finish")
        # The driver dies mid-sweep, not between sweeps: once the last trial (after the raising one) is training.
        wait_until(alive_and(lambda: len(run_folders(root)) > len(finished_runs(root))), 600,
                   "the next trial's run to start training")
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
