"""Training objectives: one `ObjectiveSpec` record each (what it reads, how a batch becomes inputs and targets).

Targets are always aligned with the logits (shifted here for causal models), with -100 where no loss is taken, so
the loop computes every objective's loss the same way (`loss_sum`) and can normalise by the number of target tokens
across all workers and micro-batches of a step. That is why the record has no loss of its own.

    clm      pretrain blocks; predict token t+1 from tokens <= t
    sft      prompt/response records; as clm, but the dataset's labels are -100 on the prompt and padding; packed
             rows (several examples per row) also pass position_ids, keeping attention inside each example
    seq2seq  source -> target (T5); the decoder reads the target shifted right behind the start token (pad)
    mlm      pretrain blocks; BERT masking: 15% of tokens chosen, 80% -> <|mask|>, 10% random, 10% unchanged
    dpo      preference pairs: chosen rows then rejected rows, targets on each answer; the loop computes DPO's
             loss over pairs against a frozen reference (train/preference.py), not `loss_sum`

Adding an objective: a member of `config.choices.Objective`, a record in `OBJECTIVES`, and the objective in the
`objectives` of the model families that can train it (`models/families.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm_platform.config.choices import Objective
from llm_platform.data.pairs import COLUMNS as pair_columns
from llm_platform.models.packing import is_packed, packed_inputs
from llm_platform.train.preference import pair_rows

IGNORE = -100
Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ObjectiveSpec:
    """One training objective, as every module reads it (the launcher's checks, the workers' reader and steps)."""

    name: str
    """The `train.objective` value."""
    dataset_kinds: tuple[str, ...]
    """Data-stage dataset kinds it trains on (`data.kind`)."""
    columns: tuple[str, ...]
    """Dataset columns a batch is read with."""
    prepare: Callable[..., Batch]
    """Collate: `(rows, *, special, vocab_size, mlm_probability, generator)` -> (model inputs, aligned targets)."""


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.long)


def shift_left(labels: torch.Tensor) -> torch.Tensor:
    """Targets for causal LM: position t predicts labels[t+1]; the last position has no target.  (B, T) -> (B, T)"""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def shift_right(labels: torch.Tensor, start_id: int) -> torch.Tensor:
    """Decoder inputs for seq2seq: the start token, then the target without its last token; -100 read as start."""
    inputs = torch.full_like(labels, start_id)
    inputs[:, 1:] = labels[:, :-1]
    return inputs.masked_fill(inputs == IGNORE, start_id)


def mask_tokens(input_ids: torch.Tensor, *, probability: float, mask_id: int, pad_id: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking. Returns (masked inputs, targets with -100 where the token was not chosen)."""
    choose = torch.rand(input_ids.shape, generator=generator) < probability
    choose &= input_ids != pad_id
    targets = input_ids.masked_fill(~choose, IGNORE)
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[choose & (roll < 0.8)] = mask_id
    random_slots = choose & (roll >= 0.8) & (roll < 0.9)
    masked[random_slots] = torch.randint(vocab_size, input_ids.shape, generator=generator)[random_slots]
    return masked, targets


def _clm(batch: dict[str, Any], **_) -> Batch:
    input_ids = _tensor(batch["input_ids"])
    return {"input_ids": input_ids}, shift_left(input_ids)


def _sft(batch: dict[str, Any], **_) -> Batch:
    if is_packed(batch):  # several whole examples per row: attention kept inside each (models/packing.py)
        return packed_inputs(batch)
    inputs = {"input_ids": _tensor(batch["input_ids"]), "attention_mask": _tensor(batch["attention_mask"])}
    return inputs, shift_left(_tensor(batch["labels"]))


def _seq2seq(batch: dict[str, Any], *, special: dict[str, int], **_) -> Batch:
    labels = _tensor(batch["labels"])
    inputs = {"input_ids": _tensor(batch["input_ids"]), "attention_mask": _tensor(batch["attention_mask"]),
              "decoder_input_ids": shift_right(labels, special["pad"])}
    return inputs, labels


def _mlm(batch: dict[str, Any], *, special: dict[str, int], vocab_size: int, mlm_probability: float,
         generator: torch.Generator | None) -> Batch:
    input_ids = _tensor(batch["input_ids"])
    gen = generator or torch.Generator().manual_seed(0)
    masked, targets = mask_tokens(input_ids, probability=mlm_probability, mask_id=special["mask"],
                                  pad_id=special["pad"], vocab_size=vocab_size, generator=gen)
    return {"input_ids": masked, "attention_mask": (input_ids != special["pad"]).long()}, targets


_TOKENS = ("input_ids",)
_RECORDS = ("input_ids", "labels", "attention_mask")
_SUPERVISED = (*_RECORDS, "position_ids")  # position_ids: packed datasets only (the reader skips it elsewhere)
OBJECTIVES: dict[Objective, ObjectiveSpec] = {Objective(o.name): o for o in (
    ObjectiveSpec("clm", ("pretrain",), _TOKENS, _clm),
    ObjectiveSpec("sft", ("sft", "chat"), _SUPERVISED, _sft),  # rendered chats are prompt/response records too
    ObjectiveSpec("seq2seq", ("seq2seq",), _RECORDS, _seq2seq),
    ObjectiveSpec("mlm", ("pretrain",), _TOKENS, _mlm),
    # DPO: each row a pair; the loop scores chosen and rejected rows against a frozen reference (train/preference.py)
    ObjectiveSpec("dpo", ("preference",), pair_columns, lambda batch, **_: pair_rows(batch)),
)}


# `train.objective` is an Objective, which the schema checks (compose, config.merge), so a lookup needs no check of
# its own; this makes sure every member has its record.
assert set(OBJECTIVES) == set(Objective), f"objectives without a record: {set(Objective) - set(OBJECTIVES)}"


def get(name: Objective | str) -> ObjectiveSpec:
    """The record of `train.objective` (an Objective; its string value finds the same record)."""
    return OBJECTIVES[Objective(name)]


def prepare_batch(objective: Objective | str, batch: dict[str, Any], *, special: dict[str, int], vocab_size: int,
                  mlm_probability: float = 0.15, generator: torch.Generator | None = None) -> Batch:
    """Model keyword inputs and aligned targets for one micro-batch of dataset rows.

    Args:
        objective: clm, sft, seq2seq or mlm.
        batch: columns of the dataset shard (numpy arrays or tensors), rows of equal length.
        special: token ids `eos`, `pad`, `mask`.
        vocab_size: for MLM's random replacement tokens.
        mlm_probability: fraction of tokens chosen for MLM.
        generator: seeded RNG for MLM masking (deterministic per step, so resumes replay the same masks).
    """
    return get(objective).prepare(batch, special=special, vocab_size=vocab_size,
                                         mlm_probability=mlm_probability, generator=generator)


def count_targets(targets: torch.Tensor) -> int:
    """Tokens that carry a loss."""
    return int((targets != IGNORE).sum())


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over target tokens, in fp32.  logits (B, T, V), targets (B, T) -> scalar"""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
