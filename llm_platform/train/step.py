"""One optimizer step and one validation pass: plain torch over a `Worker` (train/worker.py), no Ray.

Loss. Each step's loss is the mean over every target token of every micro-batch on every worker: the token count is
all-reduced before the backward passes, each worker backpropagates `sum * world / count`, and FSDP/DDP's gradient
average over workers turns that into the global token mean. DPO's loss is the same over pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from llm_platform.config.choices import Objective, Parallelism
from llm_platform.config.train import TrainConfig
from llm_platform.train import preference as pref
from llm_platform.train.objectives import count_targets, loss_sum
from llm_platform.train.optim import lr_factor
from llm_platform.train.worker import Worker


@dataclasses.dataclass
class StepFigures:
    """What one optimizer step measured (global values, the same on every rank)."""

    loss: float
    """The global mean loss; not finite when the step was skipped or stops the run."""
    grad_norm: float
    """Global gradient norm before clipping; NaN for a skipped step."""
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    """The objective's own step figures (DPO: `train/rewards/accuracy`, ...), global means."""


def learning_rate(tc: TrainConfig, step: int) -> float:
    """The LR of optimizer step `step + 1` (warmup, then the schedule's decay: train/optim.py)."""
    opt = tc.optimizer
    return opt.lr * lr_factor(step, max_steps=tc.max_steps, warmup_steps=opt.warmup_steps, schedule=opt.schedule,
                              min_lr_ratio=opt.min_lr_ratio)


def train_step(w: Worker, batches: Iterator[dict[str, np.ndarray]], step: int, lr: float) -> StepFigures:
    """Optimizer step `step + 1` at learning rate `lr`: every micro-batch is read first, so the loss can be
    normalised by the global target count; then forward/backward each, and clip and step unless the loss is not
    finite."""
    tc = w.config.train
    torch.manual_seed(tc.seed * 1_000_003 + step * 1009 + w.rank)  # dropout: replayable on resume
    micro = []
    for i in range(tc.grad_accum_steps):
        gen = torch.Generator().manual_seed(tc.seed * 7919 + step * 131 + i * 17 + w.rank)
        micro.append(w.objective.prepare(next(batches), special=w.config.special, vocab_size=w.config.vocab_size,
                                         mlm_probability=tc.mlm_probability, generator=gen))
    num_targets = all_reduce_sum(sum(count_of(w, t) for _, t in micro), w.device)
    local_loss = torch.zeros((), device=w.device)
    sums: dict[str, torch.Tensor] = {}
    for i, (inputs, targets) in enumerate(micro):
        last = i == tc.grad_accum_steps - 1
        inputs = {k: v.to(w.device, non_blocking=True) for k, v in inputs.items()}
        targets = targets.to(w.device, non_blocking=True)
        with gradient_sync(w.model, tc.parallelism.strategy, last), w.autocast:
            loss = micro_loss(w, inputs, targets, sums)
        (loss * w.world / max(num_targets, 1.0)).backward()
        local_loss += loss.detach()
    train_loss = all_reduce_sum(local_loss, w.device) / max(num_targets, 1.0)
    extra = {f"train/{k}": v for k, v in global_means(w, sums, num_targets).items()}

    for group in w.optimizer.param_groups:
        group["lr"] = lr
    grad_norm = float("nan")
    if math.isfinite(train_loss):
        grad_norm = clip_grad_norm([p for p in w.model.parameters() if p.requires_grad], tc.optimizer.grad_clip)
        w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)  # a skipped step's NaN gradients must not leak into the next one
    return StepFigures(loss=train_loss, grad_norm=grad_norm, extra=extra)


def validate(w: Worker, batches: list[dict]) -> dict[str, float]:
    """`val/loss` and `val/perplexity` (DPO: `val/loss` and the reward figures, `val/rewards/accuracy`...) over this
    rank's val batches, summed over all ranks (a collective); empty when no rank had a val row."""
    tc = w.config.train
    w.model.eval()
    total = torch.zeros((), device=w.device, dtype=torch.float64)
    count = 0.0
    sums: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(tc.seed)  # MLM: the same masks at every validation
    with torch.no_grad():
        for batch in batches:
            inputs, targets = w.objective.prepare(batch, special=w.config.special, vocab_size=w.config.vocab_size,
                                                  mlm_probability=tc.mlm_probability, generator=gen)
            with w.autocast:
                summed = micro_loss(w, {k: v.to(w.device) for k, v in inputs.items()}, targets.to(w.device), sums)
            total += summed.double()
            count += count_of(w, targets)
    w.model.train()
    loss_total = all_reduce_sum(total, w.device)
    counted = all_reduce_sum(count, w.device)
    figures = {f"val/{k}": v for k, v in global_means(w, sums, counted).items()}
    if not counted:
        return {}
    loss = loss_total / counted
    if tc.objective == Objective.dpo:  # a mean over pairs: no perplexity
        return {"val/loss": loss, **figures}
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}


def count_of(w: Worker, targets: torch.Tensor) -> int:
    """What the step's loss is a mean over: target tokens, or for DPO pairs (chosen rows, then rejected ones)."""
    return targets.shape[0] // 2 if w.config.train.objective == Objective.dpo else count_targets(targets)


def micro_loss(w: Worker, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
               sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """One micro-batch's summed loss (over tokens, or DPO's pairs, whose figures are added to `sums`)."""
    if w.config.train.objective == Objective.dpo:
        pairs = pref.pair_losses(w.model, w.reference, inputs, targets, w.config.train.preference)
        pref.add_sums(sums, pairs.sums())
        return pairs.loss.sum()
    return loss_sum(w.model(**inputs).logits, targets)  # logits (B, T, V)


def global_means(w: Worker, sums: dict[str, torch.Tensor], count: float) -> dict[str, float]:
    """The objective's figures (DPO's `pref.FIGURES`), each summed over all workers and divided by the global count:
    one all-reduce, made by every rank whatever it had to add (a collective)."""
    keys = pref.FIGURES if w.config.train.objective == Objective.dpo else ()
    if not keys:
        return {}
    zero = torch.zeros((), dtype=torch.float64)
    total = torch.stack([sums.get(k, zero) for k in keys]).to(w.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return {k: float(v) / max(count, 1.0) for k, v in zip(keys, total.tolist())}


def all_reduce_sum(value, device: torch.device) -> float:
    """Sum a number over all workers (a no-op without a process group)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().to(device).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return float(tensor)


def gradient_sync(model, parallelism: Parallelism, sync: bool):
    """Skip the gradient reduction on all but the last micro-batch of a step (FSDP2 / DDP)."""
    if parallelism == Parallelism.fsdp and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if parallelism == Parallelism.ddp and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip to `max_norm` (0 disables clipping) and return the global norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return float(norm)
