"""The training's compute dtype, decided in one place.

The driver decides it (`launcher.build_worker_config` stores the name in `WorkerConfig.compute_dtype`), the workers
build, shard and autocast in it, the driver's export rebuilds the model in it, and `plan` sizes activations by it.
Weights that train stay fp32 whatever it is (models/build.py): this is what matmuls run in.
"""

from __future__ import annotations

from llm_platform.config.choices import MixedPrecision


def compute_dtype(mixed_precision: MixedPrecision, *, on_gpu: bool) -> str:
    """The torch dtype name, `bfloat16` or `float32`, that `train.parallelism.mixed_precision` resolves to.

    `auto` is bf16 on GPU workers and fp32 on CPU ones: CPU bf16 matmuls are slow (an explicit `bf16` still runs
    there). A name rather than a `torch.dtype`, so the driver and the planner decide without importing torch.
    """
    if mixed_precision == MixedPrecision.auto:
        return "bfloat16" if on_gpu else "float32"
    return "bfloat16" if mixed_precision == MixedPrecision.bf16 else "float32"
