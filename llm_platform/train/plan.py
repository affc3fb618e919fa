"""Plan a training config before launching it: parameters, FLOPs per token, memory per device, time and cost.

Plain arithmetic over `models/flops.py`; `llm-platform plan` prints it and `llm-platform train` refuses a GPU run
whose estimate does not fit the device (unless `plan.force=true`). With `model.pretrained` set, the architecture is
the checkpoint's config.json (its family from `model_type`, its vocabulary), not the `model` preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_platform.config.model import ModelConfig
from llm_platform.config.train import PlanConfig, ScalingConfig, TrainConfig
from llm_platform.errors import ConfigError
from llm_platform.models import families
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
    token_budget: int
    hours: float
    cost_usd: float
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """A readable summary."""
        m = self.memory
        rows = [
            ("parameters", f"{self.parameters / 1e6:,.1f} M ({self.trainable_parameters / 1e6:,.1f} M trainable)"),
            ("FLOPs per token (train)", f"{self.flops_per_token / 1e9:,.3f} GFLOP"),
            ("tokens per optimizer step", f"{self.tokens_per_step:,}"),
            ("memory per device", f"{m.total / GIB:,.2f} GiB of {self.device_memory_gib:g} GiB "
                                  f"(states {m.states / GIB:.2f}, gathered {m.gathered / GIB:.2f}, activations "
                                  f"{m.activations / GIB:.2f}, logits {m.logits / GIB:.2f}, "
                                  f"overhead {m.overhead / GIB:.2f})"),
            ("token budget", f"{self.token_budget:,}"),
            (f"time on {self.num_gpus} x {self.gpu_type}", f"{self.hours:,.2f} h"),
            ("cost", f"${self.cost_usd:,.2f}"),
            ("verdict", "fits" if self.fits else "DOES NOT FIT: " + "; ".join(self.problems)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def make_plan(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, plan: PlanConfig, *, seq_len: int,
              vocab_size: int, storage_root: str | None = None) -> Plan:
    """Estimate a run of `model` under `train`/`scaling` on `plan.num_gpus` x `plan.gpu_type`.

    `storage_root` resolves a `registry:` reference in `model.pretrained`.
    """
    gpu = normalize_gpu(plan.gpu_type)
    if gpu is None:
        raise ConfigError(f"plan.gpu_type={plan.gpu_type!r}: choose one of {', '.join(PEAKS)}")
    spec = PEAKS[gpu]
    num_gpus = plan.num_gpus or scaling.num_workers
    config, family = architecture(model, vocab_size, storage_root)
    size = model_size(config, family.name)
    trainable = size.total
    if model.lora.enabled:
        # LoRA adds r * (in + out) per adapted matrix; about 2 * r * d per target per block is close enough here.
        targets = list(model.lora.target_modules) or list(family.lora_targets)
        trainable = 2 * model.lora.rank * size.hidden_size * len(targets) * size.num_layers
    bf16 = train.parallelism.mixed_precision != "fp32"
    memory = memory_per_device(size, micro_batch_size=train.micro_batch_size, seq_len=seq_len, num_devices=num_gpus,
                               parallelism=train.parallelism.strategy, bf16=bf16,
                               activation_checkpointing=train.parallelism.activation_checkpointing,
                               trainable_fraction=min(1.0, trainable / size.total))
    fpt = flops_per_token(size, seq_len)
    seconds = plan.token_budget * fpt / (spec["bf16" if bf16 else "tf32"] * plan.assumed_mfu * num_gpus)
    hours = seconds / 3600
    price = plan.gpu_hour_usd if plan.gpu_hour_usd is not None else spec["usd_per_hour"]
    problems = []
    limit = spec["memory_gib"] * plan.memory_headroom * GIB
    if memory.total > limit:
        problems.append(f"needs {memory.total / GIB:.1f} GiB per device, over {plan.memory_headroom:.0%} of the "
                        f"{gpu}'s {spec['memory_gib']} GiB: lower train.micro_batch_size, set "
                        f"train.parallelism.activation_checkpointing=true, use train.parallelism.strategy=fsdp or "
                        f"more GPUs")
    if train.parallelism.strategy == "none" and num_gpus > 1:
        problems.append("train.parallelism.strategy=none runs on one device only")
    return Plan(parameters=size.total, trainable_parameters=int(trainable), flops_per_token=fpt,
                tokens_per_step=train.micro_batch_size * train.grad_accum_steps * seq_len * num_gpus,
                memory=memory, device_memory_gib=spec["memory_gib"], gpu_type=gpu, num_gpus=num_gpus,
                token_budget=plan.token_budget, hours=hours, cost_usd=hours * num_gpus * price, problems=problems)


def architecture(model: ModelConfig, vocab_size: int, storage_root: str | None) -> tuple[object, families.Family]:
    """(transformers config, family): the pretrained checkpoint's config.json, else one built from `model`."""
    if not model.pretrained:
        return hf_config(model, vocab_size, {"eos": 0, "pad": 1, "mask": 2}), families.get(model.family)
    from transformers import AutoConfig

    from llm_platform.models import pretrained

    record = dict(pretrained.read_config(model.pretrained, storage_root))
    family = resolve_family(model, record)
    return AutoConfig.for_model(record.pop("model_type"), **record), family
