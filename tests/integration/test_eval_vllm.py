"""`eval.backend=vllm`: generation through Ray Data LLM's vLLM processor gives what the builtin path (HF `generate`,
greedy) gives on the same checkpoint and prompts, in the prompts' order; perplexity from vLLM's prompt
log-probabilities equals the builtin scorer's on full blocks and on padded supervised records. The checkpoint's
output layer is scaled so that greedy choices are far from ties (random weights otherwise leave near-equal logits,
which two correct implementations may break differently). Runs where vLLM is installed (`make test-vllm`, in
.venv-vllm)."""

from __future__ import annotations

import os

import pytest
from fixtures.checkpoints import llama3_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def sharpened_checkpoint(folder):
    import torch
    from transformers import AutoModelForCausalLM

    path = llama3_checkpoint(folder, head_dim=32, max_positions=256)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(path)
    return path


def test_vllm_generation_equals_hf_greedy(tmp_path):
    pytest.importorskip("vllm")
    import ray

    from llm_platform.evaluate import generation
    from llm_platform.evaluate.scoring import load

    folder = sharpened_checkpoint(tmp_path / "llama")
    prompts = ["What color is the sky", "user: the grass is", "system user assistant What color is the", "snow",
               "The sun and the sea are"]
    expected = generation.local_generator(load(str(folder)), max_new_tokens=8, batch_size=1)(prompts)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             _temp_dir=os.environ.get("RAY_TMPDIR", "/tmp/llmp-ray"))
    try:
        ppl = perplexity_pairs(str(folder))
        got = generation.vllm_generator(str(folder), max_new_tokens=8, batch_size=4, num_engines=1,
                                        dtype="float32")(prompts)  # vLLM's CPU "auto" would cast to bf16
    finally:
        ray.shutdown()
    assert got == expected and any(got)
    for builtin, ours in ppl:
        assert ours["val/tokens"] == builtin["val/tokens"]
        assert ours["val/loss"] == pytest.approx(builtin["val/loss"], rel=1e-5)


def perplexity_pairs(folder: str) -> list[tuple[dict, dict]]:
    """(builtin, vllm) perplexity of records mixing full blocks (every next token scored, as pretrain's) and
    right-padded sft records with a masked prompt, in one engine start."""
    import numpy as np

    from llm_platform.evaluate import perplexity
    from llm_platform.evaluate.scoring import load

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, size=(9, 20))
    mask = np.ones_like(ids)
    labels = ids.copy()
    for i, (prompt, length) in enumerate([(3, 20), (5, 12), (8, 17), (2, 9), (10, 14)]):  # rows 5-8: full blocks
        mask[i, length:] = 0
        labels[i, :prompt] = -100
        labels[i, length:] = -100
        ids[i, length:] = 0
    records = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    assert len(perplexity.vllm_targets(records)[6][1]) == 19  # a full block: every next token is scored
    return [(perplexity.direct_perplexity(load(folder).model, records),
             perplexity.vllm_perplexity(folder, records, batch_size=4, dtype="float32"))]
