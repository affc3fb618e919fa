"""The model families the platform trains, in one table: adding a family means adding one `Family` row here.

Every module that needs to know something per architecture reads it from this table: `models/build.py` (the
transformers config from `ModelConfig`, the class with the LM head), `models/flops.py` (parameter counts on the
meta device), `train/parallelize.py` (the blocks that FSDP2 shards and activation checkpointing recomputes), LoRA
(the default target modules, GPT-2's transposed Conv1D) and `train/plan.py`. A pretrained checkpoint is matched to
its family by the `model_type` in its config.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llm_platform.config.model import ModelConfig
from llm_platform.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """What the platform needs to know about one architecture family."""

    name: str
    """`model.family` value."""
    model_types: tuple[str, ...]
    """`model_type` values of transformers configs (config.json) that belong to this family."""
    objectives: tuple[str, ...]
    """Training objectives this family can train (the first is its natural one)."""
    model_class: str
    """transformers class with the LM head (an Auto class where one fits)."""
    block_lists: tuple[str, ...]
    """Attribute names of the ModuleLists holding the repeated blocks (the units FSDP2 shards)."""
    lora_targets: tuple[str, ...]
    """Default LoRA target modules (attention query/value projections)."""
    make_config: Callable[[ModelConfig, int, Mapping[str, int | None]], Any]
    """(model config, vocab size, special token ids) -> transformers config for training from scratch."""
    lora_fan_in_fan_out: bool = False
    """The targets are transposed Conv1D layers (GPT-2), which peft must be told about."""


def _gpt2(cfg: ModelConfig, vocab: int, special: Mapping[str, int | None]):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      bos_token_id=special["eos"], eos_token_id=special["eos"], pad_token_id=special["pad"],
                      tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)


def _decoder_kwargs(cfg: ModelConfig, vocab: int, special: Mapping[str, int | None]) -> dict[str, Any]:
    """Keyword arguments shared by the Llama-style configs (Llama, Mistral, Qwen2)."""
    kv = cfg.num_kv_heads or cfg.num_heads
    if cfg.num_heads % kv:
        raise ConfigError(f"model.num_heads={cfg.num_heads} is not a multiple of model.num_kv_heads={kv}")
    # The MLP is gated (3 matrices), so ~8/3 of the width keeps the FLOPs of a 4x MLP; round to 64.
    inter = cfg.intermediate_size or 64 * ((int(8 * cfg.hidden_size / 3) + 63) // 64)
    return dict(vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=inter,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=kv,
                max_position_embeddings=cfg.max_position_embeddings, attention_dropout=cfg.dropout,
                rope_theta=cfg.rope_theta, bos_token_id=special["eos"], eos_token_id=special["eos"],
                pad_token_id=special["pad"], tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)


def _llama(cfg: ModelConfig, vocab: int, special: Mapping[str, int | None]):
    from transformers import LlamaConfig

    return LlamaConfig(**_decoder_kwargs(cfg, vocab, special))


def _mistral(cfg: ModelConfig, vocab: int, special: Mapping[str, int | None]):
    from transformers import MistralConfig

    return MistralConfig(**_decoder_kwargs(cfg, vocab, special))


def _qwen2(cfg: ModelConfig, vocab: int, special: Mapping[str, int | None]):
    from transformers import Qwen2Config

    return Qwen2Config(**_decoder_kwargs(cfg, vocab, special))


def _t5(cfg: ModelConfig, vocab: int, special: Mapping[str, int | None]):
    from transformers import T5Config

    if not cfg.tie_word_embeddings:
        # transformers 5 ties T5's output head to the shared embedding whatever the config says (False only turns
        # off the decoder-output scaling): refuse rather than train a model that is not what was asked for.
        raise ConfigError("model.tie_word_embeddings=false is not supported for model.family=t5: transformers ties "
                          "T5's output head to its embedding; leave it true")
    # T5Config's typed __init__ omits the generic config keys it takes as **kwargs (decoder_start_token_id...).
    return T5Config(vocab_size=vocab, d_model=cfg.hidden_size,  # type: ignore[call-arg]
                    d_kv=cfg.hidden_size // cfg.num_heads,
                    d_ff=cfg.intermediate_size or 4 * cfg.hidden_size, num_layers=cfg.num_layers,
                    num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads, dropout_rate=cfg.dropout,
                    pad_token_id=special["pad"], eos_token_id=special["eos"], decoder_start_token_id=special["pad"],
                    tie_word_embeddings=cfg.tie_word_embeddings, use_cache=False)


def _bert(cfg: ModelConfig, vocab: int, special: Mapping[str, int | None]):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
                      max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, pad_token_id=special["pad"],
                      tie_word_embeddings=cfg.tie_word_embeddings)


_CAUSAL = ("clm", "sft", "dpo")
_DECODER_LORA = ("q_proj", "v_proj")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", ("gpt2",), _CAUSAL, "AutoModelForCausalLM", ("h",), ("c_attn",), _gpt2, lora_fan_in_fan_out=True),
    Family("llama", ("llama",), _CAUSAL, "AutoModelForCausalLM", ("layers",), _DECODER_LORA, _llama),
    Family("mistral", ("mistral",), _CAUSAL, "AutoModelForCausalLM", ("layers",), _DECODER_LORA, _mistral),
    Family("qwen2", ("qwen2",), _CAUSAL, "AutoModelForCausalLM", ("layers",), _DECODER_LORA, _qwen2),
    Family("t5", ("t5",), ("seq2seq",), "T5ForConditionalGeneration", ("block",), ("q", "v"), _t5),
    Family("bert", ("bert",), ("mlm",), "BertForMaskedLM", ("layer",), ("query", "value"), _bert),
)}


def get(name: str) -> Family:
    """The family named `name` (`model.family`); a ConfigError lists the choices."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def of_model_type(model_type: str | None, where: str = "model.pretrained") -> Family:
    """The family of a transformers `model_type` (from a checkpoint's config.json)."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"{where}: config.json has model_type={model_type!r}, which no family in "
                      f"llm_platform/models/families.py covers ({', '.join(known)})")


def of_model(model) -> Family | None:
    """The family of a built model (peft-wrapped or not), by its config's `model_type`; None if unknown."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def model_class(family: Family):
    """The transformers class with the LM head."""
    import transformers

    return getattr(transformers, family.model_class)
