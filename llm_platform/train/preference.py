"""Direct preference optimization: the losses and the figures users read, as plain torch functions.

DPO (Rafailov et al. 2023, eq. 7): with the policy pi and a frozen reference pi_ref,

    delta = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    loss  = -log sigmoid(beta * delta)

where log pi(y|x) sums the log-probabilities of the response tokens (the labels that are not -100). Variants:

- `sigmoid` with `label_smoothing` eps > 0 (conservative DPO, Mitchell 2023): the preference labels are taken as
  flipped with probability eps, `-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)`;
- `ipo` (Azar et al. 2023, eq. 17): `(delta' - 1 / (2 beta))^2`, with each side's log-ratio averaged over its
  response tokens (the normalization trl uses, confirmed by the IPO authors), so beta is comparable across lengths.

Implicit rewards are `beta * (log pi - log pi_ref)` per response; reward accuracy is the fraction of pairs whose
chosen reward beats the rejected one. Rows come as a batch of chosen responses followed by their rejected ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm_platform.config.choices import Parallelism

IGNORE_INDEX = -100
LOSSES = ("sigmoid", "ipo")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's targets, and how many targets each row has.

    Args:
        logits: (B, T, V) from the model.
        targets: (B, T) token ids aligned with the logits (position t's logits predict targets[t]), IGNORE_INDEX
            where there is nothing to score.

    Returns:
        (logps (B,) float32, counts (B,) float32).
    """
    mask = targets != IGNORE_INDEX
    index = targets.masked_fill(~mask, 0).unsqueeze(-1)  # (B, T, 1)
    logits = logits.float()
    # log_softmax at the target only: the logit minus the log-partition (no (B, T, V) log-prob tensor kept).
    token_logps = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T)
    return (token_logps * mask).sum(-1), mask.sum(-1).float()


@dataclasses.dataclass
class PairLosses:
    """Per-pair figures of one batch (each (P,), P pairs)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    def sums(self) -> dict[str, torch.Tensor]:
        """Sums over the pairs (detached): what is all-reduced and divided by the global pair count for metrics."""
        with torch.no_grad():
            return {"loss": self.loss.sum(), "rewards/chosen": self.chosen_rewards.sum(),
                    "rewards/rejected": self.rejected_rewards.sum(),
                    "rewards/accuracy": (self.chosen_rewards > self.rejected_rewards).float().sum(),
                    "rewards/margin": (self.chosen_rewards - self.rejected_rewards).sum(),
                    "logps/chosen": self.chosen_logps.sum(), "logps/rejected": self.rejected_logps.sum()}


def dpo_losses(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
               counts: tuple[torch.Tensor, torch.Tensor], *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> PairLosses:
    """The per-pair DPO loss and rewards.

    Args:
        policy: (chosen, rejected) summed response log-probs under the policy, each (P,).
        reference: the same under the frozen reference (no gradient).
        counts: (chosen, rejected) response token counts, each (P,) (IPO's normalization).
        beta: the KL penalty's strength (DPO's beta; IPO's tau).
        loss_type: sigmoid or ipo.
        label_smoothing: cDPO's eps for `sigmoid` (0: plain DPO).
    """
    chosen_ratio = policy[0] - reference[0]
    rejected_ratio = policy[1] - reference[1]
    if loss_type == "sigmoid":
        delta = beta * (chosen_ratio - rejected_ratio)
        loss = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    elif loss_type == "ipo":
        delta = chosen_ratio / counts[0].clamp(min=1) - rejected_ratio / counts[1].clamp(min=1)
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {', '.join(LOSSES)}")
    return PairLosses(loss=loss, chosen_rewards=beta * chosen_ratio.detach(),
                      rejected_rewards=beta * rejected_ratio.detach(), chosen_logps=policy[0].detach(),
                      rejected_logps=policy[1].detach())


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (2P, ...) batch of chosen rows then rejected rows as (chosen, rejected)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def pair_rows(batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A micro-batch of pair rows (data/pairs.py COLUMNS, P pairs) as the model's inputs, the P chosen rows then the
    P rejected ones, and their targets aligned with the logits.  (P, T) x 2 -> (2P, T)"""
    def both(name: str) -> torch.Tensor:
        return torch.cat([torch.as_tensor(np.asarray(batch[f"{side}_{name}"]), dtype=torch.long)
                          for side in ("chosen", "rejected")])

    ids, mask, labels = both("input_ids"), both("attention_mask"), both("labels")
    # Rows are right-padded to data.seq_len; columns past the longest row's tokens are padding in every row, so they
    # are cut (attention and labels there are zero and -100 anyway): a batch of short pairs costs what they hold.
    width = max(int(mask.sum(1).max()), 1)
    ids, mask, labels = ids[:, :width], mask[:, :width], labels[:, :width]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t+1 (the causal shift)
    return {"input_ids": ids, "attention_mask": mask}, targets


def build_reference(model_cfg, train_cfg, *, vocab_size: int, special: dict, pretrained_dir: str | None,
                    base_vocab_size: int | None, dtype: torch.dtype, device: torch.device, world: int):
    """DPO's frozen reference: the weights the run starts from (the pretrained model, or the seeded init), built as
    the policy is and sharded like it under FSDP (it only runs forward). None with LoRA: the policy with its adapters
    disabled is the reference, at no extra memory."""
    if model_cfg.lora.enabled:
        return None
    from llm_platform.models.build import build_model
    from llm_platform.train.parallelize import parallelize

    reference = build_model(model_cfg, vocab_size, special, pretrained_dir=pretrained_dir, seed=train_cfg.seed,
                            dtype=dtype, base_vocab_size=base_vocab_size)
    reference.requires_grad_(False)
    reference.eval()
    if train_cfg.parallelism.strategy == Parallelism.fsdp and world > 1:
        return parallelize(reference, parallelism=Parallelism.fsdp, device=device, compute_dtype=dtype,
                           activation_checkpointing=False, compile=False, cpu_offload=False, world_size=world)
    return reference.to(device)


def pair_losses(model, reference, inputs: dict[str, torch.Tensor], targets: torch.Tensor, cfg) -> PairLosses:
    """The policy's and the reference's forward over one micro-batch of pairs, and the per-pair losses.

    `reference` None: the policy (a peft model) with its adapters disabled.
    """
    logps, counts = sequence_logps(model(**inputs).logits, targets)  # (2P,)
    with torch.no_grad():
        if reference is None:
            from llm_platform.train.parallelize import unwrap

            peft_model: Any = unwrap(model)  # a peft PeftModel (model.lora.enabled)
            with peft_model.disable_adapter():
                ref_logps, _ = sequence_logps(model(**inputs).logits, targets)
        else:
            ref_logps, _ = sequence_logps(reference(**inputs).logits, targets)
    return dpo_losses(split_pairs(logps), split_pairs(ref_logps.detach()), split_pairs(counts), beta=cfg.beta,
                      loss_type=str(cfg.loss), label_smoothing=cfg.label_smoothing)


FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
           "logps/rejected")
"""The per-pair figures logged as global means (`train/rewards/accuracy`, `val/rewards/margin`, ...)."""


def add_sums(total: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    for key, value in sums.items():
        total[key] = total.get(key, torch.zeros((), dtype=torch.float64)) + value.double().cpu()
