"""Schema of the `model` group: a Hugging Face architecture built from config, or a pretrained checkpoint."""

from dataclasses import dataclass, field

from llm_platform.config.choices import AttnImplementation, LoraExport


@dataclass
class LoraConfig:
    """LoRA adapters via peft; merged into the base weights on export, or exported as a peft adapter."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    rank: int = 8
    """Adapter rank r."""
    alpha: int = 16
    """Adapter scaling alpha."""
    dropout: float = 0.0
    """Adapter dropout."""
    target_modules: list[str] = field(default_factory=list)
    """Module names that get adapters (those absent in the architecture are ignored); empty uses the family's
    defaults in llm_platform/models/families.py (attention query/value projections)."""
    export: LoraExport = LoraExport.merged
    """What the run exports: merged (a plain HF model with the adapters folded in) or adapter (peft's
    adapter_config.json + adapter_model.safetensors, plus the base's tokenizer files, loadable with
    `PeftModel.from_pretrained(base, export)`; registering, evaluating and serving want merged)."""


@dataclass
class ModelConfig:
    """A transformers architecture. The vocab size follows the dataset's tokenizer."""

    name: str = "debug"
    """Preset name, used for run and registry names."""
    family: str = "gpt2"
    """Architecture family: gpt2, llama, mistral, qwen2, t5, bert (llm_platform/models/families.py); with
    `pretrained` set, the checkpoint's config.json decides it."""
    pretrained: str | None = None
    """HF-format checkpoint to start from: a local folder, s3://, `registry:<model>[/<version>]`, or a Hugging Face
    Hub id where the cluster reaches the Hub; None trains from scratch. Its architecture and weights replace the
    preset's, and its own tokenizer is the one to build the data with (`tokenizer=model`)."""
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
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    """transformers attention kernel: sdpa (fused, default) or eager."""
    dropout: float = 0.0
    """Dropout probability."""
    tie_word_embeddings: bool = True
    """Share input and output embeddings (always shared for t5: transformers ties them; false is refused)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA fine-tuning."""
