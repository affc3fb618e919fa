"""Parameter counts, FLOPs per token, MFU and memory arithmetic."""

import pytest

from llm_platform.config.model import ModelConfig
from llm_platform.models.build import build_model, count_parameters, hf_config
from llm_platform.models.flops import (
    PEAKS,
    flops_per_token,
    memory_per_device,
    mfu,
    model_size,
    normalize_gpu,
    peak_flops,
)

SPECIAL = {"eos": 0, "pad": 1, "mask": 2}


def test_gpt2_small_has_124m_parameters_with_gpt2_vocab():
    cfg = ModelConfig(family="gpt2", num_layers=12, num_heads=12, hidden_size=768, max_position_embeddings=1024)
    size = model_size(hf_config(cfg, 50257, SPECIAL), "gpt2")
    assert size.total == 124_439_808  # the published GPT-2 small count
    # matmul params: everything but the two embedding tables, plus the tied LM head (V x d)
    assert size.matmul == size.total - 50257 * 768 - 1024 * 768 + 50257 * 768
    assert size.num_layers == 12 and size.hidden_size == 768


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5", "bert"])
def test_meta_count_equals_a_real_model(family):
    cfg = ModelConfig(family=family, hidden_size=32)
    size = model_size(hf_config(cfg, 300, SPECIAL), family)
    assert size.total == count_parameters(build_model(cfg, 300, SPECIAL))[0]


def test_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig(family="gpt2", num_layers=12, num_heads=12, hidden_size=768, max_position_embeddings=1024)
    size = model_size(hf_config(cfg, 50257, SPECIAL), "gpt2")
    assert flops_per_token(size, 1024) == 6 * size.matmul + 12 * 12 * 768 * 1024


def test_mfu_against_the_peaks_table():
    assert PEAKS["H100"]["bf16"] == pytest.approx(989.4e12)
    assert PEAKS["A100-80G"]["bf16"] == pytest.approx(312e12)
    # 8 GPUs at 1e5 tokens/s each, 1e9 FLOPs per token -> 8e14 / (8 * 989.4e12)
    assert mfu(8e5, 1e9, 8, peak_flops("H100")) == pytest.approx(1e14 / 989.4e12)
    assert mfu(1e5, 1e9, 1, None) is None
    assert normalize_gpu("NVIDIA H100 80GB HBM3") == "H100" and normalize_gpu("NVIDIA H200") == "H200"
    assert normalize_gpu("NVIDIA A100-SXM4-80GB") == "A100-80G" and normalize_gpu("cpu") is None


def test_gpu_table_covers_the_cloud_gpus_and_their_device_names():
    # Ray accelerator types and torch.cuda.get_device_name() spellings of every GPU the Terraform node groups use.
    names = {"NVIDIA A10G": "A10G", "NVIDIA L4": "L4", "NVIDIA L40S": "L40S", "NVIDIA A100-SXM4-40GB": "A100-40G",
             "NVIDIA A100 80GB PCIe": "A100-80G", "A100": "A100-80G", "NVIDIA H100 80GB HBM3": "H100",
             "NVIDIA H200": "H200", "L40S": "L40S", "NVIDIA A10": None}
    assert {n: normalize_gpu(n) for n in names} == names
    for key, spec in PEAKS.items():
        assert spec["bf16"] > spec["fp32"] > 0 and spec["memory_gib"] >= 24, key
    assert {k: PEAKS[k]["memory_gib"] for k in ("A100-40G", "A100-80G", "H200")} == {
        "A100-40G": 40, "A100-80G": 80, "H200": 141}


def test_fsdp_shards_states_and_checkpointing_cuts_activations():
    cfg = ModelConfig(family="llama", num_layers=16, num_heads=32, num_kv_heads=8, hidden_size=2048,
                      intermediate_size=8192)
    size = model_size(hf_config(cfg, 32000, SPECIAL), "llama")
    kw = dict(micro_batch_size=8, seq_len=2048, bf16=True)
    one = memory_per_device(size, num_devices=1, parallelism="ddp", activation_checkpointing=False, **kw)
    eight = memory_per_device(size, num_devices=8, parallelism="fsdp", activation_checkpointing=False, **kw)
    ac = memory_per_device(size, num_devices=8, parallelism="fsdp", activation_checkpointing=True, **kw)
    assert one.states == pytest.approx(16 * size.total)
    assert eight.states == pytest.approx(16 * size.total / 8)
    assert ac.activations < eight.activations / 5
    assert one.total > eight.total > ac.total
