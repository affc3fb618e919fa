"""Training under process faults: a worker killed with SIGKILL, and a killed driver rerun with the same name.

Load: a 2-worker FSDP2 (gloo) causal-LM run of 12 steps on a tiny GPT-2, checkpointing every 4 steps.
Faults:
- worker: once Ray Train has registered the step-4 checkpoint, one of the two Ray Train worker processes gets
  SIGKILL from the outside (no cooperation from the training code);
- driver: the process that called `launch` (a separate driver connected to the same Ray) gets SIGKILL once the
  step-4 checkpoint is registered; its controller and workers go with it. `launch` is then called again with the
  same run name.
What must hold: both runs finish at step 12 with a final checkpoint and an export; the killed one resumed from its
last checkpoint rather than from scratch (steps up to the checkpoint were logged before the fault, the later ones
after it); and the two runs' per-step losses are equal (resume is exact), so the faults changed nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fixtures.training import make_dataset, ray_flag, set_flag_on_checkpoint

from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ParallelismConfig, ScalingConfig, TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=64)
TRAIN = TrainConfig(max_steps=12, micro_batch_size=4, log_interval_steps=2, eval_interval_steps=12, eval_batches=1,
                    shuffle_buffer_rows=0, max_failures=2, checkpoint=CheckpointConfig(interval_steps=4, keep_latest=2),
                    optimizer=OptimizerConfig(warmup_steps=2, lr=3e-3), parallelism=ParallelismConfig(strategy="fsdp"))
SCALING = ScalingConfig(num_workers=2, cpus_per_worker=1)

# The typed configs reach the driver subprocess pickled, as they cross every other process boundary.
DRIVER = """
import pickle, sys
sys.path.insert(0, sys.argv[2])  # tests/: fixtures.training
from fixtures.training import set_flag_on_checkpoint
from llm_platform import cluster
from llm_platform.config.cluster import ClusterConfig
from llm_platform.train.launcher import launch

with open(sys.argv[1], "rb") as f:
    spec = pickle.load(f)
cluster.connect(ClusterConfig(address=spec["address"], log_to_driver=False))
launch(spec["model"], spec["train"], spec["scaling"], spec["dataset"], spec["root"], run_name=spec["name"],
       callbacks=[set_flag_on_checkpoint(spec["flag"], "checkpoint_00000004")])
"""
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), "pretrain", seq_len=32)


def wait_past_first_checkpoint(flag, run_dir: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until `flag` is set: Ray Train's controller has registered checkpoint 4 (`set_flag_on_checkpoint`), so a
    restart must resume from it, not from scratch. A checkpoint folder on disk, or a later step logged, is not
    enough: on a loaded machine the controller collects reports seconds after the workers wrote them. The wait
    wakes each second only to notice a driver subprocess that died first."""
    import ray

    registered = flag.wait.remote()
    deadline = time.monotonic() + timeout
    while not ray.wait([registered], timeout=1.0)[0]:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{run_dir}: checkpoint 4 not registered within {timeout} s")


def train_workers() -> list:
    """This Ray node's Ray Train worker processes (children of our own raylet, not another session's)."""
    import psutil
    import ray._private.worker as ray_worker

    raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def train_lines(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [line for line in map(json.loads, open(path)) if "train/loss" in line]


def assert_resumed_from_a_checkpoint(run_dir: str, fault_time: float) -> list[float]:
    """The run finished, and resumed from a checkpoint after the fault, not from scratch: the logged lines kept
    from before the fault end exactly at a checkpoint step (>= 4); every later step was logged after the fault."""
    lines = train_lines(run_dir)
    assert [line["step"] for line in lines] == list(range(2, TRAIN.max_steps + 1, 2))
    kept = [line["step"] for line in lines if line["time"] < fault_time]
    assert kept and kept == list(range(2, kept[-1] + 1, 2)), kept
    assert kept[-1] >= 4 and kept[-1] % TRAIN.checkpoint.interval_steps == 0, f"resumed from step {kept[-1]}"
    assert kept[-1] < TRAIN.max_steps, "the fault came after the run had finished"
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_00000012"))
    assert os.path.exists(os.path.join(run_dir, "export", "model.safetensors"))
    return [line["train/loss"] for line in lines]


def test_worker_sigkill_and_killed_driver_both_resume(ray_session, dataset, tmp_path, reliability_report):
    from llm_platform.train.launcher import launch

    root = str(tmp_path)

    # ---- a worker process killed from the outside mid-run
    run_dir = os.path.join(root, "runs", "worker-kill")
    outcome: dict = {}
    flag = ray_flag("worker-kill-checkpoint-4")
    thread = threading.Thread(target=lambda: outcome.update(
        result=launch(MODEL, TRAIN, SCALING, dataset, root, run_name="worker-kill",
                      callbacks=[set_flag_on_checkpoint("worker-kill-checkpoint-4", "checkpoint_00000004")])))
    thread.start()
    wait_past_first_checkpoint(flag, run_dir, 300)
    victims = train_workers()
    assert len(victims) == 2, victims
    killed_at = time.time()
    os.kill(victims[0].pid, signal.SIGKILL)
    thread.join(600)
    assert "result" in outcome, "launch did not return"
    worker_losses = assert_resumed_from_a_checkpoint(run_dir, killed_at)
    assert outcome["result"].metrics["step"] == TRAIN.max_steps
    worker_recovery = time.time() - killed_at

    # ---- the driver killed: a separate driver process on the same Ray, SIGKILLed, then `launch` again in-process
    import ray

    run_dir = os.path.join(root, "runs", "driver-kill")
    spec = {"address": ray.get_runtime_context().gcs_address, "model": MODEL, "train": TRAIN, "scaling": SCALING,
            "dataset": dataset, "root": root, "name": "driver-kill", "flag": "driver-kill-checkpoint-4"}
    spec_path = str(tmp_path / "driver-spec.pkl")
    with open(spec_path, "wb") as f:
        pickle.dump(spec, f)
    flag = ray_flag(spec["flag"])
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, spec_path, TESTS], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": spec["address"]})
    try:
        wait_past_first_checkpoint(flag, run_dir, 300, driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    killed_at = time.time()
    assert not os.path.isdir(os.path.join(run_dir, "checkpoint_00000012")), "the driver finished before the kill"
    # Its workers die with it (their controller was owned by the driver); wait for their exit so the rerun starts
    # clean.
    import psutil

    psutil.wait_procs(train_workers(), timeout=60)
    resumed = launch(MODEL, TRAIN, SCALING, dataset, root, run_name="driver-kill")
    driver_losses = assert_resumed_from_a_checkpoint(run_dir, killed_at)
    assert resumed.metrics["step"] == TRAIN.max_steps
    driver_recovery = time.time() - killed_at

    # Resume is exact: the two faulted runs trained the same model step for step.
    np.testing.assert_allclose(worker_losses, driver_losses, rtol=0, atol=2e-5)
    assert worker_losses[-1] < worker_losses[0]
    reliability_report("train: 2-worker FSDP2, 12 steps, checkpoint every 4",
                       worker_sigkill_finished_in_s=round(worker_recovery, 1),
                       driver_sigkill_rerun_finished_in_s=round(driver_recovery, 1),
                       final_step=TRAIN.max_steps, loss_max_abs_diff=float(np.max(np.abs(
                           np.array(worker_losses) - np.array(driver_losses)))))
