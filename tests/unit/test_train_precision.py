"""The compute dtype, decided in one place (train/precision.py), for every `train.parallelism.mixed_precision`."""

import pytest
import torch

from llm_platform.config.choices import MixedPrecision
from llm_platform.train.precision import compute_dtype


@pytest.mark.parametrize(("mixed_precision", "on_gpu", "expected"), [
    (MixedPrecision.auto, True, "bfloat16"),
    (MixedPrecision.auto, False, "float32"),  # CPU bf16 matmuls are slow: auto stays fp32 there
    (MixedPrecision.bf16, True, "bfloat16"),
    (MixedPrecision.bf16, False, "bfloat16"),  # asked for explicitly: bf16 runs on CPU too
    (MixedPrecision.fp32, True, "float32"),
    (MixedPrecision.fp32, False, "float32"),
])
def test_every_setting_resolves_to_a_torch_dtype(mixed_precision, on_gpu, expected):
    name = compute_dtype(mixed_precision, on_gpu=on_gpu)
    assert name == expected
    assert isinstance(getattr(torch, name), torch.dtype)  # what the workers and the export build with
