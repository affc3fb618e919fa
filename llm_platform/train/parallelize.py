"""Apply parallelism to a plain Hugging Face model from outside, in a fixed order (as torchtitan does):

    1. activation checkpointing   per block, before compile and sharding so the recompute covers the whole block
    2. torch.compile              per block (nn.Module.compile keeps parameter names, so checkpoints do not change)
    3. FSDP2 fully_shard          per block, then the root (embeddings, final norm, LM head); or DDP; or nothing

The model code never knows about any of this. Parameter names stay those of the plain model in every mode, so a
checkpoint written under FSDP2 loads into DDP, a single process, or the driver's export.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from llm_platform.models.build import transformer_blocks


def resolve_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype: `auto` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and not what we test)."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if mixed_precision not in ("bf16", "fp32"):
        raise ValueError(f"train.parallelism.mixed_precision={mixed_precision!r}: choose auto, bf16 or fp32")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def parallelize(model: torch.nn.Module, *, parallelism: str, device: torch.device, compute_dtype: torch.dtype,
                activation_checkpointing: bool = False, compile: bool = False, cpu_offload: bool = False,
                world_size: int = 1) -> torch.nn.Module:
    """Return the model ready to train on `device` under `parallelism` (fsdp, ddp or none).

    Weights stay fp32 (the optimizer's master copy); bf16 is the compute dtype: FSDP2 casts gathered parameters to
    it and reduces gradients in fp32, while DDP and single-process runs use autocast in the loop.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}")

    # 1. Activation checkpointing. HF's own hook wraps each block's forward in torch.utils.checkpoint without
    # renaming modules (checkpoint_wrapper would insert `_checkpoint_wrapped_module` into every FQN).
    if activation_checkpointing:
        hf: Any = model  # an HF or peft model, its methods duck-typed (nn.Module's __getattr__ says Tensor)
        base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()  # LoRA: frozen embeddings must still feed grads into checkpoints

    # 2. Compile each block: small graphs compile fast and recompile rarely; the embedding and loss stay eager.
    if compile:
        for block in blocks:
            block.compile()

    # 3. Sharding / replication.
    if parallelism == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mp_policy": mp}
        if cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        else:
            model.to(device)
        for i, block in enumerate(blocks):
            # The last block is not resharded after forward: backward needs it at once.
            fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
        fully_shard(model, **kwargs)
        return model
    model.to(device)
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallelism == "none":
        if world_size > 1:
            raise ValueError("train.parallelism.strategy=none needs scaling.num_workers=1")
        return model
    raise ValueError(f"train.parallelism.strategy={parallelism!r}: choose fsdp, ddp or none")


def needs_autocast(parallelism: str, compute_dtype: torch.dtype) -> bool:
    """FSDP2 casts parameters itself; the other modes run bf16 through autocast."""
    return parallelism != "fsdp" and compute_dtype != torch.float32


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 does not wrap, it changes the module's class in place)."""
    return cast(torch.nn.Module, model.module) if hasattr(model, "module") and not hasattr(model, "config") else model
