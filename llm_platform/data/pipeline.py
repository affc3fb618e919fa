"""The data stage: read -> clean -> dedup -> split -> tokenizer -> tokenize -> pack -> manifest, on Ray Data.

Every phase is a set of independent tasks that Ray Data schedules (one row per task: a unit of input pieces, a key
partition, a cleaned unit, an output shard), and the tasks' results are small counts and file indexes. A unit is a
run of consecutive input pieces (files, or byte ranges of a large JSONL file) of about `data.task_target_bytes`
together (`units.plan_units`), so many small files cost what their bytes cost. Data moves between phases through files
under `<dataset>/_work/`, written once and read by the next phase; the two exchanges (dedup keys by key, tokens by
output shard) are runs of numpy arrays read by byte range (exchange.py), so no text is shuffled and no signature
travels with every band key.

    phase       task per            does                                               writes (under _work/)
    read_clean  unit of files       read, clean, filter, text hash, MinHash keys       clean/, keys/, sigs/
    decontam-   cleaned unit        documents sharing an n-gram with an eval task      decontam/ (the driver
    inate                           (only with data.filters.decontamination.enabled)   wrote decontam.npz)
    dedup       key partition       equal keys -> exact dups, near candidate pairs;    dups.parquet
                                    the driver verifies candidates' signatures
    tokenizer   cleaned unit        a deterministic sample of train docs -> BPE        tokenizer/ (in the dataset)
    pack        cleaned unit        drop dups, split + shard by hash, tokenize         tokens/
                output shard        pack in document order                             train/ val/ (in the dataset)

Each task leaves a marker (`clean/<unit>.json`, `tokens/<unit>.json`, `shards/<shard>.json`) so an interrupted run
resumes task by task. `manifest.json` is written last; a dataset folder without it is never read. A second run with
the same inputs and config finds the manifest and does nothing.

This module is the order of the phases and the manifest; phases.py holds each phase's driver side, executor.py how
tasks run (Ray Data or in process), results.py the typed results the tasks return (`FileResult` per unit,
`EncodedUnit`, `ShardResult` per shard) and fingerprint.py the dataset's identity.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from llm_platform import console, storage
from llm_platform.config.data import DataConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data import filters, mixture, phases, sample, sources
from llm_platform.data import manifest as manifests
from llm_platform.data import metrics as data_metrics
from llm_platform.data.dataset import MANIFEST
from llm_platform.data.executor import Executor, PhaseRunner, parallelism, ray_tasks, start_ray
from llm_platform.data.executor import in_process as in_process  # the in-process executor, for callers of the stage
from llm_platform.data.filters import decontam
from llm_platform.data.filters.report import filter_report
from llm_platform.data.fingerprint import fingerprint
from llm_platform.data.report import summary_table
from llm_platform.data.results import Duplicates, FileResult, ShardResult
from llm_platform.data.units import piece_offsets, plan_units, with_file_lines
from llm_platform.errors import ConfigError, DataError
from llm_platform.storage import layout, names

log = logging.getLogger(__name__)
UNITS_PER_TASK_SLOT = 3  # at least this many units per task that runs at once: the last ones finish close together


@dataclass
class DatasetResult:
    """A finished dataset folder and its manifest."""

    uri: str
    manifest: manifests.Manifest
    reused: bool = False

    def summary(self) -> str:
        head = "already complete, nothing to do" if self.reused else "built"
        return (f"dataset {self.uri} ({head})\n" + summary_table(self.manifest) + filter_report(self.manifest)
                + manifests.decontamination_report(self.manifest)
                + (mixture.table(self.manifest["mixture"]) if self.manifest.get("mixture") else ""))


def validate(cfg: DataConfig, tok: TokenizerConfig) -> None:
    """Refuse a config that cannot work, naming the key. (Keys with a set of choices are Enums in the schema:
    another value never gets here.)"""
    names.check(cfg.name, "data.name")  # it becomes the folder datasets/<name>/
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if cfg.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.seq_len} must be at least 2")
    if not 0.0 < cfg.dedup.threshold <= 1.0:
        raise ConfigError(f"data.dedup.threshold={cfg.dedup.threshold} must be in (0, 1]")
    if tok.kind == "bpe" and tok.vocab_size < 300:
        raise ConfigError(f"tokenizer.vocab_size={tok.vocab_size} must be at least 300 (256 bytes + special tokens)")
    filters.validate(cfg)  # data.languages, data.language_threshold, the rule sets' thresholds
    mixture.validate(cfg.mixture, list(cfg.sources), cfg.mixture_tokens)


def sample_corpus_uri(cfg: DataConfig, root: str) -> str:
    return layout.sample_corpus(root, cfg.sample.num_documents, cfg.sample.seed)


def _inputs(cfg: DataConfig, root: str, create: bool) -> tuple[list[dict], list[dict]]:
    if cfg.mixture:
        return mixture.list_inputs(cfg.mixture, cfg.format)
    patterns = list(cfg.sources)
    if not patterns:
        uri = sample_corpus_uri(cfg, root)
        if not storage.exists(uri):
            if not create:
                return [], []
            storage.write_bytes(uri, sample.to_jsonl(sample.generate(cfg.sample.num_documents, cfg.sample.seed)))
        patterns = [uri]
    return sources.list_inputs(patterns, cfg.format)


def resolve_dataset(cfg: DataConfig, tok: TokenizerConfig, root: str) -> str | None:
    """The URI of the finished dataset the data stage produces for this config, or None if it does not exist."""
    names.check(cfg.name, "data.name")
    inputs, _ = _inputs(cfg, root, create=False)
    if not inputs:
        return None
    uri = layout.dataset(root, cfg.name, fingerprint(cfg, tok, inputs, root))
    return uri if storage.exists(storage.join(uri, MANIFEST)) else None


def _eval_tasks(cfg: DataConfig) -> list[decontam.TaskText]:
    """The eval tasks' texts to decontaminate against (none when it is off), read once by the driver."""
    return decontam.read_sources(cfg.filters.decontamination) if cfg.filters.decontamination.enabled else []


def _check_inputs(inputs: list[dict], missing: list[dict], cfg: DataConfig) -> None:
    if missing and cfg.on_error == "fail":
        first = missing[0]
        raise DataError(f"{first['source']}: {first['reason']} (data.on_error=fail)")
    if not inputs:
        reasons = "; ".join(f"{m['source']}: {m['reason']}" for m in missing) or "data.sources is empty"
        raise DataError(f"no readable input files: {reasons}")


def build_dataset(cfg: DataConfig, tok: TokenizerConfig, root: str, *, progress: bool | None = None,
                  connect=None, executor: Executor | None = None) -> DatasetResult:
    """Run the data stage (see the module docstring). Ray must be connected (`cluster.connect`), or `connect` given:
    it is called only when there is work for Ray (a dataset already complete is returned without starting Ray).

    `executor` runs each phase's tasks (executor.py): Ray Data by default; `in_process` runs them one after another
    in this process with no Ray at all (same task code, same outputs: the property tests compare the two)."""
    validate(cfg, tok)
    listed = time.perf_counter()
    inputs, missing = _inputs(cfg, root, create=True)
    listed = time.perf_counter() - listed
    _check_inputs(inputs, missing, cfg)
    eval_tasks = _eval_tasks(cfg)
    fp = fingerprint(cfg, tok, inputs, root, eval_tasks)
    out = layout.dataset(root, cfg.name, fp)
    if storage.exists(storage.join(out, MANIFEST)):
        log.info("dataset %s is complete; nothing to do", out)
        return DatasetResult(out, storage.read_json(storage.join(out, MANIFEST)), reused=True)
    if executor is None:
        start_ray(connect, console.progress_enabled() if progress is None else progress)
    runner = PhaseRunner(executor or ray_tasks, timings={"list_s": listed})
    stage = phases.Stage(cfg, tok, root, out, runner.tasks)
    built = _run_phases(stage, runner, inputs, eval_tasks, fp, slots=parallelism(executor))
    manifest = manifests.build(cfg, tok, fp, inputs, missing, built.units, built.duplicates, built.tokenizer,
                               built.shards, runner.timings)
    manifest["resumed_phases"] = built.resumed
    if built.mixture is not None:
        manifest["mixture"] = built.mixture
    if eval_tasks:
        manifest["decontamination"] = manifests.decontamination(cfg.filters.decontamination, eval_tasks,
                                                                built.contaminated)
    storage.write_json(storage.join(out, MANIFEST), manifest)
    storage.delete(stage.work)
    if executor is None:
        duplicates = int(built.duplicates.exact.shape[0])
        data_metrics.export(data_metrics.phase_figures(inputs, built.units, duplicates, manifest), cfg.name)
    return DatasetResult(out, manifest)


@dataclass(frozen=True)
class _Built:
    """What the phases made, for the manifest."""

    units: list[FileResult]
    duplicates: Duplicates
    tokenizer: dict
    shards: list[ShardResult]
    mixture: dict | None
    contaminated: list[dict]
    resumed: list[str]
    """The phases an interrupted earlier run had finished."""


def _run_phases(stage: phases.Stage, runner: PhaseRunner, inputs: list[dict], eval_tasks: list[decontam.TaskText],
                fp: str, slots: int) -> _Built:
    """read -> clean -> (decontaminate) -> dedup -> tokenizer -> tokenize -> pack, each timed by `runner`."""
    cfg = stage.cfg
    read_spec = sources.ReadSpec.from_config(cfg)
    pieces = sources.pieces([{**m, "compression": m["compression"] or None} for m in inputs], read_spec,
                            cfg.task_target_bytes)
    plan = plan_units([int(p["size"]) for p in pieces], cfg.task_target_bytes, min_units=UNITS_PER_TASK_SLOT * slots)
    read = runner.timed("read_clean", lambda: phases.read_and_clean(stage, pieces, plan, read_spec))
    offsets = piece_offsets(read, pieces)
    units = with_file_lines(read, offsets)
    contaminated: list[dict] = []
    if eval_tasks:
        contaminated, units = runner.timed("decontaminate", lambda: phases.decontaminate(
            stage, units, pieces, offsets, eval_tasks, fp))
    dups = runner.timed("dedup", lambda: phases.deduplicate(stage, units))
    # What the later phases leave out: the duplicates, and contaminated documents when they are dropped.
    removed = dups.doc_id
    if contaminated and cfg.filters.decontamination.mode == "drop":
        removed = np.concatenate([dups.doc_id, np.asarray(sorted({int(c["doc_id"]) for c in contaminated}), np.int64)])
    tokenizer = runner.timed("tokenizer", lambda: phases.train_tokenizer(stage, units, removed))
    membership = mixture.membership(cfg.mixture, pieces, cfg.mixture_seed) if cfg.mixture else None
    packed, mix = runner.timed("tokenize_pack", lambda: phases.pack(stage, inputs, units, removed, tokenizer.record,
                                                                  membership))
    resumed = ["read_clean"] if read and all(u.resumed for u in read) else []
    resumed += ["dedup"] if dups.resumed else []
    resumed += ["tokenizer"] if tokenizer.resumed else []
    if any(s.resumed for s in packed):
        resumed.append(f"pack:{sum(1 for s in packed if s.resumed)}/{len(packed)} shards")
    return _Built(units, dups, tokenizer.record, packed, mix, contaminated, resumed)
