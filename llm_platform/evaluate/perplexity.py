"""Held-out loss and perplexity: exp(mean token NLL) over the dataset's `val` split.

Two paths with one definition. `direct_perplexity` scores record batches in this process; `ray_perplexity` streams
the parquet shards through Ray Data into a pool of actors that each hold the model once (`map_batches` with a
callable class), and each batch returns only (nll_sum, num_tokens). Summing those and dividing at the end gives the
same token-weighted mean as the direct path, whatever the batching.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llm_platform.errors import DataError


def _stack(column: Any) -> np.ndarray:
    """A list<int> column (numpy object array of arrays, or already 2-D) as a (B, T) int64 array."""
    arr = np.asarray(column)
    if arr.dtype == object:
        arr = np.stack([np.asarray(row) for row in column])
    return arr.astype(np.int64)


def score_batch(model, batch: dict[str, Any], is_seq2seq: bool) -> tuple[float, int]:
    """Summed NLL and scored tokens of one record batch (`input_ids` [+ `labels`, `attention_mask`]; packed
    supervised rows also `position_ids`)."""
    from llm_platform.evaluate.scoring import sequence_nll

    if "input_ids" not in batch:
        raise DataError(f"val records have no `input_ids` column (columns: {sorted(batch)})")
    if "position_ids" in batch and not is_seq2seq:  # packed supervised rows: several examples per row
        return packed_nll(model, batch)
    labels = _stack(batch["labels"]) if "labels" in batch else None
    mask = _stack(batch["attention_mask"]) if "attention_mask" in batch else None
    nll, count = sequence_nll(model, _stack(batch["input_ids"]), labels=labels, attention_mask=mask,
                              is_seq2seq=is_seq2seq)
    return float(nll.sum()), int(count.sum())


def packed_nll(model, batch: dict[str, Any]) -> tuple[float, int]:
    """Summed NLL and scored tokens of packed rows (`data.pack_supervised`), each example scored as if alone: the
    same inputs and targets as training's (models/packing.py), without a KV cache (which would turn off the
    per-example attention mask)."""
    import torch
    import torch.nn.functional as F

    from llm_platform.models.packing import IGNORE, packed_inputs

    inputs, targets = packed_inputs({k: _stack(batch[k]) for k in ("input_ids", "labels", "position_ids")})
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return float(nll), int((targets != IGNORE).sum())


def summarize(nll_sum: float, num_tokens: int, source: str) -> dict[str, float]:
    """`val/loss` (mean token NLL, nats), `val/perplexity` and `val/tokens`."""
    if num_tokens == 0:
        raise DataError(f"no scorable tokens in {source}")
    loss = nll_sum / num_tokens
    return {"val/loss": loss, "val/perplexity": math.exp(loss), "val/tokens": float(num_tokens)}


def read_records(files: list[str], limit: int | None = None) -> dict[str, Any]:
    """The columns of parquet shards (local or s3://) as a dict of lists, at most `limit` records."""
    import pyarrow.parquet as pq

    from llm_platform import storage

    tables = []
    remaining = limit
    for uri in files:
        fs, path = storage.pyarrow_filesystem(uri)
        try:
            table = pq.read_table(path, filesystem=fs)
        except Exception as e:  # noqa: BLE001 - an unreadable shard is a data problem; say which one
            raise DataError(f"cannot read val shard {uri}: {e}") from None
        if remaining is not None:
            table = table.slice(0, remaining)
            remaining -= table.num_rows
        tables.append(table)
        if remaining is not None and remaining <= 0:
            break
    if not tables:
        raise DataError("the dataset has no val shards")
    import pyarrow as pa

    return pa.concat_tables(tables).to_pydict()


def direct_perplexity(model, records: dict[str, Any], *, is_seq2seq: bool = False, batch_size: int = 8,
                      source: str = "val split") -> dict[str, float]:
    """Perplexity computed in this process over `records` (a dict of equal-length columns)."""
    n = len(records.get("input_ids", []))
    nll_sum, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in records.items()}
        s, c = score_batch(model, batch, is_seq2seq)
        nll_sum += s
        tokens += c
    return summarize(nll_sum, tokens, source)


class NLLScorer:
    """Ray Data actor: loads the model once, then returns (nll_sum, num_tokens) for each batch it is given."""

    MODEL_URI: str = ""
    STORAGE_SETTINGS: dict | None = None

    def __init__(self, model_uri: str | None = None, storage_settings: dict | None = None):
        import torch

        from llm_platform import storage
        from llm_platform.evaluate.scoring import load

        torch.set_num_threads(1)  # fractional-CPU actors share cores; one thread each avoids oversubscription
        storage.configure(storage_settings or self.STORAGE_SETTINGS)
        self.loaded = load(model_uri or self.MODEL_URI)

    @classmethod
    def bound(cls, model_uri: str, storage_settings: dict | None) -> type:
        """A subclass that carries its arguments: Ray Data then has no constructor arguments to put in the object
        store (with them, Ray's core worker prints an error-level warning about restarting the actor pool)."""
        return type(cls.__name__, (cls,), {"MODEL_URI": model_uri, "STORAGE_SETTINGS": storage_settings})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s, c = score_batch(self.loaded.model, batch, self.loaded.is_seq2seq)
        return {"nll_sum": np.array([s], dtype=np.float64), "num_tokens": np.array([c], dtype=np.int64)}


def ray_perplexity(model_uri: str, files: list[str], *, limit: int | None = None, batch_size: int = 8,
                   num_actors: int = 2, actor_num_cpus: float = 0.5) -> dict[str, float]:
    """Perplexity over parquet shards as Ray Data batch inference on an actor pool holding the model.

    Args:
        model_uri: HF folder every actor loads (local path on one machine, or s3://).
        files: val shard URIs.
        limit: at most this many records.
        batch_size: records per batch.
        num_actors: actors in the pool.
        actor_num_cpus: logical CPUs per actor.
    """
    import ray.data

    from llm_platform import storage
    from llm_platform.data.dataset import read_parquet

    if not files:
        raise DataError("the dataset has no val shards")
    fs, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.pyarrow_filesystem(f)[1] for f in files]
    # At least one block per actor, or a small split arrives as one block and only one actor works.
    ds = read_parquet(paths, fs, override_num_blocks=max(len(paths), num_actors))
    if limit is not None:
        ds = ds.limit(limit)
    scored = ds.map_batches(
        NLLScorer.bound(model_uri, storage.settings()),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),  # `concurrency=` is deprecated in Ray 2.60
        num_cpus=actor_num_cpus,
    )
    nll_sum, tokens = 0.0, 0
    for row in scored.iter_rows():
        nll_sum += float(row["nll_sum"])
        tokens += int(row["num_tokens"])
    return summarize(nll_sum, tokens, ", ".join(files))



def vllm_targets(records: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """Each causal record as (the tokens vLLM reads: padding dropped, the positions whose token is scored): the
    next-token targets `sequence_nll` scores (labels aligned with input_ids; -100 and padding not scored)."""
    ids = _stack(records["input_ids"])
    mask = _stack(records["attention_mask"]) if "attention_mask" in records else np.ones_like(ids)
    labels = _stack(records["labels"]) if "labels" in records else ids
    out = []
    for row, keep, lab in zip(ids, mask, labels):
        tokens = row[keep == 1].tolist()
        scored = [t for t in range(1, len(tokens)) if lab[t] != -100 and keep[t] == 1]
        out.append((tokens, scored))
    return out


def vllm_perplexity(model_uri: str, records: dict[str, Any], *, batch_size: int = 8, num_engines: int = 1,
                    device: str = "cpu", dtype: str = "auto", source: str = "val split") -> dict[str, float]:
    """Perplexity with vLLM engines on Ray Data (`eval.backend=vllm`): each record's prompt log-probabilities
    (`prompt_logprobs=0`, one generated token dropped), summed over the positions `sequence_nll` scores. Causal,
    unpacked records only (the caller keeps the builtin scorer for packed rows and seq2seq models)."""
    import ray.data
    from ray.data.llm import build_processor

    from llm_platform.evaluate.generation import vllm_processor_config

    rows = [{"id": i, "tokens": tokens, "scored": scored}
            for i, (tokens, scored) in enumerate(vllm_targets(records)) if scored]
    if not rows:
        raise DataError(f"no scorable tokens in {source}")
    config = vllm_processor_config(model_uri, batch_size, num_engines, device, dtype, tokenize_stage=False,
                                   detokenize_stage=False)  # token ids in, log-probabilities out

    def nll(row: dict[str, Any]) -> dict[str, Any]:
        logprobs, tokens = row["prompt_logprobs"], list(row["tokens"])
        return {"nll": -sum(float(logprobs[t][tokens[t]]["logprob"]) for t in row["scored"]),
                "n": len(row["scored"])}

    processor = build_processor(
        config,
        preprocess=lambda row: {"tokens": row["tokens"], "scored": row["scored"], "tokenized_prompt": row["tokens"],
                                "sampling_params": {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}},
        postprocess=nll)
    nll_sum, count = 0.0, 0
    for row in processor(ray.data.from_items(rows)).iter_rows():
        nll_sum += float(row["nll"])
        count += int(row["n"])
    return summarize(nll_sum, count, source)
