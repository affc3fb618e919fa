"""A tiny HF-format model folder for the serving tests: GPT-2 from a small config and a ByteLevel BPE tokenizer.

Nothing is downloaded: the tokenizer is trained on generated text with the `tokenizers` library and the model is
randomly initialised, then both are saved with `save_pretrained` (safetensors), like a registry version.
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|mask|>"]
WORDS = ("the cat dog sat ran on a mat log big small red blue quick brown fox jumps over lazy river tree house "
         "garden sun moon star light dark morning evening happy sad story once upon time little girl boy").split()


def sample_texts(n: int, seed: int = 0, words: tuple[str, ...] | list[str] = WORDS, length: tuple[int, int] = (4, 16)
                 ) -> list[str]:
    """`n` sentences of random words from `words` (the 'training distribution' of the tiny model)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*length))) + "." for _ in range(n)]


def build_tiny_model(folder: str | Path, vocab_size: int = 400, n_positions: int = 128, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and tokenizer files of a 2-layer GPT-2 (width 32) into `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Unicode text too, so multi-byte characters exist as merges and as split byte tokens (UTF-8 streaming tests).
    tok.train_from_iterator(sample_texts(2000, seed) + ["héllo wörld ünïcode café 日本語 😀"] * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", mask_token="<|mask|>")
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(fast), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
                        pad_token_id=fast.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def wait_healthy(url: str, timeout_s: float, poll_s: float = 1.0) -> bool:
    """Whether `url`/health answered 200 within `timeout_s` (a replica starting, an app being deployed)."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False
