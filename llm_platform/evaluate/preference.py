"""Preference accuracy on held-out pairs: the eval stage's section for a model trained on a `preference` dataset.

For each val pair (data/pairs.py rows) the model's and the reference's summed answer log-probs give the implicit
rewards of DPO, `beta * (log pi - log pi_ref)`; `preference/accuracy` is the fraction of pairs whose chosen answer
gets the higher reward (what `train/rewards/accuracy` measures while training, here on pairs never trained on).
`preference/logp_accuracy` needs no reference: the fraction whose chosen answer is the likelier one per token.

The reference is the model the run started from (`lineage.base_model`); without one, only the reference-free
figure is reported and the reason is recorded.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_platform.train.preference import pair_rows, sequence_logps, split_pairs


def answer_logps(model, records: dict[str, Any], batch_size: int) -> tuple[torch.Tensor, ...]:
    """(chosen logps, rejected logps, chosen counts, rejected counts), each (P,), over all pairs of `records`."""
    n = len(records["chosen_input_ids"])
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = {k: v[start:start + batch_size] for k, v in records.items()}
            inputs, targets = pair_rows(batch)
            logps, counts = sequence_logps(model(**inputs).logits, targets)
            parts.append((*split_pairs(logps), *split_pairs(counts)))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def evaluate_pairs(model, reference, records: dict[str, Any], *, beta: float, batch_size: int = 8
                   ) -> dict[str, float]:
    """`preference/accuracy`, `preference/margin` (mean reward margin) with a reference, and
    `preference/logp_accuracy`, `preference/pairs` always."""
    chosen, rejected, n_chosen, n_rejected = answer_logps(model, records, batch_size)
    out = {"preference/pairs": float(chosen.numel()),
           "preference/logp_accuracy": float((chosen / n_chosen.clamp(min=1) >
                                              rejected / n_rejected.clamp(min=1)).float().mean())}
    if reference is not None:
        ref_chosen, ref_rejected, _, _ = answer_logps(reference, records, batch_size)
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        out["preference/accuracy"] = float((margin > 0).float().mean())
        out["preference/margin"] = float(margin.mean())
    return out
