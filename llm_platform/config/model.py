"""Schema of the `model` group: a Hugging Face architecture built from config, or a pretrained checkpoint."""

from dataclasses import dataclass, field


@dataclass
class LoraConfig:
    """LoRA adapters via peft; merged into the base weights on export."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    rank: int = 8
    """Adapter rank r."""
    alpha: int = 16
    """Adapter scaling alpha."""
    dropout: float = 0.0
    """Adapter dropout."""
    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "q_proj", "v_proj"])
    """Module names that get adapters (those absent in the architecture are ignored)."""


@dataclass
class ModelConfig:
    """A transformers architecture. The vocab size follows the dataset's tokenizer."""

    name: str = "debug"
    """Preset name, used for run and registry names."""
    family: str = "gpt2"
    """Architecture family: gpt2, llama, t5, bert."""
    pretrained: str | None = None
    """HF-format checkpoint to start from (local, s3://, or `registry:<model>[/<version>]`); None trains from scratch."""
    num_layers: int = 2
    """Transformer blocks (encoder and decoder each, for t5)."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama); None equals num_heads."""
    hidden_size: int = 64
    """Model width."""
    intermediate_size: int | None = None
    """MLP width; None uses the family's default multiple of hidden_size."""
    max_position_embeddings: int = 256
    """Longest sequence the model accepts."""
    vocab_size: int | None = None
    """Vocabulary size; None follows the dataset's tokenizer (a different value must match it)."""
    rope_theta: float = 10000.0
    """Rotary embedding base (llama)."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa (fused, default) or eager."""
    dropout: float = 0.0
    """Dropout probability."""
    tie_word_embeddings: bool = True
    """Share input and output embeddings."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA fine-tuning."""
