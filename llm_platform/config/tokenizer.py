"""Schema of the `tokenizer` group."""

from dataclasses import dataclass


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on the cleaned corpus, or load an HF-format tokenizer."""

    kind: str = "bpe"
    """bpe (train one) or pretrained (load `path`)."""
    path: str | None = None
    """HF-format tokenizer folder (local or s3://) when kind=pretrained."""
    vocab_size: int = 2048
    """Vocabulary size of a trained BPE."""
    min_frequency: int = 2
    """Minimum pair frequency of a trained BPE."""
    max_training_documents: int = 200_000
    """Documents sampled (deterministically) to train the BPE."""
    special_tokens: list[str] | None = None
    """Extra special tokens; `<|endoftext|>`, `<|pad|>`, `<|mask|>` are always present."""
