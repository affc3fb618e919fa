"""The planner: numbers for a preset, and a refused config."""

import pytest

from llm_platform.config import compose
from llm_platform.errors import ConfigError
from llm_platform.train.plan import make_plan


def plan_for(overrides):
    cfg = compose("plan", overrides)
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    return make_plan(cfg.model, cfg.train, cfg.scaling, cfg.plan, seq_len=cfg.data.seq_len, vocab_size=vocab)


def test_llama_1b_on_8_h100_fits_and_costs_what_the_arithmetic_says():
    plan = plan_for(["experiment=llama-1b-h100", "tokenizer.vocab_size=32000"])
    assert 0.95e9 < plan.parameters < 1.1e9
    assert plan.fits, plan.problems
    # time = tokens * FLOPs/token / (peak * MFU * GPUs); cost = hours * GPUs * price
    expected_h = 1e9 * plan.flops_per_token / (989.4e12 * 0.4 * 8) / 3600
    assert plan.hours == pytest.approx(expected_h)
    assert plan.cost_usd == pytest.approx(expected_h * 8 * 3.0)
    assert "fits" in plan.table()


def test_a_config_that_cannot_fit_is_refused_with_the_reason():
    plan = plan_for(["experiment=llama-1b-h100", "tokenizer.vocab_size=32000",
                     "train.parallelism.activation_checkpointing=false", "train.micro_batch_size=32"])
    assert not plan.fits
    assert "GiB per device" in plan.problems[0] and "train.micro_batch_size" in plan.problems[0]


def test_unknown_gpu_names_the_key():
    with pytest.raises(ConfigError, match="plan.gpu_type"):
        plan_for(["plan.gpu_type=TPU"])


def cli(*args, timeout=300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llm_platform", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_plan_command_prints_the_plan_and_refuses_what_cannot_fit():
    # (A config that fits: the tests above, in process. Each CLI run here is a fresh interpreter, ~10 s.)
    refused = cli("plan", "experiment=llama-1b-h100", "train.parallelism.activation_checkpointing=false",
                  "train.micro_batch_size=32")
    assert refused.returncode == 2
    assert "FLOPs per token" in refused.stdout and "verdict" in refused.stdout  # the plan is printed, then refused
    assert "does not fit" in refused.stdout + refused.stderr
    forced = cli("plan", "experiment=llama-1b-h100", "train.parallelism.activation_checkpointing=false",
                 "train.micro_batch_size=32", "plan.force=true")
    assert forced.returncode == 0


def test_train_command_refuses_a_bad_config_before_starting_ray(tmp_path):
    from train_fixtures import make_dataset

    uri = make_dataset(str(tmp_path), "pretrain", seq_len=32)
    bad = cli("train", f"train.dataset={uri}", f"storage.root={tmp_path}", "model.max_position_embeddings=16")
    assert bad.returncode == 2
    assert "data.seq_len=32 is beyond model.max_position_embeddings=16" in bad.stdout + bad.stderr
    assert "starting a local Ray" not in bad.stdout + bad.stderr
