"""AdamW with decay/no-decay parameter groups, and the warmup + cosine/linear/constant learning-rate schedule."""

from __future__ import annotations

import math

import torch

from llm_platform.config.choices import Schedule


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases, norms and embeddings do not (GPT-3 / nanoGPT practice).

    Embeddings are recognised by module type, not by name, so tied LM heads (which share the embedding's tensor)
    land in the no-decay group once.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # 1-D tensors are biases and norm scales.
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW over `param_groups`; the fused/foreach kernel is chosen by torch for the device."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, schedule: Schedule, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Linear warmup from 1/warmup to 1 over `warmup_steps`, then decay to `min_lr_ratio` at `max_steps`:
    cosine, linear, or none (constant).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == Schedule.constant:
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == Schedule.cosine:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
