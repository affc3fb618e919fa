"""Load an HF-format model folder for evaluation and score token sequences with it (plain torch, no Ray).

Every evaluation module scores through `sequence_nll` so that perplexity and bias agree on what a token's
negative log-likelihood is: causal models predict token t+1 from tokens <= t; seq2seq models score `labels` given
`input_ids`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_platform.errors import StageError

IGNORE_INDEX = -100


class ModelNotFoundError(StageError):
    """A model reference that does not lead to a loadable HF-format folder."""


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer."""

    model: Any
    tokenizer: Any
    is_seq2seq: bool
    uri: str


def resolve(ref: str, storage_root: str):
    """`registry:<name>[/<version>]`, a path or an s3:// URI as a registry `ModelVersion` (errors name the model)."""
    from llm_platform import registry

    try:
        return registry.resolve(ref, storage_root)
    except StageError as e:
        raise ModelNotFoundError(f"eval.model={ref!r}: {e}") from None


def load(uri: str, *, eager_attention: bool = False) -> LoadedModel:
    """Load model and tokenizer from a local or s3:// HF folder; weights only from safetensors, never remote code.

    Args:
        uri: the model folder (a registry version's `uri`, a path, or s3://).
        eager_attention: use the eager attention kernel, which is the one that can return attention weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from llm_platform import registry

    local = registry.materialize(uri)
    if not os.path.exists(os.path.join(local, "config.json")):
        raise ModelNotFoundError(f"model {uri!r} not found: no config.json in {local}")
    if not any(f.endswith(".safetensors") for f in os.listdir(local)):
        raise ModelNotFoundError(f"model {uri!r} has no *.safetensors weights (only safetensors are loaded)")
    config = AutoConfig.from_pretrained(local, trust_remote_code=False)
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if eager_attention:
        kwargs["attn_implementation"] = "eager"
    model = cls.from_pretrained(local, **kwargs)
    model.eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(local), is_seq2seq=is_seq2seq, uri=uri)


def load_tokenizer(local: str):
    """The folder's tokenizer, with a pad token (our tokenizers have `<|pad|>`; others fall back to EOS)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.exists(os.path.join(local, "tokenizer.json")):
        tok = PreTrainedTokenizerFast.from_pretrained(local)
    else:
        tok = AutoTokenizer.from_pretrained(local, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = "<|pad|>" if "<|pad|>" in tok.get_vocab() else tok.eos_token
    if tok.eos_token is None and "<|endoftext|>" in tok.get_vocab():
        tok.eos_token = "<|endoftext|>"
    return tok


def sequence_nll(model, input_ids, *, labels=None, attention_mask=None, is_seq2seq: bool = False):
    """Per-sequence summed NLL and counted tokens.

    Args:
        model: a causal or seq2seq HF model.
        input_ids: (B, T) token ids.
        labels: (B, T) for causal (aligned with input_ids, shifted here) or (B, L) for seq2seq; -100 is not scored.
            None scores every next token of `input_ids` (pretrain blocks have no padding).
        attention_mask: (B, T), or None for all ones.
        is_seq2seq: labels are the decoder targets.

    Returns:
        (nll_sum, num_tokens): float64 (B,) and int64 (B,) torch tensors.
    """
    import torch

    input_ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        return _nll(model, input_ids, labels, mask, is_seq2seq)


def _nll(model, input_ids, labels, mask, is_seq2seq: bool):
    import torch
    import torch.nn.functional as F

    if is_seq2seq:
        if labels is None:
            raise ValueError("a seq2seq model needs labels to score")
        targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        logits = model(input_ids=input_ids, attention_mask=mask, labels=targets).logits  # (B, L, V)
    else:
        labels_t = input_ids if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V): predicts t+1
        targets = labels_t[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    scored = targets != IGNORE_INDEX
    return (nll.double() * scored).sum(dim=1), scored.sum(dim=1)


def text_log_likelihoods(loaded: LoadedModel, texts: list[str], batch_size: int = 16) -> np.ndarray:
    """Total log-likelihood (nats) of each text under the model.

    Causal models score every token after an EOS prefix (so the first word counts too); seq2seq models score the
    text as the decoder target of an empty source, so both families rank sentences on the same footing.
    """
    import torch

    tok = loaded.tokenizer
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chunk]
        width = max(len(i) for i in ids) + 1
        pad = tok.pad_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else pad
        if loaded.is_seq2seq:
            src = torch.full((len(ids), 1), eos)
            labels = torch.full((len(ids), width - 1), IGNORE_INDEX)
            for row, seq in enumerate(ids):
                labels[row, :len(seq)] = torch.tensor(seq)
            nll, _ = sequence_nll(loaded.model, src, labels=labels, is_seq2seq=True)
        else:
            batch = torch.full((len(ids), width), pad)
            labels = torch.full((len(ids), width), IGNORE_INDEX)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):
                batch[row, 0] = eos
                batch[row, 1:len(seq) + 1] = torch.tensor(seq)
                labels[row, 1:len(seq) + 1] = torch.tensor(seq)
                mask[row, :len(seq) + 1] = 1
            nll, _ = sequence_nll(loaded.model, batch, labels=labels, attention_mask=mask)
        out.extend((-nll).tolist())
    return np.asarray(out, dtype=np.float64)
