"""Plan a training config before launching it: parameters, FLOPs per token, memory per device, time and cost.

Time and cost are for the run the config describes (`train.max_steps` x tokens per step, or a sweep's trials x
that with `plan.sweep=true`), or for `plan.token_budget` tokens when set, at the dated prices of `plan.prices`
(on-demand and spot; llm_platform/costs.py).

Plain arithmetic over `models/flops.py`; `llm-platform plan` prints it and `llm-platform train` refuses a GPU run
whose estimate does not fit the device (unless `plan.force=true`). With `model.pretrained` set, the architecture is
the checkpoint's config.json (its family from `model_type`, its vocabulary), not the `model` preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llm_platform.config.model import ModelConfig
from llm_platform.config.prices import Market
from llm_platform.config.train import PlanConfig, ScalingConfig, TrainConfig
from llm_platform.costs import check_prices, gpu_hour_usd
from llm_platform.errors import ConfigError
from llm_platform.models import families
from llm_platform.models import serving as sizing
from llm_platform.models.build import hf_config, resolve_family
from llm_platform.models.flops import (
    GIB,
    PEAKS,
    MemoryEstimate,
    flops_per_token,
    memory_per_device,
    model_size,
    normalize_gpu,
)
from llm_platform.models.serving import ServingNeeds
from llm_platform.train.precision import compute_dtype


@dataclass
class Plan:
    """The numbers of one plan and whether the config fits."""

    parameters: int
    trainable_parameters: int
    flops_per_token: float
    tokens_per_step: int
    memory: MemoryEstimate
    device_memory_gib: float
    gpu_type: str
    num_gpus: int
    tokens: int
    """Training tokens the time and cost are for (all trials of a sweep together)."""
    tokens_from: str
    """How `tokens` was found, for the table (`train.max_steps 200 x 131,072 per step`)."""
    tokens_per_s: float
    """Assumed throughput of one run on `num_gpus` GPUs at `plan.assumed_mfu`."""
    parallel_runs: int
    """Runs at once, each on `num_gpus` GPUs (a sweep's `tune.max_concurrent_trials`; else 1)."""
    hours: float
    """Wall-clock hours."""
    gpu_hours: float
    """GPU-hours billed: tokens / throughput x GPUs."""
    gpu_hour_usd: dict[Market, float]
    """$ per GPU-hour, by market, from the price table."""
    prices_as_of: str
    prices_source: str
    problems: list[str] = field(default_factory=list)
    serving: ServingNeeds | None = None
    """What serving the model needs (GPUs per replica, backend) at `plan.serve_context` x `plan.serve_batch`."""

    @property
    def cost_usd(self) -> dict[Market, float]:
        """$ by market: GPU-hours x the price of one GPU-hour."""
        return {market: self.gpu_hours * price for market, price in self.gpu_hour_usd.items()}

    @property
    def fits(self) -> bool:
        return not self.problems

    def _groups(self) -> str:
        return f"{self.parallel_runs} x " if self.parallel_runs > 1 else ""

    def table(self) -> str:
        """A readable summary."""
        m = self.memory
        cost = self.cost_usd
        rows = [
            ("parameters", f"{self.parameters / 1e6:,.1f} M ({self.trainable_parameters / 1e6:,.1f} M trainable)"),
            ("FLOPs per token (train)", f"{self.flops_per_token / 1e9:,.3f} GFLOP"),
            ("tokens per optimizer step", f"{self.tokens_per_step:,}"),
            ("memory per device", f"{m.total / GIB:,.2f} GiB of {self.device_memory_gib:g} GiB "
                                  f"(states {m.states / GIB:.2f}, gathered {m.gathered / GIB:.2f}, activations "
                                  f"{m.activations / GIB:.2f}, logits {m.logits / GIB:.2f}, "
                                  f"overhead {m.overhead / GIB:.2f})"),
            ("tokens", f"{self.tokens:,} ({self.tokens_from})"),
            ("throughput", f"{self.tokens_per_s:,.0f} tokens/s (at the MFU of plan.assumed_mfu)"),
            (f"time on {self._groups()}{self.num_gpus} x {self.gpu_type}",
             f"{_duration(self.hours)} ({self.gpu_hours:,.2f} GPU-hours)"),
            *((f"cost {market.value.replace('_', '-')}", f"${cost[market]:,.2f} at "
               f"${self.gpu_hour_usd[market]:,.3f} per GPU-hour") for market in Market),
            ("prices", f"{self.prices_source}, as of {self.prices_as_of} (they drift; plan.prices.* overrides)"),
            ("verdict", "fits" if self.fits else "DOES NOT FIT: " + "; ".join(self.problems)),
        ]
        width = max(len(k) for k, _ in rows)
        text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
        return text + ("\n" + sizing.table(self.serving, self.gpu_type) if self.serving else "")


def _duration(hours: float) -> str:
    """`19.42 h`, or `12.5 min` under an hour."""
    return f"{hours:,.2f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def make_plan(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, plan: PlanConfig, *, seq_len: int,
              vocab_size: int, storage_root: str | None = None, sweep: SweepSize | None = None) -> Plan:
    """Estimate a run of `model` under `train`/`scaling` on `plan.num_gpus` x `plan.gpu_type`.

    Its tokens are `plan.token_budget` when set, else the configured run's: `train.max_steps` x tokens per step
    (micro-batch x grad accumulation x workers x seq_len), or with `plan.sweep` (and `sweep` given) the sweep's
    trials x that. Time = tokens x FLOPs per token / (peak x `plan.assumed_mfu` x GPUs); cost = GPU-hours x the
    price of one GPU-hour in `plan.prices`, on-demand and spot. `storage_root` resolves a `registry:` reference
    in `model.pretrained`.
    """
    gpu = normalize_gpu(plan.gpu_type)
    if gpu is None:
        raise ConfigError(f"plan.gpu_type={plan.gpu_type!r}: choose one of {', '.join(PEAKS)}")
    check_prices(plan.prices)
    spec = PEAKS[gpu]
    num_gpus = plan.num_gpus or scaling.num_workers
    config, family = architecture(model, vocab_size, storage_root)
    size = model_size(config, family.name)
    trainable = size.total
    if model.lora.enabled:
        # LoRA adds r * (in + out) per adapted matrix; about 2 * r * d per target per block is close enough here.
        targets = list(model.lora.target_modules) or list(family.lora_targets)
        trainable = 2 * model.lora.rank * size.hidden_size * len(targets) * size.num_layers
    bf16 = compute_dtype(train.parallelism.mixed_precision, on_gpu=True) == "bfloat16"  # a plan is for GPUs
    memory = memory_per_device(size, micro_batch_size=train.micro_batch_size, seq_len=seq_len, num_devices=num_gpus,
                               parallelism=train.parallelism.strategy, bf16=bf16,
                               activation_checkpointing=train.parallelism.activation_checkpointing,
                               trainable_fraction=min(1.0, trainable / size.total))
    fpt = flops_per_token(size, seq_len)
    tokens_per_step = train.micro_batch_size * train.grad_accum_steps * seq_len * num_gpus
    tokens, tokens_from, runs, parallel_runs = run_tokens(train, plan, tokens_per_step, sweep)
    tokens_per_s = spec["bf16" if bf16 else "tf32"] * plan.assumed_mfu * num_gpus / fpt
    run_hours = tokens / tokens_per_s / 3600
    problems = []
    limit = spec["memory_gib"] * plan.memory_headroom * GIB
    if memory.total > limit:
        problems.append(f"needs {memory.total / GIB:.1f} GiB per device, over {plan.memory_headroom:.0%} of the "
                        f"{gpu}'s {spec['memory_gib']} GiB: lower train.micro_batch_size, set "
                        f"train.parallelism.activation_checkpointing=true, use train.parallelism.strategy=fsdp or "
                        f"more GPUs")
    if train.parallelism.strategy == "none" and num_gpus > 1:
        problems.append("train.parallelism.strategy=none runs on one device only")
    return Plan(serving=serving_needs(config, size, plan, spec["memory_gib"]),
                parameters=size.total, trainable_parameters=int(trainable), flops_per_token=fpt,
                tokens_per_step=tokens_per_step, memory=memory, device_memory_gib=spec["memory_gib"], gpu_type=gpu,
                num_gpus=num_gpus, tokens=tokens, tokens_from=tokens_from, tokens_per_s=tokens_per_s,
                parallel_runs=parallel_runs, hours=run_hours / runs * math.ceil(runs / parallel_runs),
                gpu_hours=run_hours * num_gpus,
                gpu_hour_usd={market: gpu_hour_usd(plan.prices, gpu, market) for market in Market},
                prices_as_of=plan.prices.as_of_date, prices_source=plan.prices.source, problems=problems)


def serving_needs(config, size, plan: PlanConfig, gpu_memory_gib: float) -> ServingNeeds:
    """The serving lines of a plan, from the transformers config (GPT-2's and Llama's attribute names)."""
    def attr(*names: str, default: int) -> int:
        return int(next((v for v in (getattr(config, n, None) for n in names) if v), default))

    heads = attr("num_attention_heads", "n_head", default=1)
    kv_heads = attr("num_key_value_heads", default=heads)
    head_dim = attr("head_dim", default=size.hidden_size // heads)
    context = plan.serve_context or attr("max_position_embeddings", "n_positions", default=2048)
    return sizing.serving_needs(size.total, size.num_layers, kv_heads, head_dim, context=context,
                                batch=plan.serve_batch, gpu_memory_gib=gpu_memory_gib, usable=plan.memory_headroom)


@dataclass(frozen=True)
class SweepSize:
    """A sweep's trials and how many run at once (`tune.space.sweep_size` counts them from the tune config)."""

    trials: int
    parallel: int


def run_tokens(train: TrainConfig, plan: PlanConfig, tokens_per_step: int,
               sweep: SweepSize | None) -> tuple[int, str, int, int]:
    """(tokens of all runs, how they were found, runs, runs at once):
    `plan.token_budget`, one run of `train.max_steps`, or a sweep's trials (each to its end: ASHA stops some early,
    so this is an upper bound) run `tune.max_concurrent_trials` at a time. A space over `model.*` keys is planned
    at the base model."""
    if plan.token_budget is not None:
        return plan.token_budget, "plan.token_budget", 1, 1
    one_run = train.max_steps * tokens_per_step
    if not plan.sweep:
        return one_run, f"train.max_steps {train.max_steps:,} x {tokens_per_step:,} per step", 1, 1
    if sweep is None:
        raise ConfigError("plan.sweep=true needs the sweep's size (llm-platform plan passes it)")
    return (sweep.trials * one_run, f"{sweep.trials} trials x train.max_steps {train.max_steps:,} x "
                                    f"{tokens_per_step:,} per step, at most", sweep.trials, sweep.parallel)


def architecture(model: ModelConfig, vocab_size: int, storage_root: str | None) -> tuple[object, families.Family]:
    """(transformers config, family): the pretrained checkpoint's config.json, else one built from `model`."""
    if not model.pretrained:
        return hf_config(model, vocab_size, {"eos": 0, "pad": 1, "mask": 2}), families.get(model.family)
    from transformers import AutoConfig

    from llm_platform.models import pretrained

    record = dict(pretrained.read_config(model.pretrained, storage_root))
    family = resolve_family(model, record)
    return AutoConfig.for_model(record.pop("model_type"), **record), family
