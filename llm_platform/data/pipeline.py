"""The data stage: read -> clean -> dedup -> split -> tokenizer -> tokenize -> pack -> manifest, on Ray Data.

Every phase is a set of independent tasks that Ray Data schedules (one row per task: a unit of input pieces, a key
partition, a cleaned unit, an output shard), and the tasks' results are small counts and file indexes. A unit is a
run of consecutive input pieces (files, or byte ranges of a large JSONL file) of about `data.task_target_bytes`
together (`plan_units`), so many small files cost what their bytes cost. Data moves between phases through files
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from llm_platform import cluster, console, layout, names, storage
from llm_platform.config.data import DataConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data import filters, mixture, prepare, sample, shards, sources
from llm_platform.data import manifest as manifests
from llm_platform.data import metrics as data_metrics
from llm_platform.data import tokenizer as tokenizers
from llm_platform.data.dataset import MANIFEST
from llm_platform.data.exchange import segments
from llm_platform.data.filters import decontam
from llm_platform.data.filters.report import filter_report
from llm_platform.data.manifest import FORMAT_VERSION
from llm_platform.data.pack import packs
from llm_platform.data.report import summary_table
from llm_platform.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SHARD_TARGET_BYTES = 64 << 20
UNITS_PER_TASK_SLOT = 3  # at least this many units per task that runs at once: the last ones finish close together
KEY_PARTITION_BYTES = 32 << 20  # input bytes per dedup key partition (the keys are about as large as the text)
# Knobs that change speed, not output, left out of the fingerprint; and `sources`, whose files are in it (listed in
# URI order): the same files named by other patterns, or in another order, are the same dataset.
_NOT_FINGERPRINTED = ("tokenize_batch_size", "max_records_reported", "name", "task_target_bytes", "sources",
                      "filter_examples_reported")


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


def fingerprint(cfg: DataConfig, tok: TokenizerConfig, inputs: list[dict], root: str | None = None,
                eval_tasks: list[decontam.TaskText] | None = None) -> str:
    """Hash of the inputs (uri, size, etag/mtime), the output-relevant config and the tokenizer config (with the
    files of a pretrained tokenizer; `root` resolves a `registry:` tokenizer path), and with decontamination on, the
    eval tasks' texts (`eval_tasks`, read here when not given)."""
    data = {k: v for k, v in asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    # Hashed only when on: every other dataset keeps the fingerprint it had before decontamination existed. The
    # tasks' names and texts are hashed, not where they were read from: a task file edited in place is another
    # dataset, the same file named by another path the same one.
    decontamination = data["filters"].pop("decontamination")
    if cfg.filters.decontamination.enabled:
        for key in ("documents_reported", "sources", "harness_include_path"):
            decontamination.pop(key)
        tasks = eval_tasks if eval_tasks is not None else decontam.read_sources(cfg.filters.decontamination)
        data["decontamination"] = {"config": decontamination,
                                   "tasks": [[name, sha] for name, _, sha in decontam.digest(tasks)]}
    # Hashed only where it packs: padded sft/chat and every other kind keep the fingerprints (and the finished
    # datasets) they had before the key existed; a packed dataset is never a padded one reused.
    if not packs_supervised(cfg):
        data.pop("pack_supervised", None)
    mixture.fingerprint_record(data, inputs)
    tok_record = tokenizers.fingerprint_record(tok, root or ".")
    listing = [(m["uri"], m["size"], m["marker"], m["format"]) for m in inputs]
    return storage.fingerprint({"v": FORMAT_VERSION, "inputs": listing, "data": data, "tokenizer": tok_record})


def packs_supervised(cfg: DataConfig) -> bool:
    """Whether this dataset's records are packed several per row (`data.pack_supervised`, sft and chat only)."""
    return packs(str(cfg.kind), cfg.pack_supervised)


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


def build_dataset(cfg: DataConfig, tok: TokenizerConfig, root: str, *, progress: bool | None = None,
                  connect=None, executor: Callable[..., list] | None = None) -> DatasetResult:
    """Run the data stage (see the module docstring). Ray must be connected (`cluster.connect`), or `connect` given:
    it is called only when there is work for Ray (a dataset already complete is returned without starting Ray).

    `executor` runs each phase's tasks (`_tasks`' signature): Ray Data by default; `in_process` runs them one after
    another in this process with no Ray at all (same task code, same outputs: the property tests compare the two)."""
    validate(cfg, tok)
    listed = time.perf_counter()
    inputs, missing = _inputs(cfg, root, create=True)
    listed = time.perf_counter() - listed
    if missing and cfg.on_error == "fail":
        first = missing[0]
        raise DataError(f"{first['source']}: {first['reason']} (data.on_error=fail)")
    if not inputs:
        reasons = "; ".join(f"{m['source']}: {m['reason']}" for m in missing) or "data.sources is empty"
        raise DataError(f"no readable input files: {reasons}")
    eval_tasks = _eval_tasks(cfg)
    fp = fingerprint(cfg, tok, inputs, root, eval_tasks)
    out = layout.dataset(root, cfg.name, fp)
    if storage.exists(storage.join(out, MANIFEST)):
        log.info("dataset %s is complete; nothing to do", out)
        return DatasetResult(out, storage.read_json(storage.join(out, MANIFEST)), reused=True)
    if executor is None:
        import ray.data

        if connect is not None:
            connect()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = console.progress_enabled() if progress is None else progress
    work = storage.join(out, "_work")
    timings: dict[str, float] = {"list_s": listed}
    resumed: list[str] = []  # phases found complete from an interrupted earlier run
    cpu = [0.0, 0.0]  # the tasks' CPU and wall seconds
    tasks = functools.partial(executor or _tasks, cpu=cpu)

    def timed(phase: str, call: Callable[[], Any]) -> Any:
        start, cpu_start, wall_start = time.perf_counter(), cpu[0], cpu[1]
        value = call()
        timings[f"{phase}_s"] = time.perf_counter() - start
        timings[f"{phase}_tasks_cpu_s"] = cpu[0] - cpu_start
        timings[f"{phase}_tasks_wall_s"] = cpu[1] - wall_start
        return value

    read_spec = sources.ReadSpec.from_config(cfg)
    pieces = sources.pieces([{**m, "compression": m["compression"] or None} for m in inputs], read_spec,
                            cfg.task_target_bytes)
    plan = plan_units([int(p["size"]) for p in pieces], cfg.task_target_bytes,
                      min_units=UNITS_PER_TASK_SLOT * _parallelism(executor))
    units = timed("read_clean", lambda: _read_and_clean(tasks, pieces, plan, read_spec, cfg, work))
    offsets = _file_lines(units, pieces)
    if units and all(u["resumed"] for u in units):
        resumed.append("read_clean")
    contaminated = timed("decontaminate", lambda: _decontaminate(tasks, cfg, work, units, pieces, offsets,
                                                                 eval_tasks, fp)) if eval_tasks else []
    dups = timed("dedup", lambda: _deduplicate(tasks, cfg, work, units, resumed))
    # What the later phases leave out: the duplicates, and contaminated documents when they are dropped.
    removed = dups
    if contaminated and cfg.filters.decontamination.mode == "drop":
        ids = np.asarray(sorted({int(c["doc_id"]) for c in contaminated}), np.int64)
        removed = {"doc_id": np.concatenate([dups["doc_id"], ids])}
    tok_record = timed("tokenizer", lambda: _tokenizer(tasks, cfg, tok, work, out, units, removed, resumed, root))
    membership = mixture.membership(cfg.mixture, pieces, cfg.mixture_seed) if cfg.mixture else None
    packed, mix = timed("tokenize_pack", lambda: _pack(tasks, cfg, inputs, work, out, units, removed, tok_record,
                                                       membership))
    if any(s.get("resumed") for s in packed):
        resumed.append(f"pack:{sum(1 for s in packed if s.get('resumed'))}/{len(packed)} shards")
    manifest = manifests.build(cfg, tok, fp, inputs, missing, units, dups, tok_record, packed, timings)
    manifest["resumed_phases"] = resumed
    if mix is not None:
        manifest["mixture"] = mix
    if eval_tasks:
        manifest["decontamination"] = manifests.decontamination(cfg.filters.decontamination, eval_tasks,
                                                                contaminated)
    storage.write_json(storage.join(out, MANIFEST), manifest)
    storage.delete(work)
    if executor is None:
        data_metrics.export(data_metrics.phase_figures(inputs, units, dups, manifest), cfg.name)
    return DatasetResult(out, manifest)


def plan_units(sizes: list[int], target_bytes: int, min_units: int = 1) -> list[list[int]]:
    """The input pieces (`sources.pieces`: files, and byte ranges of large line-based files; by index, in listing
    order) grouped into units of consecutive pieces, one task each in every per-file phase: at most a share of about
    `target_bytes` a unit (a larger piece is a unit alone), and at least `min_units` units (or one per piece, if
    fewer), so the tasks keep every slot busy.

    A corpus of thousands of small files then costs what its bytes cost: each unit writes a handful of objects
    whatever its file count (one per file before, and a Ray task per file); a large JSONL file is read by several
    tasks. Which pieces share a unit changes no output: documents keep their ids (piece index << 32 | line) and
    every later phase reads units in file order."""
    total = sum(sizes)
    count = max(math.ceil(total / max(1, target_bytes)), min(len(sizes), min_units), 1)
    share = max(1.0, total / count)
    units: list[list[int]] = []
    unit: list[int] = []
    held = 0
    for i, size in enumerate(sizes):
        # A unit closes before a file that would take it past its share, or when the files left are only enough
        # to give each of the units still owed one.
        if unit and (held + size > share or len(sizes) - i <= count - len(units) - 1):
            units.append(unit)
            unit, held = [], 0
        unit.append(i)
        held += size
    return units + [unit] if unit else units


def _parallelism(executor: Callable[..., list] | None) -> int:
    """How many tasks of a phase run at once: the local instance's task slots (`_tasks`), a cluster's CPUs, or 1
    for an in-process executor."""
    if executor is not None:
        return 1
    import ray

    slots = cluster.cpu_task_slots()
    return slots + 1 if slots is not None else max(1, int(ray.cluster_resources().get("CPU", 1)))


def _tasks(fn: Callable[..., Any], items: list[tuple], *, num_cpus: float, cpu: list[float] | None = None,
           **kwargs: Any) -> list[Any]:
    """`fn(*item, **kwargs)` for every item, one Ray Data task each (progress bars, retries, backpressure); the
    results in the items' order. Items and results travel pickled in a binary column. Each task runs with the
    driver's storage settings (endpoint, region, retries): a pooled worker process serves many stages and runs. A
    `DataError` raised in a task comes back as a value and is raised here as itself, naming the file or record.
    The tasks' own CPU-seconds are added to `cpu[0]` and their wall seconds to `cpu[1]` (the manifest's timings
    show work against waiting)."""
    import ray.data

    if not items:
        return []
    rows = [{"i": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
    items_ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # On a local Ray (more logical CPUs than cores) a task per core, plus one to cover a task's I/O waits and the
    # end of a phase; more only adds worker processes to start (`cluster.cpu_task_slots`).
    slots = cluster.cpu_task_slots()
    # Ray's annotation of map_batches' fn does not model the extra arguments that fn_kwargs supplies.
    ds = items_ds.map_batches(_call, batch_size=1, num_cpus=num_cpus,  # type: ignore[arg-type]
                              compute=ray.data.TaskPoolStrategy(  # `concurrency=` is deprecated in Ray 2.60
                                  size=None if slots is None else min(len(rows), slots + 1)),
                              fn_kwargs={"fn": fn, "kwargs": kwargs, "settings": storage.settings()})
    results: list[Any] = [None] * len(items)
    for row in ds.iter_rows():
        results[int(row["i"])] = _unpack_result(row["result"], cpu)
    return results


def in_process(fn: Callable[..., Any], items: list[tuple], *, num_cpus: float, cpu: list[float] | None = None,
               **kwargs: Any) -> list[Any]:
    """`_tasks` without Ray: every item's task in turn in this process, through the same pickling and task wrapper
    (a task sees only what it would receive on a worker)."""
    batch = _call({"i": list(range(len(items))), "item": [pickle.dumps(item) for item in items]}, fn,
                  pickle.loads(pickle.dumps(kwargs)), storage.settings())
    return [_unpack_result(r, cpu) for r in batch["result"]]


def _unpack_result(result: bytes, cpu: list[float] | None) -> Any:
    error, value, cpu_s, wall_s = pickle.loads(result)
    if error is not None:
        raise DataError(error)
    if cpu is not None:
        cpu[0] += cpu_s
        cpu[1] += wall_s
    return value


def _call(batch: dict, fn: Callable[..., Any], kwargs: dict[str, Any], settings: dict[str, Any]) -> dict:
    out = []
    with storage.using(settings), _one_thread_tokenizers():
        for item in batch["item"]:
            start, wall = time.process_time(), time.perf_counter()  # the task's own CPU (with its threads)
            try:
                value = fn(*pickle.loads(item), **kwargs)
                out.append(pickle.dumps((None, value, time.process_time() - start, time.perf_counter() - wall)))
            except DataError as e:
                out.append(pickle.dumps((str(e), None, 0.0, 0.0)))
    return {"i": batch["i"], "result": out}


@contextlib.contextmanager
def _one_thread_tokenizers():
    """`tokenizers` encodes a batch on a thread per core unless told not to: the stage already runs a task per
    core, so in a task its threads only contend (about 15% more CPU for the same encode, measured). Read at each
    call; restored after the task, since a pooled worker process also serves other work."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


# ----------------------------------------------------------------------------------------------- read + clean
def _read_and_clean(tasks: Callable[..., list], pieces: list[dict], plan: list[list[int]],
                    read_spec: sources.ReadSpec, cfg: DataConfig, work: str) -> list[dict]:
    """Per unit of input pieces: its counts, dropped-record sample and key/signature runs (prepare.py)."""
    total = sum(int(p["size"]) for p in pieces)
    spec = prepare.PrepareSpec(
        read=read_spec, normalize=cfg.normalize, scrub_pii=cfg.scrub_pii,
        filters=cfg.filters, keys=prepare.KeyParams.from_config(cfg.dedup),
        partitions=max(1, min(512, math.ceil(total / KEY_PARTITION_BYTES))), work=work,
        max_reported=cfg.max_records_reported, language=filters.LanguageSpec.from_config(cfg),
        examples=cfg.filter_examples_reported)
    return tasks(prepare.prepare_unit, [([pieces[i] for i in unit], unit) for unit in plan], num_cpus=1, spec=spec)


def _file_lines(units: list[dict], pieces: list[dict]) -> dict[int, int]:
    """Number the skipped records of a file's later byte ranges by the file's lines, as one read of it would: each
    range counted its lines from its own start, and reported how many it held (`range_lines`). Returns each piece's
    offset (its file's lines before it)."""
    lines = {int(p): n for u in units for p, n in u.get("range_lines", {}).items()}
    offset, before = {}, 0
    for i, p in enumerate(pieces):
        if not p.get("range") or p["range"][0] == 0:
            before = 0
        offset[i] = before
        before += lines.get(i, 0)
    for u in units:
        for r in u["skipped"]:
            r["line"] += offset.get(r.pop("piece", -1), 0)
        for examples in u.get("examples", {}).values():  # the rule sets' dropped examples, numbered alike
            for r in examples:
                r["line"] += offset.get(r.pop("piece", -1), 0)
    return offset


# ---------------------------------------------------------------------------------------------- decontaminate
def _decontaminate(tasks: Callable[..., list], cfg: DataConfig, work: str, units: list[dict], pieces: list[dict],
                   offsets: dict[int, int], eval_tasks: list[decontam.TaskText], fp: str) -> list[dict]:
    """The kept documents that share an n-gram with an eval task (filters/decontam.py), with their file and line;
    when dropped, counted in their units' stats (before the manifest sums them). The driver hashes the tasks' n-grams
    once and ships them as one file; its contaminated documents are a small list, each unit's kept on disk."""
    dc = cfg.filters.decontamination
    table_uri = storage.join(work, "decontam.npz")
    if not storage.exists(table_uri):
        decontam.save_table(table_uri, decontam.build_table(eval_tasks, dc.ngram))
    spec = decontam.ScanSpec(work=work, table_uri=table_uri, table_key=fp, ngram=dc.ngram)
    found = tasks(decontam.scan_unit, [(u["unit"],) for u in units], num_cpus=1, spec=spec)
    where = {i: (p["uri"], offsets.get(i, 0)) for i, p in enumerate(pieces)}
    return decontam.count(units, found, where, drop=dc.mode == "drop", examples=cfg.filter_examples_reported)


# ----------------------------------------------------------------------------------------------------- dedup
def _deduplicate(tasks: Callable[..., list], cfg: DataConfig, work: str, units: list[dict], resumed: list[str]
                 ) -> dict[str, np.ndarray]:
    """Duplicate doc ids with the id they duplicate and whether the match is exact (else near)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = storage.join(work, "dups.parquet")
    if storage.exists(done):
        resumed.append("dedup")
        table = pq.read_table(io.BytesIO(storage.read_bytes(done)))
        return {c: table[c].to_numpy() for c in table.column_names}
    result = {"doc_id": np.empty(0, np.int64), "dup_of": np.empty(0, np.int64), "exact": np.empty(0, bool)}
    runs = [r for u in units for r in u["key_runs"]]
    partitions = sorted({int(p) for r in runs for p in r["parts"]})
    found = tasks(prepare.dedup_partition, [(segments(runs, p),) for p in partitions], num_cpus=1)
    if found:
        cat = {k: np.concatenate([f[k] for f in found]) for k in found[0]}
        near, near_of = prepare.verify_pairs(cat["near_doc"], cat["near_first"],
                                             [(int(u["pieces"][0]), u["sig_runs"]) for u in units],
                                             cfg.dedup.threshold)
        result = prepare.one_row_per_dup({
            "doc_id": np.concatenate([cat["exact_doc"], near]), "dup_of": np.concatenate([cat["exact_of"], near_of]),
            "exact": np.concatenate([np.ones(cat["exact_doc"].shape[0], bool), np.zeros(near.shape[0], bool)])})
    buf = io.BytesIO()
    pq.write_table(pa.table(result), buf)
    storage.write_bytes(done, buf.getvalue())
    return result


def _dups_by_unit(dups: dict[str, np.ndarray], units: list[dict]) -> list[np.ndarray]:
    """Each unit's duplicate doc ids (sorted), aligned with `units` (a doc id's high half is its piece index)."""
    ids = np.sort(dups["doc_id"])
    starts = np.asarray([int(u["pieces"][0]) for u in units], np.int64)
    unit_of = np.searchsorted(starts, ids >> 32, side="right") - 1
    return [ids[unit_of == i] for i in range(len(units))]


# ------------------------------------------------------------------------------------------------- tokenizer
def _tokenizer(tasks: Callable[..., list], cfg: DataConfig, tok_cfg: TokenizerConfig, work: str, out: str,
               units: list[dict], dups: dict, resumed: list[str], root: str) -> dict:
    from llm_platform.data.dataset import load_tokenizer

    uri = storage.join(out, "tokenizer")
    base: dict[str, Any] = {}
    if tok_cfg.kind == "pretrained":  # the model's own tokenizer: copied unaltered unless tokens are added
        tok, source, added = tokenizers.load_pretrained(tok_cfg, root)
        base = {"source": source, "base_sha256": storage.file_sha256(storage.join(source, "tokenizer.json")),
                "base_vocab_size": len(tok) - len(added), "added": added}
        tokenizers.check_usable(tok, cfg.kind, f"tokenizer.path={tok_cfg.path!r}")
    if storage.exists(storage.join(uri, "tokenizer.json")):
        resumed.append("tokenizer")
        return tokenizers.describe(load_tokenizer(uri), storage.file_sha256(storage.join(uri, "tokenizer.json")),
                                   **base)
    if tok_cfg.kind == "pretrained":
        sha = tokenizers.save(tok, uri, copy_from=None if base["added"] else base["source"])
        return tokenizers.describe(tok, sha, **base)
    # A deterministic sample (by doc hash) of the kept train documents: every `stride`-th hash of the records read.
    total = sum(int(u["records"]) for u in units)
    stride = max(1, math.ceil(total / max(1, tok_cfg.max_training_documents)))
    chosen = tasks(_sample_one, [(u["unit"], d) for u, d in zip(units, _dups_by_unit(dups, units)) if u["kept"]],
                   num_cpus=1, work=work, stride=stride, val_fraction=cfg.val_fraction)
    tok = tokenizers.train_bpe((t for texts in chosen for t in texts), tok_cfg)
    sha = tokenizers.save(tok, uri)
    return tokenizers.describe(tok, sha)


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


# ------------------------------------------------------------------------------------------------------ pack
def _num_shards(cfg: DataConfig, inputs: list[dict]) -> dict[str, int]:
    if cfg.num_shards:
        train = cfg.num_shards
    else:
        train = max(1, math.ceil(sum(m["size"] for m in inputs) / SHARD_TARGET_BYTES))
    val = max(1, math.ceil(train * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    return {"train": train, "val": val}


def _pack(tasks: Callable[..., list], cfg: DataConfig, inputs: list[dict], work: str, out: str, units: list[dict],
          dups: dict, tok_record: dict, membership: mixture.Membership | None
          ) -> tuple[list[dict], dict[str, Any] | None]:
    """Tokenize every cleaned unit, then pack every output shard; with a mixture, the plan is made between the two
    (mixture.py) and returned with what the shards wrote."""
    spec = shards.ShardSpec(
        kind=cfg.kind, seq_len=cfg.seq_len, target_len=cfg.target_len, val_fraction=cfg.val_fraction,
        counts=_num_shards(cfg, inputs), tokenizer_uri=storage.join(out, "tokenizer"),
        eos=tok_record["eos_token_id"], pad=tok_record["pad_token_id"], vocab=tok_record["vocab_size"],
        batch=cfg.tokenize_batch_size, chat_overflow=cfg.chat_overflow, work=work, out=out,
        pack_supervised=packs_supervised(cfg), membership=membership)
    encoded = tasks(shards.encode_unit, [(u["unit"], d) for u, d in zip(units, _dups_by_unit(dups, units))
                                         if u["kept"]], num_cpus=1, spec=spec)
    runs = [r for e in encoded for r in e["runs"]]  # units in file order: document order
    names_ = spec.shard_names()
    used = sorted({int(p) for r in runs for p in r["parts"]})
    record = None
    if membership is not None:
        hist = sum((mixture.from_record(e["mixture"]) for e in encoded),
                   mixture.empty_histogram(len(membership.names)))
        files = [sum(1 for m in inputs if s in m["mixture"]) for s in range(len(membership.names))]
        plan, record = mixture.plan(hist, cfg.mixture, membership.names, cfg.mixture_tokens, files=files,
                                    seed=cfg.mixture_seed)
        spec = dataclasses.replace(spec, plan=plan)
    packed = tasks(shards.pack_shard, [(names_[p], segments(runs, p)) for p in used], num_cpus=0.5, spec=spec)
    if record is not None and membership is not None:
        record = mixture.realised(record, membership.names, packed)
    return packed, record
