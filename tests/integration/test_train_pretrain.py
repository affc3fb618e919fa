"""Causal LM pretraining through Ray Train: 2-worker FSDP2 (gloo) against a single-process plain PyTorch loop.

One run covers the distributed path end to end: its per-step losses must match the plain loop, only the newest
checkpoint is kept, and the HF export reloads with the weights of the plain loop. (A worker or driver killed
mid-run, and the exact resume: tests/reliability/test_train_faults.py.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from fixtures.training import make_dataset, plain_pytorch_run, read_rows

from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ParallelismConfig, ScalingConfig, TrainConfig
from llm_platform.data.dataset import open_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=64)
# Reports at steps 2, 3 (checkpoint), 4, 6 (checkpoint).
TRAIN = TrainConfig(max_steps=6, micro_batch_size=4, log_interval_steps=1, eval_interval_steps=2, eval_batches=1,
                    shuffle_buffer_rows=0, max_failures=0, checkpoint=CheckpointConfig(interval_steps=3, keep_latest=1),
                    optimizer=OptimizerConfig(warmup_steps=2, lr=3e-3), parallelism=ParallelismConfig(strategy="fsdp"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), "pretrain", seq_len=32)


def test_fsdp_run_matches_plain_pytorch(ray_session, dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    from llm_platform.train.launcher import launch

    root = str(tmp_path)
    result = launch(MODEL, TRAIN, ScalingConfig(num_workers=2, cpus_per_worker=1), dataset, root, run_name="fsdp")
    reference_model, reference = plain_pytorch_run(dataset, MODEL, TRAIN, global_batch=2 * TRAIN.micro_batch_size)

    run_dir = os.path.join(root, "runs", "fsdp")
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train_lines = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([line["train/loss"] for line in train_lines], reference, rtol=0, atol=2e-5)
    assert reference[-1] < reference[0]
    assert all(line["perf/tokens_per_s"] > 0 for line in train_lines)
    assert [line["step"] for line in lines if "val/loss" in line] == [2, 4, 6]

    # Only the newest checkpoint is kept, and it is the result's.
    checkpoints = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0"))
    assert checkpoints == ["checkpoint_00000006"]
    assert result.checkpoint_uri.endswith("checkpoint_00000006")

    # The export is a plain HF folder whose weights are the plain loop's (up to float reduction order).
    export = result.export_uri
    assert {"config.json", "model.safetensors", "tokenizer.json", "lineage.json"} <= set(os.listdir(export))
    exported = AutoModelForCausalLM.from_pretrained(export, use_safetensors=True)
    batch = torch.as_tensor(read_rows(dataset, "val")["input_ids"][:8])
    with torch.no_grad():
        ours = exported(input_ids=batch, labels=batch).loss.item()
        theirs = reference_model(input_ids=batch, labels=batch).loss.item()
    assert abs(ours - theirs) < 1e-4

    lineage = json.load(open(os.path.join(run_dir, "lineage.json")))
    assert lineage["kind"] == "run"
    assert lineage["dataset"]["fingerprint"] == open_dataset(dataset).fingerprint
    assert lineage["run"]["name"] == "fsdp" and lineage["run"]["config"]["train"]["max_steps"] == 6
    assert abs(lineage["run"]["metrics"]["val/loss"] - result.metrics["val/loss"]) < 1e-12
    assert json.load(open(os.path.join(export, "lineage.json")))["run"]["name"] == "fsdp"

    # Launching the finished run again with the same config returns it without training.
    again = launch(MODEL, TRAIN, ScalingConfig(num_workers=2, cpus_per_worker=1), dataset, root, run_name="fsdp")
    assert again.checkpoint_uri == result.checkpoint_uri and again.metrics == result.metrics
