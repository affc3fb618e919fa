"""The training loop's periodic work, in one process without Ray: which steps log, validate, checkpoint and report,
and what each report carries. Ray's two seams are replaced: `setup` by `build_worker` on the CPU (what `setup`
calls once Ray has said who and where the worker is), `report` by a recorder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures.training import make_dataset

from llm_platform import storage
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ParallelismConfig, TrainConfig
from llm_platform.data.dataset import open_dataset
from llm_platform.train import loop, worker
from llm_platform.train.precision import compute_dtype

MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=1, num_heads=2, hidden_size=16, max_position_embeddings=64)
# Validation every 2 steps, a checkpoint every 3: reports at 2 (validation), 3 (checkpoint only), 4 (validation),
# 6 (both, and the last step). Step 5 reports nothing.
TRAIN = TrainConfig(max_steps=6, micro_batch_size=2, log_interval_steps=1, eval_interval_steps=2, eval_batches=1,
                    shuffle_buffer_rows=0, checkpoint=CheckpointConfig(interval_steps=3, keep_latest=1),
                    optimizer=OptimizerConfig(warmup_steps=1, lr=3e-3), parallelism=ParallelismConfig(strategy="none"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return open_dataset(make_dataset(str(tmp_path_factory.mktemp("data")), "pretrain", seq_len=32))


def worker_config(dataset, run_uri: str) -> worker.WorkerConfig:
    return worker.WorkerConfig(
        model=MODEL, train=TRAIN, storage=storage.settings(), run_uri=run_uri,
        special={name: dataset.special_token_id(name) for name in ("eos", "pad", "mask")},
        vocab_size=dataset.vocab_size, seq_len=dataset.seq_len,
        files={split: list(dataset.files.get(split) or []) for split in ("train", "val")},
        row_groups={split: dataset.row_groups.get(split) for split in ("train", "val")}, flops_per_token=1.0,
        compute_dtype=compute_dtype(TRAIN.parallelism.mixed_precision, on_gpu=False))


@pytest.fixture
def reports(monkeypatch):
    """Run the loop on one CPU process; returns the reports it made as (metrics, checkpoint step or None)."""
    made: list[tuple[dict, int | None]] = []
    monkeypatch.setattr(worker, "TrainGauges", lambda *args, **kwargs: None)  # Prometheus gauges need Ray
    monkeypatch.setattr(loop, "setup", lambda config: worker.build_worker(
        config, rank=0, world=1, device=torch.device("cpu"), checkpoint=None))
    monkeypatch.setattr(loop, "report", lambda w, metrics, state: made.append(
        (metrics, state.step if state else None)))
    return made


def test_validation_figures_are_reported_on_validation_steps_only(dataset, reports, tmp_path):
    run_uri = str(tmp_path / "runs" / "loop")
    outcome = loop.train_loop_per_worker(worker_config(dataset, run_uri))

    assert set(outcome) == {"spend"}
    assert [(m["step"], saved) for m, saved in reports] == [(2, None), (3, 3), (4, None), (6, 6)]
    by_step = {m["step"]: m for m, _ in reports}
    # A checkpoint-only report carries no validation figures: not the step-2 ones again.
    assert not [key for key in by_step[3] if key.startswith("val/")]
    for step in (2, 4, 6):
        assert {"val/loss", "val/perplexity"} <= set(by_step[step]), step
    assert by_step[2]["val/loss"] != by_step[4]["val/loss"]  # measured again, not carried over
    assert [by_step[s]["budget/can_stop"] for s in (2, 3, 4, 6)] == [0, 1, 0, 0]

    # metrics.jsonl: a training line every step, validation lines at the validation steps only.
    lines = [json.loads(line) for line in open(os.path.join(run_uri, "metrics.jsonl"))]
    assert [line["step"] for line in lines if "train/loss" in line] == [1, 2, 3, 4, 5, 6]
    assert [line["step"] for line in lines if "val/loss" in line] == [2, 4, 6]
    val_logged = {line["step"]: line["val/loss"] for line in lines if "val/loss" in line}
    assert all(val_logged[s] == pytest.approx(by_step[s]["val/loss"]) for s in (2, 4, 6))
