"""Training modes beside the FSDP path of test_train_pretrain.py, each checked against a plain PyTorch loop.

- DDP with 2 workers (and 2 accumulated micro-batches, so `no_sync` is used) matches the plain loop; a new run
  seeded with its step-2 checkpoint (`train.checkpoint.resume_from`, another run name, a single process with another
  micro-batch shape) continues at step 3 with the same losses and ends with the same weights.
- A diverging run (a learning rate of 1e30) stops with `train.on_nonfinite_loss=stop`: `llm-platform train` exits 2
  naming the step, and the run folder has no export and no lineage record (it is not a finished run).
- With `train.on_nonfinite_loss=skip`, a step whose loss and gradients are NaN (the test wraps the workers' loss)
  is skipped and the run goes on exactly as a plain loop that skips that update.
  That run also logs to MLflow (a file store): params and the finite losses, run finished. Sentinel secrets
  (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, LLM_PLATFORM_API_KEYS...) in the driver's environment during it appear in
  no file of Ray's session folder afterwards.
- `train.checkpoint.resume_from` is checked before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures.fake_secrets import files_containing, ray_session_dir, sentinel_secrets
from fixtures.training import make_dataset, plain_pytorch_run

from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ParallelismConfig, ScalingConfig, TrainConfig
from llm_platform.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=64)
# 8 rows per step: 2 workers x 2 rows x 2 micro-batches. Checkpoints at steps 2 and 4, validation at 4.
DDP = TrainConfig(max_steps=4, micro_batch_size=2, grad_accum_steps=2, log_interval_steps=1, eval_interval_steps=4,
                  eval_batches=1, shuffle_buffer_rows=0, checkpoint=CheckpointConfig(interval_steps=2, keep_latest=2),
                  optimizer=OptimizerConfig(warmup_steps=2, lr=3e-3), parallelism=ParallelismConfig(strategy="ddp"))
# One process, 4 rows per step, no validation until the end.
SINGLE = TrainConfig(max_steps=4, micro_batch_size=4, log_interval_steps=1, eval_interval_steps=4, eval_batches=1,
                     shuffle_buffer_rows=0, checkpoint=CheckpointConfig(interval_steps=4, keep_latest=1),
                     optimizer=OptimizerConfig(warmup_steps=0, lr=3e-3), parallelism=ParallelismConfig(strategy="none"))


def poisoned_loop(poison_step: int):
    """The workers' loop with the loss of step `poison_step` (1-based) times NaN before backward, so its gradients
    too. The platform has no such switch: this wraps train/step.py's `loss_sum` inside the worker process (the
    nested function is pickled by value with the trainer)."""
    def train_fn(config):
        from llm_platform.train import loop, step

        real, calls = step.loss_sum, [0]

        def loss_sum(logits, targets):
            calls[0] += 1  # one call per step with 1 worker and 1 micro-batch; validation comes after the last step
            loss = real(logits, targets)
            return loss * float("nan") if calls[0] == poison_step else loss

        step.loss_sum = loss_sum
        return loop.train_loop_per_worker(config)

    return train_fn


def plain_pytorch_losses(dataset_uri: str, tc: TrainConfig, global_batch: int, *, poison_step: int | None = None):
    return plain_pytorch_run(dataset_uri, MODEL, tc, global_batch, poison_step=poison_step)


def logged(run_dir: str, key: str = "train/loss") -> dict[int, float | None]:
    """step -> value of `key` in the run's metrics.jsonl (None where it was not finite)."""
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {line["step"]: line[key] for line in lines if key in line}


def exported_weights(export_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(export_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), "pretrain", seq_len=32)


@pytest.mark.ray
@pytest.mark.slow
def test_ddp_matches_plain_pytorch_and_resume_from_continues_it(ray_session, dataset, tmp_path):
    from llm_platform.train.launcher import launch

    root = str(tmp_path)
    first = launch(MODEL, DDP, ScalingConfig(num_workers=2), dataset, root, run_name="ddp")
    _, reference = plain_pytorch_losses(dataset, DDP, global_batch=8)
    ddp_dir = os.path.join(root, "runs", "ddp")
    losses = logged(ddp_dir)
    assert list(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(losses.values()), reference, rtol=0, atol=2e-5)
    assert reference[-1] < reference[0]
    assert sorted(d for d in os.listdir(ddp_dir) if d.startswith("checkpoint_0")) == [
        "checkpoint_00000002", "checkpoint_00000004"]

    # A new run seeded with the step-2 checkpoint: one process, 2 rows x 4 micro-batches (the same 8 rows a step;
    # the data position is converted from the checkpoint's 4-row global micro-batches to 2-row ones).
    source = os.path.join(ddp_dir, "checkpoint_00000002")
    seeded = dataclasses.replace(DDP, micro_batch_size=2, grad_accum_steps=4,
                                 parallelism=ParallelismConfig(strategy="none"),
                                 checkpoint=dataclasses.replace(DDP.checkpoint, resume_from=source))
    second = launch(MODEL, seeded, ScalingConfig(num_workers=1), dataset, root, run_name="seeded")
    resumed = logged(os.path.join(root, "runs", "seeded"))
    assert list(resumed) == [3, 4]  # it continued at step 3: no step was trained twice
    np.testing.assert_allclose(list(resumed.values()), [losses[3], losses[4]], rtol=0, atol=1e-5)
    assert second.lineage["run"]["config"]["train"]["checkpoint"]["resume_from"] == source
    ours, theirs = exported_weights(second.export_uri), exported_weights(first.export_uri)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.ray
@pytest.mark.slow
def test_diverging_run_stops_and_the_cli_exits_2_naming_the_step(ray_session, dataset, tmp_path):
    diverging = dataclasses.replace(SINGLE, optimizer=dataclasses.replace(SINGLE.optimizer, lr=1e30))
    _, reference = plain_pytorch_losses(dataset, diverging, global_batch=SINGLE.micro_batch_size)
    first_bad = next(i + 1 for i, loss in enumerate(reference) if not math.isfinite(loss))
    assert first_bad < SINGLE.max_steps

    root = str(tmp_path / "store")
    overrides = [f"storage.root={root}", f"train.dataset={dataset}", "train.run_name=diverged",
                 f"model.name={MODEL.name}", f"model.hidden_size={MODEL.hidden_size}",
                 f"model.max_position_embeddings={MODEL.max_position_embeddings}", "scaling.num_workers=1",
                 *(f"train.{k}={getattr(diverging, k)}" for k in (
                     "max_steps", "micro_batch_size", "log_interval_steps", "eval_interval_steps",
                     "shuffle_buffer_rows")),
                 f"train.checkpoint.interval_steps={diverging.checkpoint.interval_steps}",
                 f"train.optimizer.warmup_steps={diverging.optimizer.warmup_steps}",
                 f"train.optimizer.lr={diverging.optimizer.lr}",
                 f"train.parallelism.strategy={diverging.parallelism.strategy}"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "llm_platform", "train", *overrides], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    named = rf"the loss became non-finite \((nan|inf|-inf)\) at step {first_bad} of train\.max_steps=4"
    assert re.search(named, out), out[-4000:]
    assert "train.on_nonfinite_loss=skip" in out

    run_dir = os.path.join(root, "runs", "diverged")
    losses = logged(run_dir)
    assert list(losses) == list(range(1, first_bad + 1)) and losses[first_bad] is None
    assert all(math.isfinite(losses[s]) for s in range(1, first_bad))
    assert not os.path.exists(os.path.join(run_dir, "lineage.json"))  # not recorded as a finished run
    assert not os.path.exists(os.path.join(run_dir, "export"))


@pytest.mark.ray
@pytest.mark.slow
def test_skip_drops_the_nonfinite_step_and_training_goes_on(ray_session, dataset, tmp_path, monkeypatch,
                                                           reliability_report):
    from mlflow.tracking import MlflowClient

    from llm_platform.train import launcher
    from llm_platform.train.launcher import launch

    monkeypatch.setattr(launcher, "_train_fn", lambda: poisoned_loop(2))
    # The run also logs to MLflow (a file store; the env var reaches rank 0 through the workers' runtime env).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # Secrets in the driver's environment must reach no file of Ray's session (runtime envs are logged there).
    sentinels = sentinel_secrets()
    for name, value in sentinels.items():
        monkeypatch.setenv(name, value)
    mlflow_uri = f"file://{tmp_path / 'mlruns'}"
    poisoned = dataclasses.replace(SINGLE, on_nonfinite_loss="skip", mlflow_tracking_uri=mlflow_uri)
    result = launch(MODEL, poisoned, ScalingConfig(num_workers=1), dataset, str(tmp_path), run_name="skip")
    _, reference = plain_pytorch_losses(dataset, poisoned, global_batch=SINGLE.micro_batch_size, poison_step=2)
    losses = logged(result.run_uri)
    assert list(losses) == [1, 2, 3, 4] and losses[2] is None
    # The NaN gradients reached neither the weights nor the next step (they would make every later loss NaN).
    np.testing.assert_allclose([losses[s] for s in (1, 3, 4)], [reference[i] for i in (0, 2, 3)], rtol=0, atol=2e-5)
    assert result.export_uri and os.path.exists(os.path.join(result.export_uri, "model.safetensors"))
    assert os.path.exists(os.path.join(result.run_uri, "lineage.json"))

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("llm-platform").experiment_id])
    assert run.info.run_name == "skip" and run.info.status == "FINISHED"
    assert run.data.params["train.on_nonfinite_loss"] == "skip"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == {s: losses[s] for s in (1, 3, 4)}  # the NaN step is not sent

    leaks = files_containing(ray_session_dir(), list(sentinels.values()))
    reliability_report("secrets: sentinel secrets in the driver's env during a training run",
                       secrets_set=len(sentinels), files_in_ray_session_with_a_secret=len(leaks))
    assert not leaks, {path: [n for n, v in sentinels.items() if v in found] for path, found in leaks.items()}


def test_resume_from_is_checked_before_any_worker_starts(tmp_path):
    from llm_platform.train import checkpoint as ckpt
    from llm_platform.train.checks import check_resume_from

    folder = tmp_path / "checkpoint_00000003"
    def resuming(uri: str) -> TrainConfig:
        return dataclasses.replace(SINGLE, checkpoint=dataclasses.replace(SINGLE.checkpoint, resume_from=uri))

    with pytest.raises(ConfigError, match="train.checkpoint.resume_from=.*train_state.json is missing"):
        check_resume_from(resuming(str(folder)), ScalingConfig(num_workers=1))
    folder.mkdir()
    # 3 global micro-batches of 2 workers x 2 rows: 12 rows into the epoch.
    state = {"step": 3, "epoch": 0, "batches_in_epoch": 3, "rows_per_batch": 4, "tokens": 0}
    (folder / "train_state.json").write_text(json.dumps(state))
    at = resuming(str(folder))
    check_resume_from(dataclasses.replace(at, micro_batch_size=3), ScalingConfig(num_workers=2))  # 6-row batches
    assert ckpt.data_position(state, 6) == 2 and ckpt.data_position(state, 1) == 12
    with pytest.raises(ConfigError, match="train.micro_batch_size \\* scaling.num_workers = 8"):
        check_resume_from(dataclasses.replace(at, micro_batch_size=8), ScalingConfig(num_workers=1))
    with pytest.raises(ConfigError, match="at step 3, not below train.max_steps=3"):
        check_resume_from(dataclasses.replace(at, max_steps=3), ScalingConfig(num_workers=1))
