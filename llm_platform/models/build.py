"""Hugging Face models from `ModelConfig`: configs for gpt2/llama/t5/bert, pretrained loads, LoRA adapters.

Model code here is architecture only; parallelism, activation checkpointing and compile are applied from outside
(`llm_platform/train/parallelize.py`). Pretrained weights are read only from safetensors, never unpickled.
"""

from __future__ import annotations

import os
from typing import Any

from llm_platform.config.model import ModelConfig
from llm_platform.errors import ConfigError

FAMILIES = ("gpt2", "llama", "t5", "bert")
# Which objective each family can train, and the dataset kind each objective reads.
OBJECTIVES = {"gpt2": ("clm", "sft"), "llama": ("clm", "sft"), "t5": ("seq2seq",), "bert": ("mlm",)}
DATASET_KIND = {"clm": "pretrain", "sft": "sft", "seq2seq": "seq2seq", "mlm": "pretrain"}


def hf_config(cfg: ModelConfig, vocab_size: int, special: dict[str, int]):
    """A transformers config for the architecture in `cfg`.

    Args:
        cfg: the model node.
        vocab_size: the dataset tokenizer's vocabulary size (used unless `cfg.vocab_size` is set).
        special: `eos`, `pad` (and `mask`) token ids of the tokenizer.
    """
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.family!r}: choose one of {', '.join(FAMILIES)}")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.hidden_size} is not a multiple of model.num_heads={cfg.num_heads}")
    vocab = cfg.vocab_size or vocab_size
    eos, pad = special["eos"], special["pad"]
    if cfg.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                          n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                          resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                          tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)
    if cfg.family == "llama":
        from transformers import LlamaConfig

        kv = cfg.num_kv_heads or cfg.num_heads
        if cfg.num_heads % kv:
            raise ConfigError(f"model.num_heads={cfg.num_heads} is not a multiple of model.num_kv_heads={kv}")
        # Llama's MLP is gated (3 matrices), so ~8/3 of the width keeps the FLOPs of a 4x MLP; round to 64.
        inter = cfg.intermediate_size or 64 * ((int(8 * cfg.hidden_size / 3) + 63) // 64)
        return LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=inter,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           num_key_value_heads=kv, max_position_embeddings=cfg.max_position_embeddings,
                           attention_dropout=cfg.dropout, rope_theta=cfg.rope_theta,
                           bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                           tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)
    if cfg.family == "t5":
        from transformers import T5Config

        return T5Config(vocab_size=vocab, d_model=cfg.hidden_size, d_kv=cfg.hidden_size // cfg.num_heads,
                        d_ff=cfg.intermediate_size or 4 * cfg.hidden_size, num_layers=cfg.num_layers,
                        num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads, dropout_rate=cfg.dropout,
                        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad,
                        tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
                      max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad,
                      tie_word_embeddings=cfg.tie_word_embeddings)


def model_class(family: str):
    """The transformers class with the LM head for a family."""
    import transformers

    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r}: choose one of {', '.join(FAMILIES)}")
    return {"gpt2": transformers.AutoModelForCausalLM, "llama": transformers.AutoModelForCausalLM,
            "t5": transformers.T5ForConditionalGeneration, "bert": transformers.BertForMaskedLM}[family]


def build_model(cfg: ModelConfig, vocab_size: int, special: dict[str, int], *, pretrained_dir: str | None = None,
                seed: int = 0):
    """A model from scratch (weights seeded by `seed`) or from a local HF-format folder (safetensors only).

    LoRA adapters are added when `cfg.lora.enabled`.
    """
    import torch

    cls = model_class(cfg.family)
    if pretrained_dir:
        if not any(f.endswith(".safetensors") for f in os.listdir(pretrained_dir)):
            raise ConfigError(f"model.pretrained={cfg.pretrained!r} has no .safetensors weights; pickled weights "
                              f"are never loaded")
        model = cls.from_pretrained(pretrained_dir, use_safetensors=True, attn_implementation=cfg.attn_implementation,
                                    dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"model.pretrained={cfg.pretrained!r} has a vocab of {model.config.vocab_size}, smaller "
                              f"than the dataset tokenizer's {vocab_size}: tokenizer and model do not match")
    else:
        torch.manual_seed(seed)
        config = hf_config(cfg, vocab_size, special)
        # Auto classes have `from_config`; concrete ones (T5, BERT) the equivalent `_from_config`.
        make = getattr(cls, "from_config", None) or cls._from_config
        model = make(config, attn_implementation=cfg.attn_implementation, dtype=torch.float32)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    return model


def lora_targets(model, wanted: list[str]) -> list[str]:
    """The subset of `wanted` module names that exist in the model (so one preset list serves every family)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in wanted if t in names]
    if not found:
        raise ConfigError(f"model.lora.target_modules={wanted} matches no module of this {type(model).__name__}; "
                          f"examples: {sorted(n for n in names if n)[:12]}")
    return found


def add_lora(model, cfg: ModelConfig):
    """Wrap the model with peft LoRA adapters; only the adapters (and nothing else) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # peft's GPT-2 Conv1D layers need fan_in_fan_out; it is set from the model type automatically.
    lora = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=lora_targets(model, list(cfg.lora.target_modules)),
                          fan_in_fan_out=cfg.family == "gpt2")
    return get_peft_model(model, lora)


def merge_lora(model):
    """The plain transformers model with adapters folded into the base weights (a no-op without LoRA)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def transformer_blocks(model) -> list[Any]:
    """The repeated blocks of any supported family (gpt2 `h`, llama `layers`, t5 `block`, bert `layer`).

    These are the units that FSDP2 shards and that activation checkpointing recomputes.
    """
    import torch.nn as nn

    blocks: list[Any] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("h", "layers", "layer", "block"):
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
