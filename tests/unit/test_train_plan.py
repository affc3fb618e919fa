"""The planner: numbers for a preset, and a refused config."""

import pytest

from llm_platform.config import compose
from llm_platform.config.prices import Market
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError
from llm_platform.train.plan import make_plan
from llm_platform.tune.space import sweep_size


def plan_for(overrides, tune=None):
    cfg = compose("plan", overrides)
    return make_plan_for(cfg, tune)


def make_plan_for(cfg, tune=None):
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    return make_plan(cfg.model, cfg.train, cfg.scaling, cfg.plan, seq_len=cfg.data.seq_len, vocab_size=vocab,
                     sweep=sweep_size(tune) if tune is not None and cfg.plan.sweep else None)


PEAK_BF16_FLOPS = {"H100": 989.4e12, "A10G": 70e12}  # the vendors' dense bf16 peaks, as in models/flops.py


@pytest.mark.parametrize("overrides, gpu", [
    (["experiment=llama-1b-h100", "tokenizer.vocab_size=32000"], "H100"),
    (["model=llama-1b", "scaling=h100x8", "plan.gpu_type=H100"], "H100"),
    (["model=gpt2-124m", "scaling=gpu", "plan.gpu_type=A10G", "train.grad_accum_steps=4"], "A10G"),
])
def test_plan_costs_the_configured_run_at_the_tables_prices(overrides, gpu):
    cfg = compose("plan", overrides)
    plan = make_plan_for(cfg)
    assert plan.fits, plan.problems
    # tokens = steps x (micro-batch x grad accumulation x data-parallel workers x seq_len)
    workers = cfg.scaling.num_workers
    tokens = cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * workers * cfg.data.seq_len
    # throughput = peak x MFU x GPUs / FLOPs per token; cost = tokens / throughput x GPUs x $ per GPU-hour
    tokens_per_s = PEAK_BF16_FLOPS[gpu] * cfg.plan.assumed_mfu * workers / plan.flops_per_token
    hours = tokens / tokens_per_s / 3600
    table = cfg.plan.prices.gpus[gpu]
    assert plan.tokens == tokens
    assert plan.hours == pytest.approx(hours)
    assert plan.cost_usd[Market.on_demand] == pytest.approx(hours * workers * table.on_demand_usd_per_hour)
    assert plan.cost_usd[Market.spot] == pytest.approx(hours * workers * table.spot_usd_per_hour)
    printed = plan.table()
    assert f"${plan.cost_usd[Market.spot]:,.2f}" in printed and f"as of {cfg.plan.prices.as_of_date}" in printed


def test_the_1b_preset_plans_its_60k_steps_not_a_default_budget():
    plan = plan_for(["experiment=llama-1b-h100", "tokenizer.vocab_size=32000"])
    assert 0.95e9 < plan.parameters < 1.1e9
    assert plan.tokens == 60_000 * 8 * 4 * 8 * 2048  # train.max_steps x micro-batch x accum x workers x seq_len
    assert "train.max_steps 60,000" in plan.table()


def test_plan_token_budget_overrides_the_configured_run():
    plan = plan_for(["experiment=llama-1b-h100", "tokenizer.vocab_size=32000", "plan.token_budget=1000000000"])
    expected_h = 1e9 * plan.flops_per_token / (989.4e12 * 0.4 * 8) / 3600
    assert plan.tokens == 1_000_000_000 and plan.hours == pytest.approx(expected_h)
    assert "plan.token_budget" in plan.table()


def test_a_sweep_costs_its_trials_and_runs_them_max_concurrent_at_a_time():
    cfg = compose("plan", ["model=llama-1b", "scaling=h100x8", "plan.sweep=true"])
    one_run = make_plan_for(cfg, TuneConfig(num_samples=1, space={"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}))
    tune = TuneConfig(num_samples=2, max_concurrent_trials=4,
                      space={"train.seed": {"grid": [0, 1, 2]}, "train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}})
    sweep = make_plan_for(cfg, tune)
    assert sweep.tokens == 6 * one_run.tokens  # 2 samples x a 3-value grid
    assert sweep.cost_usd[Market.on_demand] == pytest.approx(6 * one_run.cost_usd[Market.on_demand])
    assert sweep.hours == pytest.approx(2 * one_run.hours)  # 6 trials, 4 at once: two waves
    assert "time on 4 x 8 x H100" in sweep.table()
    with pytest.raises(ConfigError, match=r"tune.space.train.max_steps .* plan.token_budget"):
        make_plan_for(cfg, TuneConfig(space={"train.max_steps": {"choice": [100, 200]}}))


def test_prices_are_overridden_from_the_command_line_and_checked():
    plan = plan_for(["model=llama-1b", "scaling=h100x8", "plan.prices.gpus.H100.on_demand_usd_per_hour=4",
                     "+plan.prices.instances={g7.xlarge: {gpu_type: L4, num_gpus: 1, on_demand_usd_per_hour: 0.9, "
                     "spot_usd_per_hour: 0.4}}"])
    assert plan.cost_usd[Market.on_demand] == pytest.approx(plan.gpu_hours * 4)
    with pytest.raises(ConfigError, match=r"^plan.prices.gpus.L4.spot_usd_per_hour=-1.0: a price must be"):
        plan_for(["plan.prices.gpus.L4.spot_usd_per_hour=-1"])
    with pytest.raises(Exception) as caught:
        compose("plan", ["plan.prices.market=reserved"])
    assert "full_key: plan.prices.market" in f"{caught.value} {caught.value.__cause__}"


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
    assert "cost on-demand" in refused.stdout and "cost spot" in refused.stdout and "as of" in refused.stdout
    assert "does not fit" in refused.stdout + refused.stderr
    forced = cli("plan", "experiment=llama-1b-h100", "train.parallelism.activation_checkpointing=false",
                 "train.micro_batch_size=32", "plan.force=true")
    assert forced.returncode == 0


def test_train_command_refuses_a_bad_config_before_starting_ray(tmp_path):
    from fixtures.training import make_dataset

    uri = make_dataset(str(tmp_path), "pretrain", seq_len=32)
    bad = cli("train", f"train.dataset={uri}", f"storage.root={tmp_path}", "model.max_position_embeddings=16")
    assert bad.returncode == 2
    assert "data.seq_len=32 is beyond model.max_position_embeddings=16" in bad.stdout + bad.stderr
    assert "starting a local Ray" not in bad.stdout + bad.stderr


def test_serving_needs_match_published_kv_sizes_and_pick_tensor_parallel():
    """KV cache per token in fp16, as published: Llama-2-7B 0.5 MiB (32 layers x 32 heads x 128), Llama-3-8B 128 KiB
    (8 key/value heads); a 7B at 4k context x 32 sequences needs two 80 GB GPUs, which only vllm serves."""
    from llm_platform.models.serving import kv_bytes_per_token, serving_needs

    assert kv_bytes_per_token(32, 32, 128) == 512 * 1024
    assert kv_bytes_per_token(32, 8, 128) == 128 * 1024
    seven_b = serving_needs(6_738_415_616, 32, 32, 128, context=4096, batch=32, gpu_memory_gib=80)
    assert seven_b.gpus == 2 and seven_b.backend == "vllm" and "tensor_parallel_size=2" in seven_b.reason
    assert round(seven_b.kv_gib) == 64
    small = serving_needs(6_738_415_616, 32, 32, 128, context=4096, batch=4, gpu_memory_gib=80)
    assert small.gpus == 1
    # Ranks must divide the key/value heads: 3 heads cannot go over 2 or 4 GPUs.
    assert serving_needs(70_000_000_000, 80, 3, 128, context=8192, batch=64, gpu_memory_gib=80).gpus is None


def test_plan_prints_the_serving_lines():
    from llm_platform.config import compose
    from llm_platform.train.plan import make_plan

    cfg = compose("plan", ["model=llama-1b", "plan.serve_context=1024", "plan.serve_batch=8"])
    plan = make_plan(cfg.model, cfg.train, cfg.scaling, cfg.plan, seq_len=cfg.data.seq_len,
                     vocab_size=cfg.model.vocab_size or cfg.tokenizer.vocab_size)
    assert plan.serving is not None and plan.serving.gpus == 1 and plan.serving.context == 1024
    assert "serve: GPUs per replica" in plan.table() and "1 x H100" in plan.table()
