"""Packed supervised rows (several whole examples per row, `data.pack_supervised`) as inputs to a Hugging Face
causal LM, keeping each example's attention inside itself. Plain torch; training's sft objective and the eval
stage's perplexity both feed packed rows through here.

How the isolation happens (transformers 5.x, checked against `masking_utils.py`): given `position_ids` and no
`attention_mask`, `create_causal_mask` finds the examples where the positions stop counting up by one
(`find_packed_sequence_indices`) and builds the block-diagonal causal mask in the form the model's attention
implementation takes (a bool mask for sdpa, an additive one for eager, a BlockMask for flex); the same position ids
restart rotary (Llama, Qwen2) and learned (GPT-2) positions per example. It does so only when the model runs
without a KV cache (`past_key_values is None`): training models are built with `use_cache=False`
(models/build.py), and an evaluation forward passes `use_cache=False` itself. Flash-attention kernels would find
the examples from the same position ids only at batch size 1 (`_is_packed_sequence`); `model.attn_implementation`
offers sdpa and eager.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE = -100


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.long)


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether dataset rows are packed supervised rows (they carry `position_ids`)."""
    return "position_ids" in batch


def packed_inputs(batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs (`input_ids`, `position_ids`; no `attention_mask`, see the module docstring) and targets aligned
    with the logits for packed rows: target t is label t+1, dropped where token t+1 starts an example (nothing in
    that example predicts its first token; the data stage also writes that label -100). The padding at a row's end
    counts positions from 0 like one more example: it attends only to itself and carries no loss.
    (B, T) columns -> ({input_ids, position_ids}: (B, T), targets (B, T))
    """
    position_ids = _tensor(batch["position_ids"])
    labels = _tensor(batch["labels"])
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    targets[:, :-1].masked_fill_(position_ids[:, 1:] == 0, IGNORE)
    return {"input_ids": _tensor(batch["input_ids"]), "position_ids": position_ids}, targets
