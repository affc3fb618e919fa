"""Budgets that stop work (issue #26), on the local Ray with CPU workers priced by `plan.prices.cpu`.

- A run whose `train.budget.max_cost_usd` runs out mid-way stops at a checkpoint with a message naming the key; no
  export, no lineage (it is not finished). The same run with the budget raised resumes from that checkpoint, trains
  only the steps left, with the losses an uninterrupted run has (a plain PyTorch loop, fixtures/training.py), and
  records what it spent in all (both attempts) in lineage.json.
- A sweep whose `tune.budget.max_cost_usd` runs out launches no further trial: the trial running stops at its next
  checkpoint and the sweep finishes with what ran, saying so in sweep.json.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from fixtures.training import make_dataset, plain_pytorch_run

from llm_platform.config.model import ModelConfig
from llm_platform.config.train import (
    BudgetConfig,
    CheckpointConfig,
    OptimizerConfig,
    ParallelismConfig,
    ScalingConfig,
    TrainConfig,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32, max_position_embeddings=64)
# One process, 4 rows a step; checkpoints only every 3 steps, so a stop at step 1 is the budget's own checkpoint.
RUN = TrainConfig(max_steps=5, micro_batch_size=4, log_interval_steps=1, eval_interval_steps=5, eval_batches=1,
                  shuffle_buffer_rows=0, checkpoint=CheckpointConfig(interval_steps=3, keep_latest=3),
                  optimizer=OptimizerConfig(warmup_steps=0, lr=3e-3), parallelism=ParallelismConfig(strategy="none"))
# Any step on a CPU worker costs more than this (1 vCPU at $0.0446/hour: ~1e-5 $ a second).
TINY_USD = 1e-9


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), "pretrain", seq_len=32)


def logged(run_dir: str, key: str = "train/loss") -> dict[int, float]:
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {line["step"]: line[key] for line in lines if key in line}


def test_a_spent_budget_stops_at_a_checkpoint_and_a_raised_one_resumes(ray_session, dataset, tmp_path):
    from llm_platform.train.launcher import BudgetReached, launch

    root = str(tmp_path)
    capped = dataclasses.replace(RUN, budget=BudgetConfig(max_cost_usd=TINY_USD))
    with pytest.raises(BudgetReached) as stopped:
        launch(MODEL, capped, ScalingConfig(num_workers=1), dataset, root, run_name="capped")
    message = str(stopped.value)
    assert "stopped at step 1 of train.max_steps=5" in message
    assert "train.budget.max_cost_usd=1e-09" in message and "checkpoint_00000001" in message
    run_dir = os.path.join(root, "runs", "capped")
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_00000001"))
    assert not os.path.exists(os.path.join(run_dir, "lineage.json"))  # not a finished run
    assert not os.path.exists(os.path.join(run_dir, "export"))
    with open(os.path.join(run_dir, "checkpoint_00000001", "train_state.json")) as f:
        saved = json.load(f)
    assert saved["step"] == 1 and saved["cost_usd"] >= TINY_USD and saved["gpu_hours"] == 0.0

    # Raised: the same command resumes at step 2 (the budget is not part of what the run trains).
    raised = dataclasses.replace(RUN, budget=BudgetConfig(max_cost_usd=100.0))
    result = launch(MODEL, raised, ScalingConfig(num_workers=1), dataset, root, run_name="capped")
    losses = logged(run_dir)
    assert list(losses) == [1, 2, 3, 4, 5]
    _, reference = plain_pytorch_run(dataset, MODEL, RUN, RUN.micro_batch_size)
    np.testing.assert_allclose(list(losses.values()), reference, rtol=0, atol=2e-5)

    cost = result.lineage["cost"]
    assert cost["cost_usd"] > saved["cost_usd"] and cost["hours"] > saved["hours"]  # both attempts counted
    assert cost["budget"] == {"max_cost_usd": 100.0, "max_gpu_hours": None}
    assert cost["prices_as_of"] and cost["market"] == "on_demand"
    assert "budget" not in result.lineage["run"]["config"]["train"]
    spent = logged(run_dir, "cost/usd")
    assert all(b >= a for a, b in zip(list(spent.values()), list(spent.values())[1:]))  # it only grows


def test_a_sweep_over_budget_launches_no_more_trials(ray_session, dataset, tmp_path):
    from llm_platform.config.tune import TuneBudgetConfig, TuneConfig
    from llm_platform.tune.driver import run_sweep

    root = str(tmp_path / "store")
    # Reports at step 2 (validation) and 4 (validation, the only checkpoint, the last step): the budget is reached at
    # the first trial's first report, whose next checkpoint is its last, so it finishes; no other trial starts.
    train = dataclasses.replace(RUN, max_steps=4, eval_interval_steps=2, checkpoint=CheckpointConfig(interval_steps=4))
    cfg = TuneConfig(name="capped-sweep", space={"train.optimizer.lr": {"grid": [3e-3, 1e-3, 3e-4]}}, num_samples=1,
                     max_concurrent_trials=1, scheduler="fifo", budget=TuneBudgetConfig(max_cost_usd=TINY_USD))
    result = run_sweep(cfg, MODEL, train, ScalingConfig(num_workers=1), dataset, root, register=False)

    record = result.record["budget"]
    assert record["trials_launched"] == 1 and record["trials_planned"] == 3
    assert "tune.budget.max_cost_usd=1e-09" in record["stopped"]
    assert record["spent"]["usd"] >= TINY_USD
    (trial,) = result.trials
    assert result.record["cost"]["usd"] == pytest.approx(trial.last("cost/usd"))  # one trial: its run's cost
    assert trial.status == "finished" and [r["step"] for r in trial.reports] == [2, 4]
    assert result.winner is not None and result.winner.trial_id == trial.trial_id
    assert os.path.exists(os.path.join(result.winner.export_uri, "model.safetensors"))
    with open(os.path.join(root, "sweeps", "capped-sweep", "budget.json")) as f:
        assert json.load(f)["reached"] == record["stopped"]
