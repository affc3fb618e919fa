"""Eval-set decontamination: documents that share a word n-gram (13 words by default, as GPT-3 and most since) with
an eval task's text, dropped or reported with the task and the overlapping span.

Words are `\\w+` runs of the lower-cased text, so casing, punctuation and spacing do not hide a copied passage. An
n-gram's hash combines its words' xxh64 hashes polynomially (mod 2^64), so a document's n-grams are hashed with a
dozen numpy operations over its word hashes, not a string join each. The driver reads the task texts once
(`read_sources`: JSONL files, lm-evaluation-harness tasks) and writes every task's sorted n-gram hashes to
`<dataset>/_work/decontam.npz` (`save_table`); each task of the stage's `decontaminate` phase loads it once and scans
a cleaned unit (`scan_unit`) with one `searchsorted` per batch of documents. Only a document with a hit is looked at
again, per task, for its span.

It runs as a phase over the cleaned units rather than as a rule set in `filters.Chain`: a rule set sees a text alone
and can only drop it, while decontamination must name the file, line and span of what it finds and, in `report`
mode, keep the document."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from llm_platform import storage
from llm_platform.config.data import DecontaminationConfig
from llm_platform.data.results import FileResult
from llm_platform.errors import ConfigError, DataError

KEY = "data.filters.decontamination"
HARNESS = "harness:"
WORD = re.compile(r"\w+")
# An odd 64-bit multiplier (FNV-1a's prime): n-gram hash = sum of word hash x PRIME^(n-1-j), wrapping mod 2^64.
PRIME = np.uint64(0x100000001B3)
SPAN_CHARS = 300  # of an overlapping span, in the manifest
BATCH_DOCS = 2048


@dataclass(frozen=True)
class TaskText:
    """One eval task's texts and where they came from."""

    name: str
    """The task's name: a JSONL file's stem, or the lm-eval task's name (drops are `decontamination.<name>`)."""
    source: str
    """The `sources` entry it came from."""
    texts: tuple[str, ...]


@dataclass
class Hit:
    """What a contaminated document shares with a task."""

    task: str
    ngrams: int
    """Its n-grams found in the task's (all of them, counted with repeats)."""
    span: str
    """The longest run of consecutive overlapping n-grams, as the document writes it."""


def words(text: str) -> list[str]:
    """Lower-cased word runs: what n-grams are made of (punctuation and spacing removed)."""
    return WORD.findall(text.lower())


def word_hashes(tokens: list[str]) -> np.ndarray:
    """(len,) uint64 xxh64 of each word; each distinct word hashed once (about twice as fast on prose)."""
    table = {w: xxhash.xxh64_intdigest(w.encode()) for w in dict.fromkeys(tokens)}
    return np.fromiter(map(table.__getitem__, tokens), np.uint64, len(tokens))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1,) hashes of every run of n consecutive word hashes (empty when there are fewer than n)."""
    m = hashes.shape[0] - n + 1
    if m <= 0:
        return np.empty(0, np.uint64)
    out = hashes[:m].copy()
    for j in range(1, n):  # uint64 arrays wrap on overflow (mod 2^64), which is the hash we want
        out = out * PRIME + hashes[j:j + m]
    return out


def text_ngrams(text: str, n: int) -> np.ndarray:
    return ngram_hashes(word_hashes(words(text)), n)


# ------------------------------------------------------------------------------------------------ task texts
def check(cfg: DecontaminationConfig) -> None:
    """Refuse, naming the key, an n-gram under 1, no sources, or a `harness:` source without lm-eval installed."""
    if not cfg.enabled:
        return
    if cfg.ngram < 1:
        raise ConfigError(f"{KEY}.ngram={cfg.ngram} must be at least 1 (13 is the usual)")
    if not cfg.sources:
        raise ConfigError(f"{KEY}.sources is empty: name eval task JSONL files or harness:<task>")
    if not cfg.text_fields and any(not s.startswith(HARNESS) for s in cfg.sources):
        raise ConfigError(f"{KEY}.text_fields is empty: name the JSONL fields holding eval text")
    if any(s.startswith(HARNESS) for s in cfg.sources):
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError(f"{KEY}.sources names harness: tasks but lm-evaluation-harness is not installed "
                              f"(pip install 'llm-platform[harness]')") from None


def read_sources(cfg: DecontaminationConfig) -> list[TaskText]:
    """Every task's texts, JSONL files first then harness tasks, in `sources` order; task names must be unique."""
    tasks = [_read_jsonl(s, cfg.text_fields) for s in cfg.sources if not s.startswith(HARNESS)]
    harness = [s[len(HARNESS):] for s in cfg.sources if s.startswith(HARNESS)]
    if harness:
        tasks += _read_harness(harness, cfg.harness_include_path)
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise ConfigError(f"{KEY}.sources: {seen[t.name]} and {t.source} both name a task {t.name!r}")
        seen[t.name] = t.source
    return tasks


def _task_name(uri: str) -> str:
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".zst", ".jsonl", ".json"):
        base = base.removesuffix(suffix)
    return base


def _read_jsonl(uri: str, fields: list[str]) -> TaskText:
    """The `fields` of every line of a JSONL file (a string, or a list whose strings are taken)."""
    if not storage.exists(uri):
        raise ConfigError(f"{KEY}.sources: no file at {uri}")
    texts: list[str] = []
    with storage.open_read(uri, "rt", compression="infer") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{uri}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{uri}:{number}: expected a JSON object")
            for key in fields:
                value = row.get(key)
                values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
                texts += [v for v in values if isinstance(v, str) and v.strip()]
    if not texts:
        raise DataError(f"{uri}: no text in fields {fields} ({KEY}.text_fields)")
    return TaskText(_task_name(uri), uri, tuple(texts))


def _read_harness(names: list[str], include_path: str | None) -> list[TaskText]:
    """The evaluated documents of lm-eval tasks (groups expand to their tasks): each document's prompt followed by
    its answer, and every answer choice. lm-eval fetches built-in tasks' data from the Hugging Face hub; a task folder
    (`harness_include_path`) may name local data files, relative to itself."""
    from lm_eval.tasks import TaskManager

    folder = os.path.abspath(include_path) if include_path else None
    if folder and not os.path.isdir(folder):
        raise ConfigError(f"{KEY}.harness_include_path: no folder at {include_path}")
    # The built-in index reads ~15k YAML files: skipped when the folder has every task named (as the eval stage does).
    manager = TaskManager(include_path=folder, include_defaults=False) if folder else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=folder, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{KEY}.sources: lm-eval knows no task harness:{', harness:'.join(unknown)} (built-in"
                          + (f" or in {KEY}.harness_include_path={include_path})" if folder else ")"))
    # As in the eval stage (evaluate/harness.py): relative `data_files` resolve against the working directory.
    with contextlib.chdir(folder) if folder else contextlib.nullcontext():
        loaded = manager.load(names)["tasks"]
        return [TaskText(name, HARNESS + name, tuple(_harness_texts(task))) for name, task in sorted(loaded.items())]


def _harness_texts(task: Any) -> list[str]:
    out: list[str] = []
    for doc in task.eval_docs:
        prompt = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice else []
        if isinstance(target, int) and 0 <= target < len(choices):
            target = choices[target]
        parts = [p.strip() for p in (prompt, target) if isinstance(p, str)]  # n-grams ignore the delimiter
        out.append(" ".join(p for p in parts if p))
        out += [c for c in choices if isinstance(c, str)]
    return [t for t in out if t]


def digest(tasks: list[TaskText]) -> list[list[str]]:
    """[name, source, sha256 of its texts] per task: the fingerprint's record of what was decontaminated against."""
    return [[t.name, t.source, hashlib.sha256(json.dumps(t.texts).encode()).hexdigest()] for t in tasks]


def build_table(tasks: list[TaskText], n: int) -> dict[str, np.ndarray]:
    """Each task's sorted, unique n-gram hashes."""
    table = {}
    for t in tasks:
        found = [text_ngrams(text, n) for text in t.texts]
        table[t.name] = np.unique(np.concatenate(found)) if found else np.empty(0, np.uint64)
    return table


def save_table(uri: str, table: dict[str, np.ndarray]) -> None:
    """The tasks' hashes as one array with each task's end offset (names of any characters, nothing pickled)."""
    names = sorted(table)
    ends = np.cumsum([table[name].shape[0] for name in names], dtype=np.int64)
    hashes = np.concatenate([table[name] for name in names]) if names else np.empty(0, np.uint64)
    buf = io.BytesIO()
    np.savez(buf, names=np.asarray(names, dtype=str), ends=ends, hashes=hashes)
    storage.write_bytes(uri, buf.getvalue())


def load_table(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
        names, ends, hashes = z["names"].tolist(), z["ends"], z["hashes"]
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return {name: hashes[a:b] for name, a, b in zip(names, starts, ends)}


@functools.lru_cache(maxsize=4)
def _matcher(uri: str, key: str) -> Matcher:
    """A table loaded once per process (`key`: its fingerprint, so a rewritten table is never a stale one)."""
    return Matcher(load_table(uri))


# ----------------------------------------------------------------------------------------------- matching
class Matcher:
    """Finds the documents that share an n-gram with a task: first against every task's hashes at once, then, for a
    document with a hit, task by task."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        merged = [v for v in table.values() if v.size]
        self.all = np.unique(np.concatenate(merged)) if merged else np.empty(0, np.uint64)

    def _member(self, hashes: np.ndarray, sorted_: np.ndarray) -> np.ndarray:
        if not sorted_.size or not hashes.size:
            return np.zeros(hashes.shape[0], bool)
        idx = np.minimum(np.searchsorted(sorted_, hashes), sorted_.shape[0] - 1)
        return sorted_[idx] == hashes

    def contaminated(self, texts: list[str], n: int) -> list[int]:
        """Indexes of `texts` with an n-gram in any task: one lookup for the whole batch (word hashes concatenated,
        n-grams that cross two documents masked)."""
        tokens = [words(t) for t in texts]
        lengths = np.fromiter((len(w) for w in tokens), np.int64, len(tokens))
        grams = ngram_hashes(word_hashes([w for ws in tokens for w in ws]), n)
        if not grams.size:
            return []
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pos = np.arange(grams.shape[0])
        doc = np.searchsorted(starts, pos, side="right") - 1
        valid = pos + n <= starts[doc] + lengths[doc]
        return np.unique(doc[valid & self._member(grams, self.all)]).tolist()

    def hit(self, text: str, n: int) -> Hit | None:
        """The task sharing the most n-grams with `text` (ties: the first name), with the overlapping span."""
        grams = text_ngrams(text, n)
        best: tuple[int, str, np.ndarray] | None = None
        for name in sorted(self.table):
            found = self._member(grams, self.table[name])
            if found.any() and (best is None or int(found.sum()) > best[0]):
                best = (int(found.sum()), name, found)
        if best is None:
            return None
        count, name, found = best
        return Hit(name, count, _span(text, found, n))


def _span(text: str, found: np.ndarray, n: int) -> str:
    """The longest run of consecutive found n-grams (the first, among equals), in the document's own words: the
    original characters from its first word to its last, or the lower-cased words where lower-casing changed the
    word count (rare Unicode)."""
    best_start, best_len, start = 0, 0, -1
    for i, f in enumerate(np.append(found, False)):
        if f and start < 0:
            start = i
        elif not f and start >= 0:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = -1
    first, last = best_start, best_start + best_len + n - 2  # word indexes
    matches = list(WORD.finditer(text))
    if len(matches) == len(words(text)):
        span = text[matches[first].start():matches[last].end()]
    else:
        span = " ".join(words(text)[first:last + 1])
    return span[:SPAN_CHARS]


# ---------------------------------------------------------------------------------------------- the phase
@dataclass(frozen=True)
class ScanSpec:
    """What a `scan_unit` task needs (plain values: it pickles to Ray workers)."""

    work: str
    table_uri: str
    table_key: str
    """The table's fingerprint (its tasks' digests and n)."""
    ngram: int


def scan_unit(unit: str, spec: ScanSpec) -> list[dict[str, Any]]:
    """A cleaned unit's contaminated documents (doc_id, task, ngrams, span, language), in file order;
    the list is written to `decontam/<unit>.json` so a resumed stage skips the unit."""
    from llm_platform.data import shards

    done = storage.join(spec.work, "decontam", f"{unit}.json")
    if storage.exists(done):
        return storage.read_json(done)
    matcher = _matcher(spec.table_uri, spec.table_key)
    out: list[dict[str, Any]] = []
    for batch in shards.read_clean(storage.join(spec.work, "clean", f"{unit}.parquet"),
                                   ["doc_id", "text", "language"]):
        doc_ids, texts = batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()
        languages = batch.column("language").to_pylist()
        for lo in range(0, len(texts), BATCH_DOCS):
            for i in matcher.contaminated(texts[lo:lo + BATCH_DOCS], spec.ngram):
                i += lo
                found = matcher.hit(texts[i], spec.ngram)
                if found is not None:  # always: the same n-grams, looked up task by task
                    out.append({"doc_id": int(doc_ids[i]), "task": found.task, "ngrams": found.ngrams,
                                "span": found.span, "language": languages[i] or ""})
    storage.write_json(done, out)
    return out


def count(units: list[FileResult], found: list[list[dict[str, Any]]], where: dict[int, tuple[str, int]],
          drop: bool, examples: int) -> tuple[list[dict[str, Any]], list[FileResult]]:
    """Every contaminated document as (doc_id, task, source, line, ngrams, span), in file order, and the units: with
    `drop`, each with its contaminated documents counted as the other drops are (`dropped`, `dropped_by_file`,
    `examples`, kept documents and languages), so the manifest and the console report show
    `decontamination.<task>` beside every other rule. `where` maps a piece index to (its file, the line its first
    line has in that file, less one)."""
    listed = []
    counted = []
    for unit, hits in zip(units, found):
        unit_listed = []
        for h in hits:
            source, offset = where[h["doc_id"] >> 32]
            unit_listed.append({"doc_id": h["doc_id"], "task": h["task"], "source": source,
                                "line": offset + (h["doc_id"] & 0xFFFFFFFF), "ngrams": h["ngrams"], "span": h["span"]})
        listed += unit_listed
        counted.append(_dropped(unit, hits, unit_listed, examples) if drop and hits else unit)
    return listed, counted + units[len(counted):]


def _dropped(unit: FileResult, hits: list[dict[str, Any]], listed: list[dict[str, Any]], examples: int
             ) -> FileResult:
    """`unit` with its contaminated documents (`hits`, located in `listed`) counted as dropped."""
    dropped = dict(unit.dropped)
    by_file = {source: dict(reasons) for source, reasons in unit.dropped_by_file.items()}
    kept = dict(unit.languages.get("kept", {}))
    shown = {reason: list(rs) for reason, rs in unit.examples.items()}
    for h, doc in zip(hits, listed):
        reason = f"decontamination.{h['task']}"
        dropped[reason] = dropped.get(reason, 0) + 1
        in_file = by_file.setdefault(doc["source"], {})
        in_file[reason] = in_file.get(reason, 0) + 1
        if h["language"] and kept.get(h["language"]):
            kept[h["language"]] -= 1
        first = shown.setdefault(reason, [])
        if len(first) < examples:  # what it shares, not its start
            first.append({"source": doc["source"], "line": doc["line"], "text": h["span"]})
    return dataclasses.replace(unit, kept=unit.kept - len(hits), dropped=dropped, dropped_by_file=by_file,
                               languages={**unit.languages, "kept": kept}, examples=shown)
