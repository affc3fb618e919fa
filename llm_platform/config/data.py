"""Schema of the `data` group: corpus sources, cleaning, dedup, split, packing."""

from dataclasses import dataclass, field

from llm_platform.config.choices import ChatOverflow, Choice, DatasetKind, OnError, SourceFormat, TextUnit


@dataclass
class GopherQualityConfig:
    """Gopher's quality rules (Rae et al. 2021, "Scaling Language Models", table A1), with datatrove's
    GopherQualityFilter defaults as published. Words are word and punctuation tokens (llm_platform/data/filters).
    A threshold of 0 disables its rule."""

    enabled: bool = False
    """Apply this rule set (`data/filters=gopher` or `fineweb` turns it on)."""
    min_words: int = 50
    """Drop documents with fewer non-symbol words."""
    max_words: int = 100_000
    """Drop documents with more non-symbol words."""
    min_mean_word_length: float = 3.0
    """Lowest allowed mean length of the non-symbol words, in characters."""
    max_mean_word_length: float = 10.0
    """Highest allowed mean length of the non-symbol words, in characters."""
    max_symbol_word_ratio: float = 0.1
    """Highest allowed ratio to words of `#` symbols, and (separately) of ellipses (`...`, `\u2026`)."""
    max_bullet_lines_ratio: float = 0.9
    """Highest allowed fraction of lines starting with a bullet (`\u2022` or `-`)."""
    max_ellipsis_lines_ratio: float = 0.3
    """Highest allowed fraction of lines ending with an ellipsis."""
    min_alpha_words_ratio: float = 0.8
    """Lowest allowed fraction of words with at least one alphabetic character."""
    min_stop_words: int = 2
    """Fewest distinct `stop_words` a document must contain."""
    stop_words: list[str] = field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])
    """Gopher's English stop words (matched case-sensitively, as published)."""


@dataclass
class GopherRepetitionConfig:
    """Gopher's repetition rules (Rae et al. 2021, table A1; datatrove's GopherRepetitionFilter defaults). Fractions
    of characters are of the whole text. A threshold of 0 disables its rule."""

    enabled: bool = False
    """Apply this rule set (`data/filters=gopher` or `fineweb` turns it on)."""
    max_dup_para_frac: float = 0.3
    """Highest allowed fraction of paragraphs (split on blank lines) that repeat an earlier one."""
    max_dup_para_char_frac: float = 0.2
    """Highest allowed fraction of characters in repeated paragraphs."""
    max_dup_line_frac: float = 0.3
    """Highest allowed fraction of lines that repeat an earlier one."""
    max_dup_line_char_frac: float = 0.2
    """Highest allowed fraction of characters in repeated lines."""
    max_top_2gram_char_frac: float = 0.2
    """Highest allowed fraction of characters in the most frequent word 2-gram (its length x its count)."""
    max_top_3gram_char_frac: float = 0.18
    """Highest allowed fraction of characters in the most frequent word 3-gram (its length x its count)."""
    max_top_4gram_char_frac: float = 0.16
    """Highest allowed fraction of characters in the most frequent word 4-gram (its length x its count)."""
    max_dup_5gram_char_frac: float = 0.15
    """Highest allowed fraction of characters in word 5-grams repeating an earlier one (non-overlapping)."""
    max_dup_6gram_char_frac: float = 0.14
    """Highest allowed fraction of characters in word 6-grams repeating an earlier one (non-overlapping)."""
    max_dup_7gram_char_frac: float = 0.13
    """Highest allowed fraction of characters in word 7-grams repeating an earlier one (non-overlapping)."""
    max_dup_8gram_char_frac: float = 0.12
    """Highest allowed fraction of characters in word 8-grams repeating an earlier one (non-overlapping)."""
    max_dup_9gram_char_frac: float = 0.11
    """Highest allowed fraction of characters in word 9-grams repeating an earlier one (non-overlapping)."""
    max_dup_10gram_char_frac: float = 0.1
    """Highest allowed fraction of characters in word 10-grams repeating an earlier one (non-overlapping)."""


@dataclass
class C4Config:
    """C4's rules (Raffel et al. 2020, section 2.2; datatrove's C4QualityFilter defaults): lines that fail a line rule
    are removed from a plain-text document (sft/chat/seq2seq records keep their text and only the document rules
    drop them), then the document is dropped with fewer than `min_sentences` left, or when it holds a word of C4's
    bad-words list (`bad_words`; llm_platform/data/filters/badwords.py)."""

    enabled: bool = False
    """Apply this rule set (`data/filters=c4` or `fineweb` turns it on)."""
    remove_citations: bool = True
    """Remove Wikipedia-style citation marks (`[1]`, `[edit]`, `[citation needed]`) from lines."""
    filter_no_terminal_punct: bool = True
    """Remove lines that do not end in terminal punctuation (`.?!"'`) or end in an ellipsis."""
    min_words_per_line: int = 3
    """Remove lines with fewer words (0 disables)."""
    max_word_length: int = 1000
    """Remove lines holding a word longer than this many characters (0 disables)."""
    min_sentences: int = 5
    """Drop documents with fewer sentences left (0 disables)."""
    filter_lorem_ipsum: bool = True
    """Drop documents containing "lorem ipsum"."""
    filter_javascript: bool = True
    """Remove lines mentioning "javascript"."""
    filter_curly_bracket: bool = True
    """Drop documents containing `{` (code)."""
    filter_policy: bool = True
    """Remove lines about terms of use, privacy or cookie policies."""
    bad_words: bool = False
    """Drop documents holding a word of their language's LDNOOBW list (C4's bad-words filter; the lists ship with
    the package, for 25 languages). `data/filters=c4` turns it on."""
    bad_words_language: str = "en"
    """The list for documents whose language was not detected (no `data.languages` or `data.detect_language`)."""
    bad_words_uri: str = ""
    """A list of your own (a word or phrase per line, local or s3://) instead of the bundled ones, for every
    language. Its contents are not part of the dataset's fingerprint: give an edited list a new name."""


@dataclass
class FineWebConfig:
    """FineWeb's own rules (Penedo et al. 2024; datatrove's FineWebQualityFilter defaults). A threshold of 0 disables
    its rule."""

    enabled: bool = False
    """Apply this rule set (`data/filters=fineweb` turns it on)."""
    min_line_punct_ratio: float = 0.12
    """Lowest allowed fraction of lines ending in terminal punctuation."""
    max_short_line_ratio: float = 0.67
    """Highest allowed fraction of lines of at most `short_line_chars` characters."""
    short_line_chars: int = 30
    """A line this long or shorter is short."""
    max_char_dup_ratio: float = 0.01
    """Highest allowed fraction of characters (newlines excluded) in lines that repeat an earlier one."""
    max_newline_word_ratio: float = 0.3
    """Highest allowed ratio of newlines to words (list-like pages)."""


class DecontaminationMode(Choice):
    drop = "drop"
    report = "report"


@dataclass
class DecontaminationConfig:
    """Eval-set decontamination (llm_platform/data/filters/decontam.py): a document sharing a word n-gram (lower-cased,
    punctuation stripped) with an eval task's text is dropped or reported, counted as `decontamination.<task>`, and
    listed in the manifest with the overlapping span. Off by default."""

    enabled: bool = False
    """Check the cleaned documents against `sources`."""
    ngram: int = 13
    """Words per n-gram (13: GPT-3's decontamination and most since)."""
    mode: DecontaminationMode = DecontaminationMode.drop
    """drop (remove the document) or report (keep it; count and list it in the manifest)."""
    sources: list[str] = field(default_factory=list)
    """Eval texts: JSONL files (local or s3://, e.g. the eval stage's `eval.tasks_uri`), whose `text_fields` are read,
    and lm-evaluation-harness tasks as `harness:<task>` (the `harness` extra)."""
    text_fields: list[str] = field(default_factory=lambda: ["prompt", "references"])
    """Fields of a JSONL source holding eval text (a string or a list of strings; missing fields are skipped)."""
    harness_include_path: str | None = None
    """A local folder of lm-eval task YAMLs for `harness:` sources (relative `data_files` name files inside it)."""
    documents_reported: int = 100
    """Contaminated documents listed in the manifest (task, file, line, span; all are counted)."""


@dataclass
class FilterConfig:
    """Quality filters: the basic rules below (loose Gopher-style heuristics, on by default), then the published rule
    sets (off by default; `data/filters=gopher|c4|fineweb|none` picks a preset). Each has a switch and thresholds."""

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
    # The published rule sets, applied after the rules above, in datatrove's FineWeb order (llm_platform/data/filters).
    # Each preset in conf/data/filters/ turns its sets on and the overlapping rules above off.
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    """Gopher's repetition rules."""
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    """Gopher's quality rules."""
    c4: C4Config = field(default_factory=C4Config)
    """C4's rules."""
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    """FineWeb's rules."""
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    """Eval-set decontamination (after every rule, on the cleaned text)."""


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
class MixtureSource:
    """One named source of a mixture (`data.mixture.<name>`): its files, its share and its caps
    (llm_platform/data/mixture.py)."""

    sources: list[str] = field(default_factory=list)
    """URIs or globs of this source's files (as `data.sources`). A file may belong to several sources that keep
    different `languages`; a document goes to the first source (in name order) that keeps its language."""
    weight: float = 1.0
    """This source's share of the mixture's train tokens (weights are normalized; 0 leaves the source out)."""
    max_tokens: int = 0
    """Take at most this many train tokens of this source before weighting (0: no cap)."""
    max_documents: int = 0
    """Take at most this many train documents of this source before weighting (0: no cap)."""
    languages: list[str] = field(default_factory=list)
    """Only documents detected in these languages (LID-176 codes) belong to this source; empty: any language."""


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
    (source/target), preference (prompt with a chosen and a rejected answer, for DPO: llm_platform/data/pairs.py)."""
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
    pack_supervised: bool = True
    """sft and chat: several whole records per seq_len row (first-fit-decreasing, `position_ids` restarting per
    record; training keeps each record's attention inside itself), not one record padded per row. Other kinds
    ignore it. Part of the fingerprint only when it packs (llm_platform/data/pack.py)."""
    chosen_field: str = "chosen"
    """Preference records: the preferred answer (a string, or assistant message(s); llm_platform/data/pairs.py)."""
    rejected_field: str = "rejected"
    """Preference records: the dispreferred answer. The prompt is `prompt_field` (a string or messages), or the
    shared start of chosen and rejected when both are whole conversations."""
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
    languages: list[str] | None = field(default_factory=list)
    """ISO 639 codes of the languages to keep (`[en,de]`), detected with fastText's LID-176 model; empty (or null)
    keeps every language and detects none (unless `detect_language`)."""
    language_threshold: float = 0.65
    """A document is kept when a listed language's confidence is above this (datatrove's default)."""
    detect_language: bool = False
    """Detect every document's language even with no `languages` listed (a `language` column and counts)."""
    filter_examples_reported: int = 3
    """Dropped documents shown per drop reason in the manifest (`filter_examples`: the first ones in file order)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Deduplication."""
    mixture: dict[str, MixtureSource] = field(default_factory=dict)
    """Named sources weighted into one dataset (`data.mixture={web: {sources: [...], weight: 0.7}, code: {...}}`),
    used instead of `data.sources`: each source is read, cleaned and deduplicated with the others, then its
    documents are sampled (or repeated) to its weight's share of the train tokens (llm_platform/data/mixture.py).
    The manifest's `mixture` gives the realised proportions."""
    mixture_tokens: int = 0
    """Train tokens of the mixture; 0 takes as many as the weights allow without repeating any source (the source
    shortest of its share is taken whole). Larger: sources short of their share are repeated (reported)."""
    mixture_seed: int = 0
    """Seed of the documents each source's sample takes (the same seed and inputs give the same dataset)."""
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
