"""The model runner: prefill and decode forward passes over one HF causal LM, and the batch's KV cache tensors.

It knows tokens, tensors and cache rows, never requests (vLLM's ModelRunner): the engine hands it prompts to prefill
(`PrefillRow`), the last token of each running row to decode, and the rows that stay when others leave, always with
the `BatchShape` the scheduler granted, which is what the cache is allocated at (kv_cache.py). It returns the logits
of each row's next token (sampling and everything after are the engine's and outputs.py's) and, where asked, the
prompt's log-probabilities.

The batch is a `DynamicCache` of shape (B, H, T, D) per layer, left-padded, with a (B, T) mask: 1 for real tokens,
0 for padding. Every row's next token goes in the last column, so any HF decoder that accepts `position_ids` works
(GPT-2, Llama, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_platform.serve.kv_cache import gathered_layer, rebuild, release_freed_memory, rows_view
from llm_platform.serve.loading import PositionLogits, split_model
from llm_platform.serve.sampling import TokenLogprob
from llm_platform.serve.scheduler import BatchShape

LOGIT_CHUNK = 64
"""Prompt positions whose full-vocabulary logits exist at once when prompt log-probabilities are computed."""
PREFILL_CHUNK_TOKENS = 512  # prompt columns per prefill forward pass (see ModelRunner._prefill_group)
PREFILL_SCORE_BYTES = 64 << 20  # attention scores a prefill group may hold per layer (see ModelRunner.prefill)


@dataclass(frozen=True)
class PrefillRow:
    """A prompt to prefill into a new cache row."""

    prompt_ids: list[int]
    score_top: int | None = None
    """Its prompt log-probabilities are wanted, each with this many top alternatives (None: not wanted)."""


@dataclass
class PrefillResult:
    """What a prefill gives back: the new rows' order in the cache (indices into the rows passed; prompts are
    grouped by length), their last-position logits in that order ((B, V)), and the prompt log-probabilities of the
    rows that wanted them (by index into the rows passed)."""

    order: list[int]
    logits: torch.Tensor
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)


class ModelRunner:
    """Forward passes over `model` into one batch's KV cache (`cache`, `mask`; None while no batch runs)."""

    def __init__(self, model, pad_token_id: int | None):
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id or 0
        self.base, self.head = split_model(model)
        cfg = model.config
        self.heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1)
        self.cache: Any = None  # DynamicCache of the running batch
        self.mask: torch.Tensor | None = None  # (B, T) 1 for real tokens, 0 for left padding
        # Every pass goes through this attribute, so a test (faults) or a benchmark (timers) can wrap it.
        self.forward: Callable[..., tuple[Any, torch.Tensor, Any]] = self.forward_pass

    def reset(self) -> None:
        """Drop the batch (every row left, or a failed step left the cache half built)."""
        self.cache = self.mask = None

    def forward_pass(self, input_ids, mask, cache, all_positions: bool = False):
        """One forward pass; returns (position logits, last-position logits (B, V), cache).

        Only the last position's logits are computed for generation. `all_positions` (prompt log-probs wanted)
        also returns a `PositionLogits` that computes the rest a chunk at a time, so a long prompt never has its
        full (L, V) logits in memory at once.
        """
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True)
        if self.base is not None and self.head is not None:  # (split_model sets both or neither)
            out = self.base(**kwargs)
            hidden = out.last_hidden_state  # (B, L, H): small next to (B, L, V)
            scores = PositionLogits(hidden=hidden, head=self.head) if all_positions else None
            return scores, self.head(hidden[:, -1, :]), out.past_key_values
        # A model whose logits are not just its output head over the last hidden state (a soft cap, a scale):
        # transformers' own `logits_to_keep` (0 keeps all positions).
        out = self.model(**kwargs, logits_to_keep=0 if all_positions else 1)
        scores = PositionLogits(logits=out.logits) if all_positions else None
        return scores, out.logits[:, -1, :], out.past_key_values

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        """One decode step: each running row's last token goes in (a new column); its next token's logits (B, V)."""
        assert self.mask is not None  # set whenever a batch runs
        last = torch.tensor([[t] for t in last_tokens], device=self.device)  # (B, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(last_tokens), 1))], dim=1)
        _, logits, self.cache = self.forward(last, self.mask, self.cache)
        return logits

    def keep(self, rows: list[int], shape: BatchShape) -> None:
        """Shrink the batch to the cache rows `rows` (in order), whose block is now `shape` (the scheduler's): the
        leading columns that are padding in every kept row go (`shape.width` columns stay), layer by layer, as in
        `prefill`."""
        if not rows:
            self.reset()
            return
        assert self.mask is not None  # set whenever a batch runs
        index = torch.tensor(rows, device=self.device)
        first = self.mask.shape[1] - shape.width  # the kept rows' all-padding columns on the left
        self.mask = self.mask[index][:, first:]
        for i, layer in enumerate(self.cache.layers):
            self.cache.layers[i] = gathered_layer([(layer.keys, layer.values, rows, first)], shape)
            layer.keys = layer.values = layer.kbuf = layer.vbuf = None
        if self.device.type == "cpu":
            release_freed_memory()

    def prefill(self, rows: list[PrefillRow], running: int, shape: BatchShape) -> PrefillResult:
        """Prefill `rows` and join them after the `running` rows of the batch, whose cache becomes the block `shape`
        (what the scheduler admitted: the running rows and these, the widest row, room for the longest to go).

        Memory is what this is shaped by. The prompts are prefilled in groups whose attention scores (rows x heads
        x width^2 floats, what an eager or masked attention holds per layer) stay within `PREFILL_SCORE_BYTES`
        (four 1k-token prompts at once held 200 MB of scores per layer on CPU; one at a time, 50 MB, at no cost in
        throughput: a 1k-token prefill is compute-bound on its own). The batch's new cache is allocated once, at
        its final size with room for the tokens to come; the running rows move into it layer by layer, and each
        group's rows are copied in and dropped right after its forward pass. So the peak is the new cache, one old
        layer, one group's cache and one forward's activations; joining all at the end held every group's cache
        and the old cache beside the new one.
        """
        groups = self._groups(rows)
        running = running if self.cache is not None else 0
        masks: list[torch.Tensor] = [self.mask] if running and self.mask is not None else []
        width = shape.width  # the widest prompt or the running batch's width: the scheduler's `join`
        result = PrefillResult(order=[i for group in groups for i in group], logits=torch.empty(0))
        lasts: list[torch.Tensor] = []
        if running:  # the running rows move into the new buffers first; every group then writes in place
            self.cache = rebuild([(self.cache, running)], shape)
        row = running
        for i, group in enumerate(groups):
            if i == 0 and not running:
                # No batch yet: the layers' shapes come from the first forward pass, whose rows are copied in.
                cache, mask, last = self._prefill_group([rows[k] for k in group], group, result)
                self.cache = rebuild([(cache, len(group))], shape)
                cache = None
            else:  # the rows' keys and values are written in place, straight into the batch's buffers
                cols = max(len(rows[k].prompt_ids) for k in group)
                view = rows_view(self.cache, row, len(group), width, cols)
                _, mask, last = self._prefill_group([rows[k] for k in group], group, result, view)
            row, lasts, masks = row + len(group), lasts + [last], masks + [mask]
            if self.device.type == "cpu":
                release_freed_memory()
        self.mask = torch.cat([torch.cat([m.new_zeros((m.shape[0], width - m.shape[1])), m], dim=1) for m in masks])
        result.logits = torch.cat(lasts)
        return result

    def _groups(self, rows: list[PrefillRow]) -> list[list[int]]:
        """`rows` (indices), shortest prompt first, in groups whose attention scores fit `PREFILL_SCORE_BYTES`."""
        groups: list[list[int]] = [[]]
        for k in sorted(range(len(rows)), key=lambda k: len(rows[k].prompt_ids)):
            width = len(rows[k].prompt_ids)
            if groups[-1] and (len(groups[-1]) + 1) * width * width * self.heads * 4 > PREFILL_SCORE_BYTES:
                groups.append([])
            groups[-1].append(k)
        return groups

    def _prefill_group(self, rows: list[PrefillRow], indices: list[int], result: PrefillResult, cache=None):
        """One group's prefill into `cache` (a new DynamicCache if None): (the cache, its (B, T) mask, its
        last-position logits (B, V)); the prompt log-probabilities go into `result` under `indices`."""
        from transformers import DynamicCache

        lengths = [len(r.prompt_ids) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding, so every row's next token goes in the last column
            ids[i, width - lengths[i]:] = torch.tensor(r.prompt_ids)
            mask[i, width - lengths[i]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache() if cache is None else cache
        wanted = any(r.score_top is not None for r in rows)
        # Long prompts go through in chunks of PREFILL_CHUNK_TOKENS columns, each attending to the cache so far:
        # a forward pass's activations (its attention scores above all) scale with the chunk, not the prompt.
        # The `logits_to_keep` fallback computes all positions' logits in one pass when they are wanted.
        step = width if (wanted and self.base is None) else PREFILL_CHUNK_TOKENS
        hidden = []
        for a in range(0, width, step):
            b = min(width, a + step)
            scores, last, cache = self.forward(ids[:, a:b], mask[:, :b], cache, all_positions=wanted)
            if wanted and scores.hidden is not None:
                hidden.append(scores.hidden)
        if hidden:
            scores = PositionLogits(hidden=torch.cat(hidden, dim=1), head=self.head)  # (B, width, H)
        for i, r in enumerate(rows):
            if r.score_top is not None:
                result.prompt_logprobs[indices[i]] = prompt_logprobs(scores, i, width - lengths[i], r.prompt_ids,
                                                                     r.score_top)
        return cache, mask, last


def prompt_logprobs(scores: PositionLogits, row: int, start: int, ids: list[int], k: int) -> list[TokenLogprob]:
    """Log-probability of each prompt token given the ones before it (None for the first), each with its `k` top
    alternatives, computed over `LOGIT_CHUNK` positions at a time; the prompt starts at column `start` of `row`."""
    chosen: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    for a in range(0, len(ids) - 1, LOGIT_CHUNK):
        b = min(a + LOGIT_CHUNK, len(ids) - 1)
        logp = scores.rows(row, start + a, start + b).float().log_softmax(dim=-1)  # (b - a, V)
        target = torch.tensor(ids[a + 1:b + 1], device=logp.device)
        chosen += logp.gather(1, target[:, None]).squeeze(1).tolist()
        if k:
            values, indices = logp.topk(k, dim=-1)
            tops += [list(zip(i.tolist(), v.tolist())) for v, i in zip(values, indices)]
        else:
            tops += [[] for _ in range(b - a)]
    return [TokenLogprob(ids[0], None)] + [TokenLogprob(t, lp, top) for t, lp, top in zip(ids[1:], chosen, tops)]
