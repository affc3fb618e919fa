"""Train a byte-level BPE with Hugging Face `tokenizers`, or load an HF-format tokenizer; save it with the dataset."""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable

from llm_platform import storage
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data.dataset import SPECIAL_TOKENS, load_tokenizer
from llm_platform.errors import ConfigError

# A readable default chat format for models trained here (serving uses the tokenizer's own template when it has one).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


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


def load_pretrained(cfg: TokenizerConfig):
    """Load an HF-format tokenizer folder (local or s3://) and make sure it has EOS, pad and mask tokens."""
    if not cfg.path:
        raise ConfigError("tokenizer.path is required when tokenizer.kind=pretrained")
    tok = load_tokenizer(cfg.path)
    missing = {}
    if tok.eos_token is None:
        missing["eos_token"] = SPECIAL_TOKENS["eos"]
    if tok.pad_token is None:
        missing["pad_token"] = tok.eos_token or SPECIAL_TOKENS["pad"]
    if tok.mask_token is None:
        missing["mask_token"] = SPECIAL_TOKENS["mask"]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def save(tok, uri: str) -> str:
    """Save to a storage folder (tokenizer.json last); returns the sha256 of tokenizer.json."""
    with tempfile.TemporaryDirectory(prefix="llmp-tok-") as tmp:
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


def describe(tok, sha256: str) -> dict:
    """The manifest's `tokenizer` record."""
    return {"path": "tokenizer", "sha256": sha256, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "mask_token_id": tok.mask_token_id}
