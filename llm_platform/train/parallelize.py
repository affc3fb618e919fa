"""Apply parallelism to a plain Hugging Face model from outside, in a fixed order (as torchtitan does):

    1. activation checkpointing   per block, before compile and sharding so the recompute covers the whole block
    2. torch.compile              per block (nn.Module.compile keeps parameter names, so checkpoints do not change)
    3. FSDP2 fully_shard          per block, then the root (embeddings, final norm, LM head); or DDP; or nothing

The model code never knows about any of this. Parameter names stay those of the plain model in every mode, so a
checkpoint written under FSDP2 loads into DDP, a single process, or the driver's export.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, cast

import torch

from llm_platform.config.choices import Parallelism
from llm_platform.errors import ConfigError
from llm_platform.models.build import transformer_blocks


def parallelize(model: torch.nn.Module, *, parallelism: Parallelism, device: torch.device,
                compute_dtype: torch.dtype, activation_checkpointing: bool = False, compile: bool = False,
                cpu_offload: bool = False, world_size: int = 1) -> torch.nn.Module:
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
        check_compiler(device)
        for block in blocks:
            block.compile()

    # 3. Sharding / replication.
    if parallelism == Parallelism.fsdp:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mp_policy": mp}
        if cpu_offload:
            # Sharded parameters, gradients and optimizer states live in host memory; each block's parameters are
            # copied to the device for its all-gather. Pinned memory needs an accelerator: on CPU workers the
            # offload path runs unpinned (and moves nothing, the device being the host). The model stays on the
            # host: fully_shard moves only what the device must hold.
            check_offload_backend(device)
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        else:
            model.to(device)
        for i, block in enumerate(blocks):
            # The last block is not resharded after forward: backward needs it at once.
            fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
        fully_shard(model, **kwargs)
        return model
    model.to(device)
    if parallelism == Parallelism.ddp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    # Parallelism.none: the typed config admits nothing else.
    if world_size > 1:
        raise ValueError("train.parallelism.strategy=none needs scaling.num_workers=1")
    return model


def check_compiler(device: torch.device) -> None:
    """Inductor builds CPU kernels with a C++ compiler ($CXX, else g++); without one the first forward would fail
    deep inside torch on every worker, so say so here, naming the key."""
    compiler = os.environ.get("CXX") or "g++"
    if device.type == "cpu" and not shutil.which(compiler):
        raise ConfigError(f"train.parallelism.compile=true on CPU workers needs a C++ compiler for inductor; "
                          f"{compiler!r} is not on this worker's PATH (install g++, set CXX, or turn compile off)")


def process_group_backend(cpu_offload: bool, use_gpu: bool) -> str | None:
    """The torch.distributed backend the workers' process group needs (Ray Train's `TorchConfig.backend`).

    None is Ray's default: NCCL on GPUs, gloo on CPUs. FSDP2's CPU offload on GPUs keeps the sharded gradients in
    host memory, and clipping all-reduces their norms there: NCCL has no CPU tensors, so gloo serves the CPU side
    (as torchtitan does; pytorch/pytorch#148532).
    """
    return "cpu:gloo,cuda:nccl" if cpu_offload and use_gpu else None


def check_offload_backend(device: torch.device) -> None:
    """Refuse CPU offload on GPUs under a process group without a CPU backend, before the first step's gradient
    clipping fails with `No backend type associated with device type cpu`."""
    import torch.distributed as dist

    if device.type != "cuda" or not dist.is_initialized():
        return
    config = dist.get_backend_config()  # e.g. "cuda:nccl" or "cpu:gloo,cuda:nccl"
    if "cpu:" not in config:
        raise ConfigError(f"train.parallelism.cpu_offload=true on GPU workers needs a process group with a CPU "
                          f"backend ({process_group_backend(True, True)}); this one is {config!r}")


def needs_autocast(parallelism: Parallelism, compute_dtype: torch.dtype) -> bool:
    """FSDP2 casts parameters itself; the other modes run bf16 through autocast."""
    return parallelism != Parallelism.fsdp and compute_dtype != torch.float32


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 does not wrap, it changes the module's class in place)."""
    return cast(torch.nn.Module, model.module) if hasattr(model, "module") and not hasattr(model, "config") else model
