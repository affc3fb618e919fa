"""Schema of the `tokenizer` group."""

from dataclasses import dataclass

from llm_platform.config.choices import TokenizerKind


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on the cleaned corpus, or use a pretrained tokenizer as it is."""

    kind: TokenizerKind = TokenizerKind.bpe
    """bpe (train one) or pretrained (use `path` unaltered; `tokenizer=model` points it at model.pretrained)."""
    path: str | None = None
    """kind=pretrained: an HF tokenizer folder (local or s3://), or a model reference (`registry:<name>[/<version>]`,
    a Hub id) whose tokenizer to use."""
    vocab_size: int = 2048
    """Vocabulary size of a trained BPE."""
    min_frequency: int = 2
    """Minimum pair frequency of a trained BPE."""
    max_training_documents: int = 200_000
    """Documents sampled (deterministically) to train the BPE."""
    special_tokens: list[str] | None = None
    """bpe: extra special tokens (`<|endoftext|>`, `<|pad|>`, `<|mask|>` are always present). pretrained: tokens to
    add to the model's tokenizer (the only way it is altered); training resizes the embeddings and starts the new
    rows at the mean of the existing ones."""
