"""LR schedule and AdamW parameter groups."""

import math

import pytest
import torch

from llm_platform.config.model import ModelConfig
from llm_platform.models.build import build_model
from llm_platform.train.optim import build_optimizer, lr_factor, param_groups

SPECIAL = {"eos": 0, "pad": 1, "mask": 2}


def factors(schedule, max_steps=100, warmup=10, min_ratio=0.1):
    return [lr_factor(s, max_steps=max_steps, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_ratio)
            for s in range(max_steps + 1)]


def test_warmup_is_linear_and_reaches_the_peak():
    f = factors("cosine")
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0)


def test_cosine_decays_to_min_ratio_through_the_midpoint():
    f = factors("cosine")
    assert f[100] == pytest.approx(0.1)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_linear_and_constant():
    lin = factors("linear")
    assert lin[55] == pytest.approx(0.1 + 0.9 * 0.5) and lin[100] == pytest.approx(0.1)
    assert factors("constant")[10:] == [1.0] * 91


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_no_decay_on_biases_norms_and_embeddings(family):
    model = build_model(ModelConfig(family=family, hidden_size=32), 300, SPECIAL)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    assert all(p.ndim == 2 and id(p) not in embeddings for p in decay["params"])
    assert embeddings <= {id(p) for p in no_decay["params"]}
    # Every trainable tensor once (tied LM heads share the embedding's tensor).
    unique = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(decay["params"]) + len(no_decay["params"]) == len(unique)


def test_optimizer_takes_betas_and_lr():
    model = build_model(ModelConfig(hidden_size=32), 300, SPECIAL)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
