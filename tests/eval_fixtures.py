"""Builders for the evaluation tests: a tiny tokenizer, tiny GPT-2 and T5 folders, a val split, tasks and run records.

Everything is built from small configs and generated text; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|mask|>"]
WORDS = ("the a nurse engineer doctor teacher pilot said that she he they would be late early today because was "
         "skilled tired happy old young man woman people could not learn to use phone cat sat on mat dog ran fast "
         "red blue green one two three four five hello world").split()


def corpus(num_lines: int = 300, seed: int = 0) -> list[str]:
    """Generated sentences over a small vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(num_lines)]


def build_tokenizer(path: str, extra_text: list[str] | None = None, vocab_size: int = 400):
    """A ByteLevel BPE tokenizer trained on generated text, saved as an HF PreTrainedTokenizerFast folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + list(extra_text or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>", mask_token="<|mask|>")
    fast.save_pretrained(path)
    return fast


def build_gpt2(path: str, seed: int = 0, extra_text: list[str] | None = None, n_positions: int = 128):
    """A 2-layer, width-32 GPT-2 with its tokenizer, saved as safetensors. Returns (model, tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer(path, extra_text)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    return model, tok


def build_t5(path: str, seed: int = 0):
    """A 2-layer, width-32 T5 with the same kind of tokenizer, saved as safetensors. Returns (model, tokenizer)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(path)
    return model, tok


def train_on(model, tok, texts: list[str], steps: int = 150, lr: float = 3e-3, seed: int = 0):
    """A few AdamW steps of causal LM training on `texts` (for the skewed-data bias test)."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = [tok.eos_token + t for t in rng.sample(texts, min(16, len(texts)))]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def build_dataset(path: str, tok, seq_len: int = 32, num_blocks: int = 24, seed: int = 1) -> str:
    """A pretrain dataset folder (manifest + val/*.parquet with `input_ids` blocks), as the data stage writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids: list[int] = []
    for line in corpus(400, seed=seed):
        ids.extend(tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(num_blocks, len(ids) // seq_len))]
    os.makedirs(os.path.join(path, "val"), exist_ok=True)
    files = []
    for shard, part in enumerate([blocks[: len(blocks) // 2], blocks[len(blocks) // 2:]]):
        rel = f"val/part-{shard:05d}.parquet"
        pq.write_table(pa.table({"input_ids": pa.array(part, type=pa.list_(pa.int32()))}), os.path.join(path, rel))
        files.append(rel)
    manifest = {"name": "evaltest", "fingerprint": "f" * 16, "kind": "pretrain", "seq_len": seq_len,
                "tokenizer": {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                              "pad_token_id": tok.pad_token_id, "mask_token_id": tok.mask_token_id, "sha256": "x"},
                "splits": {"val": {"files": files, "num_records": len(blocks), "num_tokens": len(blocks) * seq_len}}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return path


def write_tasks(path: str, rows: list[dict]) -> str:
    """A generation-task JSONL file."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_run(path: str, steps: int = 30) -> str:
    """A run folder with `metrics.jsonl` (train/loss every step, val/loss every 10)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "train/loss": 5.0 / step ** 0.5}
            if step % 10 == 0:
                row["val/loss"] = 5.2 / step ** 0.5
            f.write(json.dumps(row) + "\n")
    return path


def write_sweep(path: str, trials: int = 3, steps: int = 5) -> str:
    """A sweep folder with `trials.jsonl`."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "trials.jsonl"), "w") as f:
        for t in range(trials):
            for it in range(1, steps + 1):
                f.write(json.dumps({"trial_id": f"t{t}", "training_iteration": it, "step": it * 10,
                                    "val/loss": 4.0 - 0.3 * it + 0.2 * t, "lr": 10 ** -(t + 2)}) + "\n")
    return path


def write_lineage(model_dir: str, **sections) -> None:
    """A lineage.json in a model folder (`dataset`, `run`, `sweep`, `model` sections)."""
    with open(os.path.join(model_dir, "lineage.json"), "w") as f:
        json.dump({"kind": "model_version", **sections}, f)
