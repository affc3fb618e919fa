"""Hugging Face models from `ModelConfig`: configs from the family table, pretrained loads, LoRA adapters.

Model code here is architecture only; parallelism, activation checkpointing and compile are applied from outside
(`llm_platform/train/parallelize.py`). What differs per architecture lives in `models/families.py`. Pretrained
weights are read only from safetensors, never unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from llm_platform.config.model import ModelConfig
from llm_platform.errors import ConfigError
from llm_platform.models import families

FAMILIES = tuple(families.FAMILIES)


def hf_config(cfg: ModelConfig, vocab_size: int, special: Mapping[str, int | None]):
    """A transformers config for the architecture in `cfg` (training from scratch).

    Args:
        cfg: the model node.
        vocab_size: the dataset tokenizer's vocabulary size (used unless `cfg.vocab_size` is set).
        special: `eos`, `pad` (and `mask`) token ids of the tokenizer.
    """
    family = families.get(cfg.family)
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.hidden_size} is not a multiple of model.num_heads={cfg.num_heads}")
    return family.make_config(cfg, cfg.vocab_size or vocab_size, special)


def model_class(family: str):
    """The transformers class with the LM head for a family name."""
    return families.model_class(families.get(family))


def read_pretrained_config(pretrained_dir: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    path = os.path.join(pretrained_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"model.pretrained: {pretrained_dir} has no config.json (not an HF-format model folder)")
    with open(path) as f:
        return json.load(f)


def resolve_family(cfg: ModelConfig, pretrained_config: dict[str, Any] | None = None) -> families.Family:
    """The family of the model to train: the checkpoint's `model_type` when there is one, else `model.family`."""
    if pretrained_config is not None:
        return families.of_model_type(pretrained_config.get("model_type"), f"model.pretrained={cfg.pretrained!r}")
    return families.get(cfg.family)


def build_model(cfg: ModelConfig, vocab_size: int, special: Mapping[str, int | None], *,
                pretrained_dir: str | None = None, seed: int = 0, dtype=None, base_vocab_size: int | None = None):
    """A model from scratch (weights seeded by `seed`) or from a local HF-format folder (safetensors only).

    Args:
        cfg: the model node.
        vocab_size: the dataset tokenizer's length.
        special: `eos`, `pad`, `mask` token ids (from scratch only).
        pretrained_dir: a local HF-format folder to load.
        seed: weights seed (from scratch, and LoRA's adapter init).
        dtype: the training's compute dtype. Pretrained weights load in it (bf16 where training is bf16, so a
            worker never holds an fp32 copy of a frozen base); the parameters that train are then kept in fp32,
            the optimizer's master copy. None means fp32.
        base_vocab_size: the length of the checkpoint's own tokenizer when the dataset's tokenizer added tokens to
            it: the rows of the added ids (resized in when the embedding is too small) start as the mean of the
            existing rows.

    LoRA adapters are added when `cfg.lora.enabled`.
    """
    import torch

    dtype = dtype or torch.float32
    # A plain str, not the config's Enum: transformers calls str methods on it inside each attention forward, and
    # torch.compile cannot trace those on a str subclass (a graph break in every compiled block).
    attn = str(cfg.attn_implementation)
    if pretrained_dir:
        family = resolve_family(cfg, read_pretrained_config(pretrained_dir))
        if not any(f.endswith(".safetensors") for f in os.listdir(pretrained_dir)):
            raise ConfigError(f"model.pretrained={cfg.pretrained!r} has no .safetensors weights; pickled weights "
                              f"are never loaded")
        torch.manual_seed(seed)  # LoRA's adapter init below
        model = families.model_class(family).from_pretrained(
            pretrained_dir, use_safetensors=True, attn_implementation=attn, dtype=dtype)
        model.config.use_cache = False
        if base_vocab_size is not None and vocab_size > base_vocab_size:
            init_added_rows(model, base_vocab_size, vocab_size)
        elif model.config.vocab_size < vocab_size:
            raise ConfigError(f"model.pretrained={cfg.pretrained!r} has a vocab of {model.config.vocab_size}, smaller "
                              f"than the dataset tokenizer's {vocab_size}: tokenizer and model do not match")
    else:
        family = families.get(cfg.family)
        torch.manual_seed(seed)
        config = hf_config(cfg, vocab_size, special)
        cls = families.model_class(family)
        # Auto classes have `from_config`; concrete ones (T5, BERT) the equivalent `_from_config`.
        make = getattr(cls, "from_config", None) or cls._from_config
        model = make(config, attn_implementation=attn, dtype=torch.float32)
    if cfg.lora.enabled:
        model = add_lora(model, cfg, family)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trained weights: fp32 master copy; FSDP2/autocast compute in `dtype`
    return model


def init_added_rows(model, base_vocab_size: int, vocab_size: int) -> None:
    """Make room for tokens added to the checkpoint's tokenizer and start their rows at the mean of the base rows.

    A checkpoint whose embedding is padded past its tokenizer (Llama 3) already has rows for them; those untrained
    rows are overwritten too. Input and output embeddings are set separately when they are not tied.
    """
    import torch

    if model.config.vocab_size < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight
        inp[base_vocab_size:vocab_size] = inp[:base_vocab_size].float().mean(0).to(inp.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not inp:
            out.weight[base_vocab_size:vocab_size] = out.weight[:base_vocab_size].float().mean(0).to(out.weight.dtype)


def lora_targets(model, cfg: ModelConfig, family: families.Family) -> list[str]:
    """`model.lora.target_modules`, or the family's defaults, keeping those that exist in the model."""
    wanted = list(cfg.lora.target_modules) or list(family.lora_targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in wanted if t in names]
    if not found:
        raise ConfigError(f"model.lora.target_modules={wanted} matches no module of this {type(model).__name__}; "
                          f"examples: {sorted(n for n in names if n)[:12]}")
    return found


def add_lora(model, cfg: ModelConfig, family: families.Family | None = None):
    """Wrap the model with peft LoRA adapters; only the adapters (and nothing else) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    family = family or families.of_model(model) or families.get(cfg.family)
    lora = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=lora_targets(model, cfg, family),
                          fan_in_fan_out=family.lora_fan_in_fan_out)
    return get_peft_model(model, lora)


def merge_lora(model):
    """The plain transformers model with adapters folded into the base weights (a no-op without LoRA)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def transformer_blocks(model) -> list[Any]:
    """The repeated blocks of the model (its family's block lists: gpt2 `h`, llama `layers`, t5 `block`, ...).

    These are the units that FSDP2 shards and that activation checkpointing recomputes.
    """
    import torch.nn as nn

    family = families.of_model(model)
    names = family.block_lists if family else tuple({n for f in families.FAMILIES.values() for n in f.block_lists})
    blocks: list[Any] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in names:
            if len(module) and len({type(m) for m in module}) == 1 and sum(1 for _ in module[0].parameters()) > 2:
                blocks.extend(module)
    return blocks


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
