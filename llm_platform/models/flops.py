"""Model arithmetic: parameters, training FLOPs per token, memory per device, MFU, and a peaks table.

Parameters are counted exactly by building the architecture on the `meta` device (no memory, milliseconds even at
1B). FLOPs follow the PaLM/nanoGPT convention: 6 FLOPs per matmul parameter per token (forward + backward) plus
12 * layers * width * context for attention scores; embedding lookups are free, a tied LM head is not.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense peak throughput (FLOP/s, no sparsity) and memory per device, from the vendors' data sheets (SXM parts where
# there are several); keys are Ray's accelerator types, so `scaling.gpu_type` is one name for placement and MFU.
# A10G (AWS's A10 variant): NVIDIA publishes no sheet; its tensor rate is about 70 TFLOPS (Baseten's A10 vs A10G
# comparison), against the A10's 125. Prices are not here: they are dated config, `plan.prices`
# (llm_platform/config/prices.py).
PEAKS: dict[str, dict[str, float]] = {
    "A10G": {"bf16": 70e12, "fp32": 35e12, "tf32": 35e12, "memory_gib": 24},
    "L4": {"bf16": 121e12, "fp32": 30.3e12, "tf32": 60e12, "memory_gib": 24},
    "L40S": {"bf16": 362.05e12, "fp32": 91.6e12, "tf32": 183e12, "memory_gib": 48},
    "A100-40G": {"bf16": 312e12, "fp32": 19.5e12, "tf32": 156e12, "memory_gib": 40},
    "A100-80G": {"bf16": 312e12, "fp32": 19.5e12, "tf32": 156e12, "memory_gib": 80},
    "H100": {"bf16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12, "memory_gib": 80},
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12, "memory_gib": 141},
}
# Device names (torch.cuda.get_device_name, Ray accelerator types, what people type) -> table key. Checked in
# order: "L40S" before "L4", "A100" before "A10", and an A100 without "40G" in its name is the 80 GB part.
_NAMES = (("H200", "H200"), ("H100", "H100"), ("A100-40G", "A100.*40G"), ("A100-80G", "A100"), ("L40S", "L40S"),
          ("L4", r"\bL4\b"), ("A10G", "A10G"))

GIB = 1024**3


@dataclass
class ModelSize:
    """Parameter counts of an architecture."""

    total: int
    """All parameters (tied weights once)."""
    matmul: int
    """Parameters that take part in a matmul per token (excludes embedding lookups; includes a tied LM head)."""
    num_layers: int
    """Blocks that attend (encoder plus decoder for t5)."""
    hidden_size: int
    """Model width."""
    block_params: int
    """Parameters of one block (the unit FSDP2 gathers)."""
    vocab_size: int
    """Vocabulary size."""


def model_size(hf_config, family: str) -> ModelSize:
    """Exact parameter counts of the model for `hf_config`, built on the meta device."""
    import torch
    import torch.nn as nn

    from llm_platform.models import families
    from llm_platform.models.build import transformer_blocks

    cls = families.model_class(families.get(family))
    make = getattr(cls, "from_config", None) or cls._from_config
    with torch.device("meta"):
        model = make(hf_config)
    seen: set[int] = set()
    total = embedding = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if isinstance(module, nn.Embedding):
                embedding += p.numel()
    vocab = hf_config.vocab_size
    width = getattr(hf_config, "hidden_size", None) or hf_config.d_model
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    matmul = total - embedding + (vocab * width if tied else 0)
    blocks = transformer_blocks(model)
    block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    return ModelSize(total=total, matmul=matmul, num_layers=len(blocks), hidden_size=width,
                     block_params=block_params, vocab_size=vocab)


def flops_per_token(size: ModelSize, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L d T."""
    return 6.0 * size.matmul + 12.0 * size.num_layers * size.hidden_size * seq_len


def peak_flops(gpu_type: str | None, precision: str = "bf16") -> float | None:
    """Peak FLOP/s of one device, or None for an unknown device (CPUs have no entry)."""
    key = normalize_gpu(gpu_type)
    return PEAKS[key][precision] if key else None


def normalize_gpu(name: str | None) -> str | None:
    """Table key for a device name such as `NVIDIA H100 80GB HBM3`, `A100-SXM4-40GB` or `NVIDIA L4`, else None."""
    import re

    if not name:
        return None
    upper = name.upper()
    for key, pattern in _NAMES:
        if re.search(pattern, upper):
            return key
    return None


def mfu(tokens_per_s: float, flops_token: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' peak (None when the peak is unknown)."""
    if not peak or num_devices <= 0:
        return None
    return tokens_per_s * flops_token / (peak * num_devices)


@dataclass
class MemoryEstimate:
    """Bytes per device, by kind."""

    states: float
    """Parameters, gradients and AdamW moments (fp32), after sharding."""
    gathered: float
    """Unsharded parameters of the blocks being computed (FSDP2 prefetches one ahead)."""
    activations: float
    """Activations kept for the backward pass of one micro-batch."""
    logits: float
    """Logits and their gradient for one micro-batch."""
    overhead: float
    """Runtime context and allocator slack (a fixed allowance)."""

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.activations + self.logits + self.overhead


def memory_per_device(size: ModelSize, *, micro_batch_size: int, seq_len: int, num_devices: int,
                      parallelism: str, bf16: bool, activation_checkpointing: bool,
                      trainable_fraction: float = 1.0, overhead_gib: float = 1.0) -> MemoryEstimate:
    """An estimate of peak training memory on one device.

    Activations use Korthikanti et al. (2022): about 34 * d bytes per token per layer in 16-bit with a fused
    attention kernel; with activation checkpointing only each block's input (2 * d bytes) is kept, plus one
    block's full activations during its recompute. fp32 doubles them.
    """
    shards = num_devices if parallelism == "fsdp" else 1
    trainable = size.total * trainable_fraction
    frozen = size.total - trainable
    # fp32 master weights + grads + two AdamW moments for what trains; fp32 weights for what is frozen.
    states = (16.0 * trainable + 4.0 * frozen) / shards
    bytes_act = 2.0 if bf16 else 4.0
    gathered = 2 * size.block_params * bytes_act if parallelism == "fsdp" else 0.0
    tokens = micro_batch_size * seq_len
    per_layer_full = 17.0 * bytes_act * size.hidden_size * tokens  # 34 d bytes at 16-bit
    if activation_checkpointing:
        activations = size.num_layers * bytes_act * size.hidden_size * tokens + per_layer_full
    else:
        activations = size.num_layers * per_layer_full
    logits = tokens * size.vocab_size * (4.0 + 4.0 + (2.0 if bf16 else 0.0))
    return MemoryEstimate(states=states, gathered=gathered, activations=activations, logits=logits,
                          overhead=overhead_gib * GIB)
