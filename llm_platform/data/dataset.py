"""A finished dataset folder as the later stages see it: its manifest, shard URIs and tokenizer.

Layout (under `datasets/<name>/<fingerprint>/`, see docs/ARCHITECTURE.md):
    manifest.json      written last; a folder without it is incomplete and never read
    tokenizer/         HF-format tokenizer (tokenizer.json, tokenizer_config.json, ...; a pretrained one byte for byte)
    train/*.parquet    train split shards
    val/*.parquet      validation split shards

Shard columns by `kind`:
    pretrain  input_ids (list<int32>, exactly seq_len tokens; documents joined by EOS)
    sft       input_ids (seq_len, right-padded with pad id), labels (-100 on prompt and padding), attention_mask
    chat      as sft; labels are -100 except on the assistant turns of the rendered conversation
    seq2seq   input_ids, attention_mask (seq_len, padded), labels (target_len, -100 padded)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from llm_platform import storage
from llm_platform.data.manifest import Manifest
from llm_platform.errors import DataError

MANIFEST = "manifest.json"
SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "<|pad|>", "mask": "<|mask|>"}
# The files of an HF tokenizer folder (those present are copied; tokenizer.json is the one loaders need).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def copy_tokenizer_files(src: str, local_dir: str) -> None:
    """The tokenizer files present in storage folder `src`, copied byte for byte into `local_dir` (a released
    checkpoint's tokenizer is shipped as it came, never re-saved)."""
    for name in TOKENIZER_FILES:
        if storage.exists(storage.join(src, name)):
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(src, name)))


@dataclass
class DatasetInfo:
    """What a consumer needs from a dataset folder."""

    uri: str
    manifest: Manifest
    files: dict[str, list[str]] = field(default_factory=dict)
    row_groups: dict[str, list[list[list[int]]] | None] = field(default_factory=dict)
    """Per split, each file's row groups as [rows, count] runs (None: an older manifest without them)."""

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def tokenizer_uri(self) -> str:
        return storage.join(self.uri, "tokenizer")

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def manifest_sha256(self) -> str:
        return storage.fingerprint(self.manifest, length=64)

    @property
    def base_tokenizer_sha256(self) -> str | None:
        """Hash of the pretrained tokenizer the dataset's was copied from (None for a tokenizer trained here)."""
        return self.manifest["tokenizer"].get("base_sha256")

    @property
    def base_vocab_size(self) -> int | None:
        """Length of that pretrained tokenizer before `tokenizer.special_tokens` were added (None: trained here)."""
        value = self.manifest["tokenizer"].get("base_vocab_size")
        return int(value) if value is not None else None

    def special_token_id(self, name: str) -> int | None:
        """`eos`, `pad` or `mask` token id (None when the tokenizer has no such token, e.g. no mask)."""
        value = self.manifest["tokenizer"].get(f"{name}_token_id")
        return int(value) if value is not None else None

    def load_tokenizer(self):
        """The dataset's tokenizer as a `PreTrainedTokenizerFast` (copied locally first for s3://)."""
        return load_tokenizer(self.tokenizer_uri)


def open_dataset(uri: str) -> DatasetInfo:
    """Read a dataset folder's manifest; refuse a folder without one (an incomplete or missing dataset)."""
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise DataError(f"no dataset at {uri}: {MANIFEST} is missing (run `llm-platform data` first, or the run was "
                        f"interrupted before it finished)")
    manifest = storage.read_json(manifest_uri)
    files = {split: [storage.join(uri, rel) for rel in meta["files"]] for split, meta in manifest["splits"].items()}
    row_groups = {split: meta.get("row_groups") for split, meta in manifest["splits"].items()}
    return DatasetInfo(uri=uri, manifest=manifest, files=files, row_groups=row_groups)


def load_tokenizer(uri: str):
    """An HF-format tokenizer folder (local or s3://) as a `PreTrainedTokenizerFast`; never runs remote code."""
    from transformers import PreTrainedTokenizerFast

    local = uri
    if storage.is_remote(uri):
        local = storage.download_dir(uri, tempfile.mkdtemp(prefix="llmp-tok-"))
    else:
        local = storage.filesystem(uri)[1]
    if not os.path.exists(os.path.join(local, "tokenizer.json")):
        raise DataError(f"no tokenizer.json under {uri}")
    return PreTrainedTokenizerFast.from_pretrained(local)


def read_parquet(paths: str | list[str], filesystem, **kwargs):
    """`ray.data.read_parquet` with Ray Data's V1 parquet datasource.

    Ray 2.60's default (V2) parquet reader starts a pool of footer-reading actors, new processes, for every read it
    plans; on a 2-core machine each pool took 15-25 s against under a second for the V1 reader, which reads the
    footers inside its read tasks. The platform reads small shard sets often (training and
    perplexity read the splits), so every read goes through here. The switch is consulted
    when the read is planned, so it is set just for this call.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
    finally:
        ctx.use_datasource_v2 = v2
