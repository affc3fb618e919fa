"""What serving a model needs (`llm-platform plan`'s serving lines): the GPUs one replica takes for its weights and
the KV cache of a given context and batch, and the backend that can serve it. Arithmetic only, no Ray, no torch.

Weights and KV cache are split over tensor-parallel ranks (vLLM); a rank count must divide the model's key/value
heads. A replica fits when its share of weights and KV cache, plus a fixed allowance for activations and the CUDA
context, stays within the usable share of a GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
RUNTIME_GIB = 2.0  # CUDA context, activations of a batch, the sampler: per GPU, whatever the model
TENSOR_PARALLEL = (1, 2, 4, 8)


@dataclass(frozen=True)
class ServingNeeds:
    gpus: int | None
    """GPUs a replica needs (tensor-parallel size); None: more than 8."""
    weights_gib: float
    kv_gib: float
    kv_bytes_per_token: int
    context: int
    batch: int
    backend: str
    reason: str


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Keys and values of every layer for one token."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def serving_needs(parameters: int, num_layers: int, num_kv_heads: int, head_dim: int, *, context: int, batch: int,
                  gpu_memory_gib: float, usable: float = 0.9, dtype_bytes: int = 2) -> ServingNeeds:
    """The smallest tensor-parallel size (1, 2, 4, 8) whose share fits one GPU, and the backend for it."""
    per_token = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes)
    weights, kv = parameters * dtype_bytes / GIB, per_token * context * batch / GIB
    gpus = next((tp for tp in TENSOR_PARALLEL if num_kv_heads % tp == 0 and
                 (weights + kv) / tp + RUNTIME_GIB <= usable * gpu_memory_gib), None)
    if gpus is None:
        backend, reason = "vllm", ("more than 8 GPUs: lower the context or batch, or quantize "
                                   "(serve.engine.vllm.quantization)")
    elif gpus > 1:
        backend, reason = "vllm", (f"tensor parallel over {gpus} GPUs (serve.engine.vllm.tensor_parallel_size={gpus}, "
                                   f"serve.deployment.num_gpus_per_replica={gpus}); builtin runs on one device")
    else:
        backend, reason = "vllm", ("one GPU; vllm for throughput (paged attention, CUDA graphs, prefix caching), "
                                   "builtin also fits")
    return ServingNeeds(gpus, weights, kv, per_token, context, batch, backend, reason)


def table(needs: ServingNeeds, gpu: str) -> str:
    rows = [("serve: KV cache per token", f"{needs.kv_bytes_per_token / 1024:,.1f} KiB"),
            (f"serve: memory at {needs.context:,} context x {needs.batch} sequences",
             f"{needs.weights_gib:,.2f} GiB weights + {needs.kv_gib:,.2f} GiB KV cache"),
            ("serve: GPUs per replica", f"{needs.gpus} x {gpu}" if needs.gpus else "more than 8"),
            ("serve: backend", f"serve.engine.backend={needs.backend}: {needs.reason}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
