"""Train a byte-level BPE with Hugging Face `tokenizers`, or take a pretrained model's tokenizer; save it with the
dataset.

A pretrained tokenizer (`tokenizer.kind=pretrained`, or `tokenizer=model`: the tokenizer of `model.pretrained`) is
never altered: its files are copied into the dataset byte for byte, so the dataset, the training run's check and
the export all see the same `tokenizer.json` hash. Only tokens the user lists in `tokenizer.special_tokens` are
added; the manifest then records the base tokenizer's hash and length, and training gives the added ids embedding
rows that start at the mean of the existing ones. A tokenizer without a pad token pads with EOS (the padding never
carries a loss or attention); one without a mask token cannot train MLM.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict

from llm_platform import storage
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data.chat import DEFAULT_CHAT_TEMPLATE
from llm_platform.data.dataset import SPECIAL_TOKENS, TOKENIZER_FILES, copy_tokenizer_files, load_tokenizer
from llm_platform.errors import ConfigError

# The chat format of tokenizers trained here: the default that serving and the chat data stage also use.
CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    return [SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"], SPECIAL_TOKENS["mask"], *(cfg.special_tokens or [])]


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig):
    """A byte-level BPE trained on `texts`, wrapped as a `PreTrainedTokenizerFast` with our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=special_tokens(cfg),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS["eos"],
                                   bos_token=SPECIAL_TOKENS["eos"], pad_token=SPECIAL_TOKENS["pad"],
                                   mask_token=SPECIAL_TOKENS["mask"], model_max_length=1 << 30)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def source_uri(cfg: TokenizerConfig, storage_root: str) -> str:
    """The folder a pretrained tokenizer is read from: `tokenizer.path` as a folder, or the model folder it names
    (`registry:<name>[/<version>]` or a Hub id)."""
    if not cfg.path:
        raise ConfigError("tokenizer.kind=pretrained needs tokenizer.path (tokenizer=model takes it from "
                          "model.pretrained, which is not set)")
    from llm_platform import registry
    from llm_platform.models import pretrained

    if cfg.path.startswith(registry.PREFIX) or pretrained.is_hub_id(cfg.path):
        return pretrained.locate(cfg.path, storage_root)
    if not storage.exists(storage.join(cfg.path, "tokenizer.json")):
        raise ConfigError(f"tokenizer.path={cfg.path!r} has no tokenizer.json (a fast tokenizer's file is needed)")
    return cfg.path


def fingerprint_record(cfg: TokenizerConfig, storage_root: str) -> dict:
    """What of the tokenizer config and files decides the dataset's token ids (part of the dataset fingerprint)."""
    record = asdict(cfg)
    if cfg.kind == "pretrained":
        uri = source_uri(cfg, storage_root)
        record["source"] = uri
        record["files"] = {name: storage.info(storage.join(uri, name)) for name in TOKENIZER_FILES
                           if storage.exists(storage.join(uri, name))}
    return record


def load_pretrained(cfg: TokenizerConfig, storage_root: str):
    """(tokenizer, source URI, tokens added): the pretrained tokenizer, with `tokenizer.special_tokens` added."""
    uri = source_uri(cfg, storage_root)
    tok = load_tokenizer(uri)
    added = [t for t in (cfg.special_tokens or []) if t not in tok.get_vocab()]
    if added:
        tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    return tok, uri, added


def check_usable(tok, kind: str, where: str) -> None:
    """Refuse a tokenizer that cannot build `kind` records, naming what it lacks."""
    from llm_platform.data import chat

    needs_eos = kind in ("pretrain", "sft", "seq2seq") or (kind in ("chat", "preference")
                                                            and chat.template_of(tok)[1])
    if needs_eos and tok.eos_token_id is None:
        raise ConfigError(f"{where} has no EOS token, which data.kind={kind} needs (documents end with it; with the "
                          f"default chat template, assistant turns do): use a tokenizer that defines eos_token")


def save(tok, uri: str, copy_from: str | None = None) -> str:
    """Save to a storage folder (tokenizer.json last); returns the sha256 of tokenizer.json.

    With `copy_from` (an unaltered pretrained tokenizer) its files are copied byte for byte instead of re-saved.
    """
    with tempfile.TemporaryDirectory(prefix="llmp-tok-") as tmp:
        if copy_from:
            copy_tokenizer_files(copy_from, tmp)
        else:
            tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        # tokenizer.json is what loaders look for; writing it last means a partial folder never loads.
        body = os.path.join(tmp, "tokenizer.json")
        os.rename(body, body + ".last")
        storage.upload_dir(tmp, uri)
        storage.delete(storage.join(uri, "tokenizer.json.last"))
        with open(body + ".last", "rb") as f:
            storage.write_bytes(storage.join(uri, "tokenizer.json"), f.read())
    return digest


def describe(tok, sha256: str, *, source: str | None = None, base_sha256: str | None = None,
             base_vocab_size: int | None = None, added: list[str] | None = None) -> dict:
    """The manifest's `tokenizer` record.

    `sha256` is the hash of the dataset's tokenizer.json; for a pretrained tokenizer `source`, `base_sha256` and
    `base_vocab_size` describe the model's own tokenizer (equal to the dataset's unless `added` lists tokens).
    """
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"path": "tokenizer", "sha256": sha256, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": pad, "mask_token_id": tok.mask_token_id, "source": source, "base_sha256": base_sha256,
            "base_vocab_size": base_vocab_size, "added_tokens": list(added or [])}
