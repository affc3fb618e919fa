"""The driver's side of each data-stage phase (pipeline.py's table): which tasks it runs, and what it makes of their
results. The tasks themselves are plain functions of prepare.py, filters/decontam.py, encode.py and shards.py; each
phase returns a typed result, with whether an interrupted earlier run had finished it (`resumed`)."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_platform import storage
from llm_platform.config.data import DataConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data import encode, filters, mixture, prepare, shards, sources
from llm_platform.data import tokenizer as tokenizers
from llm_platform.data.exchange import segments
from llm_platform.data.filters import decontam
from llm_platform.data.fingerprint import packs_supervised
from llm_platform.data.results import Duplicates, EncodedUnit, FileResult, ShardResult
from llm_platform.data.units import dups_by_unit

SHARD_TARGET_BYTES = 64 << 20
KEY_PARTITION_BYTES = 32 << 20  # input bytes per dedup key partition (the keys are about as large as the text)


@dataclass(frozen=True)
class Stage:
    """What every phase reads: the configs, where the dataset goes, and how its tasks run."""

    cfg: DataConfig
    tok: TokenizerConfig
    root: str
    """The storage root (resolves a `registry:` tokenizer path)."""
    out: str
    """The dataset folder."""
    tasks: Callable[..., list]
    """`tasks(fn, items, *, num_cpus, **kwargs)`: the results in the items' order (executor.PhaseRunner.tasks)."""

    @property
    def work(self) -> str:
        """The phases' exchange and resume markers, deleted once the manifest is written."""
        return storage.join(self.out, "_work")


@dataclass(frozen=True)
class TokenizerResult:
    """The dataset's tokenizer as the manifest records it (`tokenizer.describe`)."""

    record: dict[str, Any]
    resumed: bool = False


def read_and_clean(stage: Stage, pieces: list[dict], plan: list[list[int]], read_spec: sources.ReadSpec
                   ) -> list[FileResult]:
    """Per unit of input pieces: its counts, dropped-record sample and key/signature runs (prepare.py)."""
    cfg = stage.cfg
    total = sum(int(p["size"]) for p in pieces)
    spec = prepare.PrepareSpec(
        read=read_spec, normalize=cfg.normalize, scrub_pii=cfg.scrub_pii,
        filters=cfg.filters, keys=prepare.KeyParams.from_config(cfg.dedup),
        partitions=max(1, min(512, math.ceil(total / KEY_PARTITION_BYTES))), work=stage.work,
        max_reported=cfg.max_records_reported, language=filters.LanguageSpec.from_config(cfg),
        examples=cfg.filter_examples_reported)
    return stage.tasks(prepare.prepare_unit, [([pieces[i] for i in unit], unit) for unit in plan], num_cpus=1,
                       spec=spec)


def decontaminate(stage: Stage, units: list[FileResult], pieces: list[dict], offsets: dict[int, int],
                  eval_tasks: list[decontam.TaskText], fp: str) -> tuple[list[dict], list[FileResult]]:
    """The kept documents that share an n-gram with an eval task (filters/decontam.py), with their file and line,
    and the units: when dropped, with them counted (before the manifest sums them). The driver hashes the tasks'
    n-grams once and ships them as one file; its contaminated documents are a small list, each unit's kept on
    disk."""
    dc = stage.cfg.filters.decontamination
    table_uri = storage.join(stage.work, "decontam.npz")
    if not storage.exists(table_uri):
        decontam.save_table(table_uri, decontam.build_table(eval_tasks, dc.ngram))
    spec = decontam.ScanSpec(work=stage.work, table_uri=table_uri, table_key=fp, ngram=dc.ngram)
    found = stage.tasks(decontam.scan_unit, [(u.unit,) for u in units], num_cpus=1, spec=spec)
    where = {i: (p["uri"], offsets.get(i, 0)) for i, p in enumerate(pieces)}
    return decontam.count(units, found, where, drop=dc.mode == "drop", examples=stage.cfg.filter_examples_reported)


def deduplicate(stage: Stage, units: list[FileResult]) -> Duplicates:
    """Exact duplicates per key partition, near candidates verified on their signatures (prepare.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = storage.join(stage.work, "dups.parquet")
    if storage.exists(done):
        table = pq.read_table(io.BytesIO(storage.read_bytes(done)))
        return Duplicates(table["doc_id"].to_numpy(), table["dup_of"].to_numpy(), table["exact"].to_numpy(),
                          resumed=True)
    result = {"doc_id": np.empty(0, np.int64), "dup_of": np.empty(0, np.int64), "exact": np.empty(0, bool)}
    runs = [r for u in units for r in u.key_runs]
    partitions = sorted({int(p) for r in runs for p in r["parts"]})
    found = stage.tasks(prepare.dedup_partition, [(segments(runs, p),) for p in partitions], num_cpus=1)
    if found:
        cat = {k: np.concatenate([f[k] for f in found]) for k in found[0]}
        near, near_of = prepare.verify_pairs(cat["near_doc"], cat["near_first"],
                                             [(u.pieces[0], u.sig_runs) for u in units], stage.cfg.dedup.threshold)
        result = prepare.one_row_per_dup({
            "doc_id": np.concatenate([cat["exact_doc"], near]), "dup_of": np.concatenate([cat["exact_of"], near_of]),
            "exact": np.concatenate([np.ones(cat["exact_doc"].shape[0], bool), np.zeros(near.shape[0], bool)])})
    buf = io.BytesIO()
    pq.write_table(pa.table(result), buf)
    storage.write_bytes(done, buf.getvalue())
    return Duplicates(result["doc_id"], result["dup_of"], result["exact"])


def train_tokenizer(stage: Stage, units: list[FileResult], removed: np.ndarray) -> TokenizerResult:
    """The dataset's tokenizer: a model's own (copied unaltered unless tokens are added), or a BPE trained on a
    deterministic sample of the kept train documents (`removed`: the doc ids the later phases leave out)."""
    from llm_platform.data.dataset import load_tokenizer

    tok_cfg = stage.tok
    uri = storage.join(stage.out, "tokenizer")
    base: dict[str, Any] = {}
    if tok_cfg.kind == "pretrained":  # the model's own tokenizer: copied unaltered unless tokens are added
        tok, source, added = tokenizers.load_pretrained(tok_cfg, stage.root)
        base = {"source": source, "base_sha256": storage.file_sha256(storage.join(source, "tokenizer.json")),
                "base_vocab_size": len(tok) - len(added), "added": added}
        tokenizers.check_usable(tok, stage.cfg.kind, f"tokenizer.path={tok_cfg.path!r}")
    if storage.exists(storage.join(uri, "tokenizer.json")):
        sha = storage.file_sha256(storage.join(uri, "tokenizer.json"))
        return TokenizerResult(tokenizers.describe(load_tokenizer(uri), sha, **base), resumed=True)
    if tok_cfg.kind == "pretrained":
        sha = tokenizers.save(tok, uri, copy_from=None if base["added"] else base["source"])
        return TokenizerResult(tokenizers.describe(tok, sha, **base))
    # A deterministic sample (by doc hash) of the kept train documents: every `stride`-th hash of the records read.
    total = sum(u.records for u in units)
    stride = max(1, math.ceil(total / max(1, tok_cfg.max_training_documents)))
    chosen = stage.tasks(_sample_one, [(u.unit, d) for u, d in zip(units, dups_by_unit(removed, units)) if u.kept],
                         num_cpus=1, work=stage.work, stride=stride, val_fraction=stage.cfg.val_fraction)
    tok = tokenizers.train_bpe((t for texts in chosen for t in texts), tok_cfg)
    return TokenizerResult(tokenizers.describe(tok, tokenizers.save(tok, uri)))


def _sample_one(unit: str, dup_ids: np.ndarray, work: str, stride: int, val_fraction: float) -> list[str]:
    """A cleaned unit's share of the tokenizer's training sample: kept train documents whose hash % stride is 0."""
    import pyarrow as pa

    from llm_platform.data import dedup

    texts: list[str] = []
    for batch in shards.read_clean(storage.join(work, "clean", f"{unit}.parquet"),
                                   ["doc_id", "text_hash", "text"]):
        hashes = batch.column("text_hash").to_numpy()
        keep = (hashes % stride == 0) & ~np.isin(batch.column("doc_id").to_numpy(), dup_ids)
        rows = [int(i) for i in np.nonzero(keep)[0] if dedup.split_of(int(hashes[i]), val_fraction) == "train"]
        # Typed indices: from an empty Python list pyarrow infers a null array, which `take` has no kernel for.
        texts += batch.column("text").take(pa.array(rows, pa.int64())).to_pylist()
    return texts


def _num_shards(cfg: DataConfig, inputs: list[dict]) -> dict[str, int]:
    if cfg.num_shards:
        train = cfg.num_shards
    else:
        train = max(1, math.ceil(sum(m["size"] for m in inputs) / SHARD_TARGET_BYTES))
    val = max(1, math.ceil(train * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    return {"train": train, "val": val}


def pack(stage: Stage, inputs: list[dict], units: list[FileResult], removed: np.ndarray, tok_record: dict,
         membership: mixture.Membership | None) -> tuple[list[ShardResult], dict[str, Any] | None]:
    """Tokenize every cleaned unit, then pack every output shard; with a mixture, the plan is made between the two
    (mixture.py) and returned with what the shards wrote."""
    cfg = stage.cfg
    spec = shards.ShardSpec(
        kind=cfg.kind, seq_len=cfg.seq_len, target_len=cfg.target_len, val_fraction=cfg.val_fraction,
        counts=_num_shards(cfg, inputs), tokenizer_uri=storage.join(stage.out, "tokenizer"),
        eos=tok_record["eos_token_id"], pad=tok_record["pad_token_id"], vocab=tok_record["vocab_size"],
        batch=cfg.tokenize_batch_size, chat_overflow=cfg.chat_overflow, work=stage.work, out=stage.out,
        pack_supervised=packs_supervised(cfg), membership=membership)
    encoded: list[EncodedUnit] = stage.tasks(
        encode.encode_unit, [(u.unit, d) for u, d in zip(units, dups_by_unit(removed, units)) if u.kept],
        num_cpus=1, spec=spec)
    runs = [r for e in encoded for r in e.runs]  # units in file order: document order
    names = spec.shard_names()
    used = sorted({int(p) for r in runs for p in r["parts"]})
    record = None
    if membership is not None:
        hist = sum((mixture.from_record(e.mixture) for e in encoded if e.mixture is not None),
                   mixture.empty_histogram(len(membership.names)))
        files = [sum(1 for m in inputs if s in m["mixture"]) for s in range(len(membership.names))]
        plan, record = mixture.plan(hist, cfg.mixture, membership.names, cfg.mixture_tokens, files=files,
                                    seed=cfg.mixture_seed)
        spec = dataclasses.replace(spec, plan=plan)
    packed: list[ShardResult] = stage.tasks(shards.pack_shard, [(names[p], segments(runs, p)) for p in used],
                                            num_cpus=0.5, spec=spec)
    if record is not None and membership is not None:
        record = mixture.realised(record, membership.names, packed)
    return packed, record
