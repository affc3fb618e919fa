"""Tiny datasets in the data stage's contract (docs/ARCHITECTURE.md), for training tests that must not depend on
the data stage: a byte-level BPE trained with `tokenizers` on generated text, parquet shards, manifest.json last.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_platform import storage

WORDS = ("the cat dog bird sat ran on a mat log tree under over quick slow red blue green small big house river "
         "stone light dark morning evening sings jumps reads writes").split()
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|mask|>"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


def train_tokenizer(texts: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1], mask_token=SPECIALS[2])


def _write_parquet(uri: str, columns: dict[str, list]) -> None:
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _records(kind: str, tok, texts: list[str], seq_len: int, target_len: int) -> dict[str, list]:
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if kind == "pretrain":
        stream: list[int] = []
        for t in texts:
            stream += tok.encode(t) + [eos]
        blocks = len(stream) // seq_len
        return {"input_ids": [stream[i * seq_len:(i + 1) * seq_len] for i in range(blocks)]}
    out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
    for i in range(0, len(texts) - 1, 2):
        a, b = tok.encode(texts[i]), tok.encode(texts[i + 1])
        if kind == "sft":
            ids = (a + b + [eos])[:seq_len]
            labels = ([-100] * len(a) + b + [eos])[:seq_len]
            pad_n = seq_len - len(ids)
            out["input_ids"].append(ids + [pad] * pad_n)
            out["labels"].append(labels + [-100] * pad_n)
            out["attention_mask"].append([1] * len(ids) + [0] * pad_n)
        else:  # seq2seq: the target is the source's words reversed (learnable)
            src = (a + [eos])[:seq_len]
            tgt = (tok.encode(" ".join(reversed(texts[i].rstrip(".").split()))) + [eos])[:target_len]
            out["input_ids"].append(src + [pad] * (seq_len - len(src)))
            out["attention_mask"].append([1] * len(src) + [0] * (seq_len - len(src)))
            out["labels"].append(tgt + [-100] * (target_len - len(tgt)))
    return out


def make_dataset(root: str, kind: str = "pretrain", *, seq_len: int = 32, target_len: int = 16,
                 num_documents: int = 400, train_shards: int = 2, vocab_size: int = 320, seed: int = 0,
                 name: str | None = None) -> str:
    """Write a finished dataset folder under `root` (local or s3://) and return its URI."""
    texts = sentences(num_documents, seed)
    tok = train_tokenizer(texts, vocab_size)
    name = name or f"tiny-{kind}"
    fingerprint = storage.fingerprint({"kind": kind, "seq_len": seq_len, "n": num_documents, "seed": seed})
    uri = storage.join(root, "datasets", name, fingerprint)
    n_val = max(len(texts) // 10, 16)
    splits_text = {"train": texts[n_val:], "val": texts[:n_val]}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        storage.upload_dir(tmp, storage.join(uri, "tokenizer"))
    splits = {}
    for split, split_texts in splits_text.items():
        records = _records(kind, tok, split_texts, seq_len, target_len)
        n = len(records["input_ids"])
        shards = train_shards if split == "train" else 1
        bounds = np.linspace(0, n, shards + 1).astype(int)
        files = []
        for s in range(shards):
            rel = f"{split}/part-{s:05d}.parquet"
            _write_parquet(storage.join(uri, rel), {k: v[bounds[s]:bounds[s + 1]] for k, v in records.items()})
            files.append(rel)
        splits[split] = {"files": files, "num_records": n, "num_tokens": n * seq_len}
    manifest = {
        "name": name, "fingerprint": fingerprint, "kind": kind, "seq_len": seq_len, "target_len": target_len,
        "tokenizer": {"path": "tokenizer", "sha256": storage.file_sha256(storage.join(uri, "tokenizer",
                                                                                      "tokenizer.json")),
                      "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                      "mask_token_id": tok.mask_token_id},
        "splits": splits, "counts": {"documents": len(texts)}, "skipped": [], "inputs": [], "config": {},
        "stats": {},
    }
    storage.write_json(storage.join(uri, "manifest.json"), manifest)
    return uri


def read_rows(uri: str, split: str = "train") -> dict[str, np.ndarray]:
    """All rows of a split in file order (what the reference loops in tests iterate)."""
    from llm_platform.data.dataset import open_dataset

    info = open_dataset(uri)
    tables = []
    for f in info.files[split]:
        with storage.open_read(f) as fh:
            tables.append(pq.read_table(fh))
    table = pa.concat_tables(tables)
    return {c: np.array(table.column(c).to_pylist(), dtype=np.int64) for c in table.column_names}



def ordered_rows(uri: str, partitions: int, *, seed: int = 0, shuffle_buffer_rows: int = 0, epoch: int = 0,
                 split: str = "train") -> dict[str, np.ndarray]:
    """A split's rows in the order training takes them (train/reader.py) for a run with `partitions` data partitions
    (by default micro_batch_size x num_workers): global micro-batch k is rows [k * G, (k + 1) * G)."""
    from llm_platform.data.dataset import open_dataset
    from llm_platform.train.reader import SplitFiles, epoch_rows

    files = open_dataset(uri).files[split]
    fs, path = storage.pyarrow_filesystem(files[0])
    columns = pq.ParquetFile(fs.open_input_file(path)).schema_arrow.names
    return epoch_rows(SplitFiles(files, columns), partitions=partitions, seed=seed, epoch=epoch,
                      shuffle=bool(shuffle_buffer_rows), window_rows=shuffle_buffer_rows or 1)


def plain_pytorch_run(dataset_uri: str, model_cfg, tc, global_batch: int, *, poison_step: int | None = None):
    """The platform's causal-LM training written as one plain PyTorch process: `global_batch` rows per step in the
    platform's data order (`ordered_rows`, with the run's partitions: `global_batch` over the accumulation steps),
    the same seeded model, AdamW groups, clipping and schedule. Step `poison_step` (1-based) gets a NaN loss
    and NaN gradients; a non-finite step updates nothing. Returns (model, per-step losses)."""
    import math

    import torch
    import torch.nn.functional as F

    from llm_platform.data.dataset import open_dataset
    from llm_platform.models.build import build_model
    from llm_platform.train.optim import lr_factor, param_groups

    info = open_dataset(dataset_uri)
    special = {n: info.special_token_id(n) for n in ("eos", "pad", "mask")}
    partitions = tc.data_partitions or global_batch // tc.grad_accum_steps
    rows = torch.as_tensor(ordered_rows(dataset_uri, partitions, seed=tc.seed,
                                        shuffle_buffer_rows=tc.shuffle_buffer_rows)["input_ids"])
    model = build_model(model_cfg, info.vocab_size, special, seed=tc.seed)
    oc = tc.optimizer
    opt = torch.optim.AdamW(param_groups(model, oc.weight_decay), lr=oc.lr, betas=(oc.beta1, oc.beta2))
    losses = []
    for step in range(tc.max_steps):
        batch = rows[step * global_batch:(step + 1) * global_batch]  # (B, T)
        logits = model(input_ids=batch).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        if step + 1 == poison_step:
            loss = loss * float("nan")
        loss.backward()
        if math.isfinite(loss.item()):
            torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
            for group in opt.param_groups:
                group["lr"] = oc.lr * lr_factor(step, max_steps=tc.max_steps, warmup_steps=oc.warmup_steps,
                                                schedule=oc.schedule, min_lr_ratio=oc.min_lr_ratio)
            opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


FLAGS_NAMESPACE = "llmp-test-flags"


def ray_flag(name: str):
    """A named event held by a Ray actor, so another process (a Ray Train controller, a driver subprocess) can set
    what a test waits on: `ray.get(flag.wait.remote(), timeout=...)`. Defined here, not at module level, so Ray
    ships the class by value (workers cannot import this test module)."""
    import asyncio

    import ray

    class Flag:
        def __init__(self):
            self._event = asyncio.Event()

        async def set(self) -> None:
            self._event.set()

        async def wait(self) -> None:
            await self._event.wait()

    return ray.remote(num_cpus=0)(Flag).options(name=name, namespace=FLAGS_NAMESPACE).remote()


def set_flag_on_checkpoint(flag_name: str, checkpoint_name: str):
    """A Ray Train callback that sets `ray_flag(flag_name)` once the controller has registered checkpoint
    `checkpoint_name`: the controller's checkpoint manager handles each report (and writes its snapshot) before the
    user callbacks do, so from then on a restart resumes from that checkpoint."""
    import os

    import ray
    from ray.train import UserCallback

    class SetFlag(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is not None and os.path.basename(checkpoint.path.rstrip("/")) == checkpoint_name:
                ray.get_actor(flag_name, namespace=FLAGS_NAMESPACE).set.remote()

    return SetFlag()
