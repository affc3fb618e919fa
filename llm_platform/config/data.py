"""Schema of the `data` group: corpus sources, cleaning, dedup, split, packing."""

from dataclasses import dataclass, field

from llm_platform.config.choices import ChatOverflow, DatasetKind, OnError, SourceFormat, TextUnit


@dataclass
class FilterConfig:
    """Quality filters (Gopher-style heuristics). Each has a switch and its thresholds."""

    min_chars: int = 20
    """Drop documents shorter than this many characters (0 disables)."""
    max_chars: int = 1_000_000
    """Drop documents longer than this many characters (0 disables)."""
    min_words: int = 3
    """Drop documents with fewer words (0 disables)."""
    mean_word_length: bool = True
    """Enable the mean word length filter."""
    min_mean_word_length: float = 2.0
    """Lowest allowed mean word length, in characters."""
    max_mean_word_length: float = 12.0
    """Highest allowed mean word length, in characters."""
    symbol_ratio: bool = True
    """Enable the symbol-to-word ratio filter (`#` and `...`)."""
    max_symbol_to_word_ratio: float = 0.1
    """Highest allowed ratio of `#`/ellipsis symbols to words."""
    alpha_fraction: bool = True
    """Enable the alphabetic-word fraction filter."""
    min_alpha_word_fraction: float = 0.7
    """Lowest allowed fraction of words that contain a letter."""
    repeated_lines: bool = True
    """Enable the duplicate-line fraction filter."""
    max_repeated_line_fraction: float = 0.3
    """Highest allowed fraction of lines that repeat an earlier line of the same document."""


@dataclass
class DedupConfig:
    """Deduplication: exact (hash of normalized text) and near-duplicate (MinHash LSH)."""

    exact: bool = True
    """Drop documents whose normalized text hashes equal an earlier one."""
    near: bool = True
    """Drop near-duplicates found by MinHash LSH."""
    threshold: float = 0.8
    """Estimated Jaccard similarity (of word shingles) above which documents are near-duplicates."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    shingle_words: int = 5
    """Words per shingle."""
    seed: int = 1
    """Seed of the MinHash permutations."""


@dataclass
class SampleCorpusConfig:
    """The built-in corpus generated deterministically when no `sources` are given."""

    num_documents: int = 2000
    """Documents to generate."""
    seed: int = 0
    """Generator seed."""


@dataclass
class DataConfig:
    """The data stage: corpus URIs to a tokenized, packed dataset."""

    name: str = "sample"
    """Dataset name; its output goes to `datasets/<name>/<fingerprint>/`."""
    sources: list[str] = field(default_factory=list)
    """Corpus URIs or globs (local or s3://): .jsonl/.json/.parquet/.txt, optionally .gz/.zst, or a saved HF dataset
    folder. Empty uses the built-in sample corpus."""
    format: SourceFormat = SourceFormat.auto
    """Source format: auto (by extension), jsonl, json, parquet, text, hf."""
    text_field: str = "text"
    """Field holding the document text (jsonl/json/parquet/hf)."""
    text_unit: TextUnit = TextUnit.file
    """What one document is in plain-text sources: file, paragraph (blank-line separated) or line."""
    max_record_bytes: int = 16_000_000
    """Records (lines, files) larger than this are skipped unread as `record_too_large`."""
    kind: DatasetKind = DatasetKind.pretrain
    """Record kind: pretrain (packed text), sft (prompt/response with a loss mask), chat (conversations rendered
    with the tokenizer's chat template, loss on the assistant turns: llm_platform/data/chat.py), seq2seq
    (source/target)."""
    prompt_field: str = "prompt"
    """Prompt field for sft records."""
    response_field: str = "response"
    """Response field for sft records."""
    messages_field: str = "messages"
    """Field of chat records holding OpenAI-style messages (role system/user/assistant, string content)."""
    instruction_field: str = "instruction"
    """Alpaca-style chat records: the instruction field (with `input_field` appended when not empty)."""
    input_field: str = "input"
    """Alpaca-style chat records: the optional input field."""
    output_field: str = "output"
    """Alpaca-style chat records: the answer field."""
    chat_overflow: ChatOverflow = ChatOverflow.truncate
    """A chat longer than seq_len tokens: truncate (cut at seq_len; skipped if no assistant token is left) or skip.
    Both are counted in the manifest."""
    source_field: str = "source"
    """Source field for seq2seq records."""
    target_field: str = "target"
    """Target field for seq2seq records."""
    seq_len: int = 128
    """Tokens per packed block (the training context length)."""
    target_len: int = 64
    """Target tokens per seq2seq record."""
    val_fraction: float = 0.05
    """Fraction of documents (by document hash) held out for validation."""
    normalize: str = "NFC"
    """Unicode normalization form (NFC, NFKC, ...; empty disables)."""
    scrub_pii: bool = False
    """Replace emails, phone numbers and IP addresses with placeholders."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Quality filters."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Deduplication."""
    sample: SampleCorpusConfig = field(default_factory=SampleCorpusConfig)
    """Built-in sample corpus."""
    on_error: OnError = OnError.skip
    """What a bad record does: skip (count and report it) or fail (stop with its file and line)."""
    num_shards: int = 0
    """Output shards per split (0 picks one per ~64 MB of tokens, at least the number of read blocks)."""
    tokenize_batch_size: int = 256
    """Documents per tokenization batch."""
    task_target_bytes: int = 64 << 20
    """Input bytes per task in the per-file phases: consecutive files are grouped into units of about this size
    (more units when the cluster has more task slots), so many small files cost per byte, not per file. Changes
    speed only, never the output."""
    max_records_reported: int = 50
    """Skipped records listed by name in the manifest (all are counted)."""
