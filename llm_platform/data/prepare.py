"""The data stage's first pass, one unit of input files per call, no Ray: read, clean, and the dedup keys.

A unit is a run of consecutive input pieces (files, or byte ranges of a large line-based file: `sources.pieces`) of
about `data.task_target_bytes` together (units.plan_units), so a corpus of thousands of small files costs per
byte and not per file: each call writes a handful of objects whatever its file count. Each call reads its pieces
once and writes, under `<work>/` (`<unit>` = its first-last piece index):

    clean/<unit>.parquet    the kept records (doc_id, text_hash, text, prompt, response, messages, language,
                            language_score), in file order
    keys/<unit>-<n>.bin     dedup keys bucketed by partition (exchange.py): exact (text hash) and LSH band keys
    sigs/<unit>-<n>.bin     the kept documents' b-bit MinHash signatures, read back only for candidate pairs
    clean/<unit>.json       the unit's counts (read, dropped by reason and by file, languages, the first skipped
                            records and dropped examples per reason), written last:
                            a resumed stage skips every unit that has it

Dedup then works on keys alone (`dedup_partition`): equal keys meet in one reduce task, which returns exact
duplicates and near *candidate* pairs; `verify_pairs` fetches the signatures of the candidates only. Before, every
band row carried its document's signature through a shuffle: 15 rows x 145 bytes a document, eight times the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_platform import storage
from llm_platform.config.data import FilterConfig
from llm_platform.data import clean, dedup, filters, sources
from llm_platform.data.exchange import PartitionedWriter, read_partition, read_segments, segments
from llm_platform.data.filters import LanguageSpec
from llm_platform.data.results import FileResult

READ_BATCH_ROWS = 2048
CLEAN_COLUMNS = ("doc_id", "text_hash", "text", "prompt", "response", "messages")
EXAMPLE_CHARS = 200  # of a dropped document's text, in the manifest's examples


@dataclass(frozen=True)
class KeyParams:
    """What the dedup keys need from `data.dedup`, with the LSH banding for its threshold."""

    exact: bool
    near: bool
    num_perm: int
    seed: int
    shingle_words: int
    bands: int
    rows: int
    threshold: float

    @classmethod
    def from_config(cls, cfg) -> KeyParams:
        bands, rows = dedup.lsh_params(cfg.threshold, cfg.num_perm)
        return cls(exact=cfg.exact, near=cfg.near, num_perm=cfg.num_perm, seed=cfg.seed,
                   shingle_words=cfg.shingle_words, bands=bands, rows=rows, threshold=cfg.threshold)


@dataclass(frozen=True)
class PrepareSpec:
    """Everything a prepare call needs (plain values: it pickles to Ray workers as is)."""

    read: sources.ReadSpec
    normalize: str
    scrub_pii: bool
    filters: FilterConfig
    keys: KeyParams
    partitions: int
    """Dedup key partitions (reduce tasks)."""
    work: str
    max_reported: int
    language: LanguageSpec = field(default_factory=LanguageSpec)
    """`data.languages` and its threshold."""
    examples: int = 3
    """Dropped documents kept as examples per drop reason (`data.filter_examples_reported`)."""


_RULES: dict[str, filters.Chain | None] = {}


def rules_of(spec: PrepareSpec) -> filters.Chain | None:
    """The spec's rule sets, built once per process and config (keyed by the configs' repr: dataclasses holding
    lists do not hash)."""
    key = repr((spec.filters, spec.language))
    if key not in _RULES:
        _RULES[key] = filters.build(spec.filters, spec.language)
    return _RULES[key]


def clean_records(records: list[dict], spec: PrepareSpec) -> list[dict]:
    """Normalize, scrub and filter each record (`clean.clean_record`, with the spec's rule sets); a kept one gets its
    `text_hash`."""
    out = []
    rules = rules_of(spec)
    for r in records:
        c = clean.clean_record(r, spec.normalize, spec.scrub_pii, spec.filters, rules)
        c["text_hash"] = dedup.text_hash(c["text"]) if not c["drop_reason"] else 0
        out.append(c)
    return out


def dedup_keys(doc_ids: np.ndarray, hashes: np.ndarray, texts: list[str], params: KeyParams
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The kept documents' dedup keys and their b-bit signatures (None without near dedup).

    Keys: `exact_key`/`exact_doc` (the text hash, one per document) and `near_key`/`near_doc` (one per LSH band).
    """
    keys: dict[str, np.ndarray] = {}
    sigs = None
    if params.exact:
        keys["exact_key"], keys["exact_doc"] = hashes.astype(np.int64), doc_ids.astype(np.int64)
    if params.near and len(texts):
        a, b = dedup.permutations(params.num_perm, params.seed)
        full = dedup.signatures(texts, a, b, params.shingle_words)  # (n, num_perm) uint32
        keys["near_key"] = dedup.band_keys(full, params.bands, params.rows).reshape(-1)  # (n * bands,)
        keys["near_doc"] = np.repeat(doc_ids.astype(np.int64), params.bands)
        sigs = dedup.bbit(full)  # (n, num_perm) uint8
    return keys, sigs


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    return (keys.view(np.uint64) % np.uint64(partitions)).astype(np.int64)


def _write_keys(writer: PartitionedWriter, keys: dict[str, np.ndarray], partitions: int) -> None:
    for kind in ("exact", "near"):
        if f"{kind}_key" not in keys:
            continue
        k, d = keys[f"{kind}_key"], keys[f"{kind}_doc"]
        part = partition_of(k, partitions)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(partitions + 1))
        for p in range(partitions):
            sel = order[bounds[p]:bounds[p + 1]]
            if sel.shape[0]:
                writer.add(p, {f"{kind}_key": k[sel], f"{kind}_doc": d[sel]})


def unit_name(pieces: list[int]) -> str:
    """A unit's name: its first and last piece index (a unit is a run of consecutive input pieces). Names every file
    it writes, so a rerun that groups the pieces otherwise never takes another grouping's files as its own."""
    return f"{pieces[0]:06d}-{pieces[-1]:06d}"


def prepare_unit(metas: list[dict[str, Any]], pieces: list[int], spec: PrepareSpec) -> FileResult:
    """Read, clean and key a unit of input pieces (`metas`, with their piece indexes; see the module docstring and
    `sources.pieces`); returns the unit's counts and run indexes. Small files are fetched ahead on threads
    (`sources.prefetched`), so a unit of many small files waits on one request at a time at most."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = unit_name(pieces)
    done = storage.join(spec.work, "clean", f"{name}.json")
    if storage.exists(done):  # an interrupted earlier run finished this unit
        return FileResult.from_json(storage.read_json(done))
    clean_uri = storage.join(spec.work, "clean", f"{name}.parquet")
    keys = PartitionedWriter(storage.join(spec.work, "keys", name))
    sigs = PartitionedWriter(storage.join(spec.work, "sigs", name))
    result = FileResult(unit=name, pieces=(pieces[0], pieces[-1]))
    count = _Count(result, spec)
    schema = pa.schema([("doc_id", pa.int64()), ("text_hash", pa.int64())] +
                       [(c, pa.string()) for c in CLEAN_COLUMNS[2:]] +
                       [("language", pa.string()), ("language_score", pa.float32())])
    fs, path = storage.pyarrow_filesystem(clean_uri)
    if not storage.is_remote(clean_uri):
        storage.makedirs(storage.join(spec.work, "clean"))

    def records():
        for meta, piece, data in sources.prefetched(metas, pieces):
            lines = yield from sources.read_file(meta, piece, spec.read, data=data)
            if meta.get("range"):  # lines the range held: the next range of its file numbers its lines after them
                result.range_lines[piece] = lines

    with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, schema) as writer:
        for batch in _batches(records(), READ_BATCH_ROWS):
            cleaned = clean_records(batch, spec)
            kept = count.add(cleaned)
            if not kept:
                continue
            columns = {c: [r.get(c) or "" for r in kept] for c in CLEAN_COLUMNS[2:]}
            doc_ids = np.fromiter((r["doc_id"] for r in kept), np.int64, len(kept))
            hashes = np.fromiter((r["text_hash"] for r in kept), np.int64, len(kept))
            languages = {"language": [r.get("language") or "" for r in kept],
                         "language_score": [float(r.get("language_score") or 0.0) for r in kept]}
            writer.write_table(pa.table({"doc_id": doc_ids, "text_hash": hashes, **columns, **languages},
                                        schema=schema))
            found, signatures = dedup_keys(doc_ids, hashes, columns["text"], spec.keys)
            _write_keys(keys, found, spec.partitions)
            if signatures is not None:
                sigs.add(0, {"doc": doc_ids, "sig": signatures})
    result.key_runs, result.sig_runs = keys.close(), sigs.close()
    storage.write_json(done, result.to_json())
    return result


class _Count:
    """Counts a unit's cleaned batches into its `FileResult` as they come (`add`)."""

    def __init__(self, result: FileResult, spec: PrepareSpec):
        self.result, self.spec = result, spec

    def add(self, cleaned: list[dict]) -> list[dict]:
        """Count a cleaned batch; returns its kept records."""
        u = self.result
        u.records += len(cleaned)
        u.pii_replacements += sum(int(r.get("pii_replacements") or 0) for r in cleaned)
        for r in cleaned:
            self._count(r)
        kept = [r for r in cleaned if not r["drop_reason"]]
        u.kept += len(kept)
        return kept

    def _count(self, r: dict) -> None:
        """A record's language, and if dropped: by reason, by file and reason, the first skipped records (by file
        and line) and the first `spec.examples` dropped documents of each reason (the start of their text)."""
        u, spec = self.result, self.spec
        reason, lang = r["drop_reason"], r.get("language")
        if lang:
            detected, kept = u.languages["detected"], u.languages["kept"]
            detected[lang] = detected.get(lang, 0) + 1
            if not reason:
                kept[lang] = kept.get(lang, 0) + 1
        if not reason:
            return
        u.dropped[reason] = u.dropped.get(reason, 0) + 1
        by_file = u.dropped_by_file.setdefault(r["source"], {})
        by_file[reason] = by_file.get(reason, 0) + 1
        piece = int(r["doc_id"]) >> 32
        if len(u.skipped) < spec.max_reported:  # the unit's first ones, by file and line
            u.skipped.append({"source": r["source"], "line": int(r["line"]),
                              "reason": r.get("detail") or reason, "piece": piece})
        if r.get("text") and len(u.examples.get(reason, ())) < spec.examples:
            example = {"source": r["source"], "line": int(r["line"]), "text": r["text"][:EXAMPLE_CHARS], "piece": piece}
            if lang:  # what language ID made of it (why `language.*` dropped it)
                example |= {"language": lang, "language_score": round(float(r["language_score"]), 4)}
            u.examples.setdefault(reason, []).append(example)


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------------- dedup
def dedup_partition(segs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One key partition: exact duplicates (`exact_doc` duplicates `exact_of`) and near candidate pairs
    (`near_doc`, `near_first`): every document that shares a band key with a smaller one, paired with the
    smallest document of that key (what `dedup.block_duplicates` compares each row with)."""
    cat, _ = read_partition(segs)
    empty = np.empty(0, np.int64)
    out = {"exact_doc": empty, "exact_of": empty, "near_doc": empty, "near_first": empty}
    if "exact_key" in cat:
        out["exact_doc"], out["exact_of"] = dedup.block_duplicates(cat["exact_key"], cat["exact_doc"])
    if "near_key" in cat:
        out["near_doc"], out["near_first"] = candidate_pairs(cat["near_key"], cat["near_doc"])
    return out


def candidate_pairs(keys: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(doc, first) for every row whose key group's smallest doc id `first` is another document."""
    order = np.lexsort((doc_ids, keys))
    keys, doc_ids = keys[order], doc_ids[order]
    starts = np.ones(keys.shape[0], dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(keys.shape[0]), 0))
    candidate = (~starts) & (doc_ids != doc_ids[first])
    return doc_ids[candidate], doc_ids[first][candidate]


def verify_pairs(docs: np.ndarray, firsts: np.ndarray, sig_runs: list[tuple[int, list[dict]]], threshold: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs whose estimated Jaccard (b-bit signatures, chance matches removed) meets `threshold`,
    one per duplicate, pointing at its smallest original. `sig_runs` is each unit's (first piece index, signature
    runs) in file order (a doc id's high half is its piece index); only the units that hold a candidate are read,
    and only the candidates' rows kept."""
    if docs.shape[0] == 0:
        return docs, firsts
    needed = np.unique(np.concatenate([docs, firsts]))
    starts = np.asarray([first for first, _ in sig_runs], np.int64)
    ids, rows = [], []
    for unit in np.unique(np.searchsorted(starts, needed >> 32, side="right") - 1):
        for arrays, _ in read_segments(segments(sig_runs[int(unit)][1], 0)):
            sel = np.isin(arrays["doc"], needed)
            ids.append(arrays["doc"][sel])
            rows.append(arrays["sig"][sel])
    ids_all, sig_all = np.concatenate(ids), np.concatenate(rows)
    order = np.argsort(ids_all)
    ids_all, sig_all = ids_all[order], sig_all[order]
    a, b = sig_all[np.searchsorted(ids_all, docs)], sig_all[np.searchsorted(ids_all, firsts)]
    chance = 2.0 ** (-8 * a.dtype.itemsize)
    similarity = ((a == b).mean(axis=1) - chance) / (1.0 - chance)
    keep = similarity >= threshold
    docs, firsts = docs[keep], firsts[keep]
    order = np.lexsort((firsts, docs))  # per duplicate, its smallest original first
    docs, firsts = docs[order], firsts[order]
    one = np.ones(docs.shape[0], dtype=bool)
    one[1:] = docs[1:] != docs[:-1]
    return docs[one], firsts[one]


def one_row_per_dup(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A document found by several partitions keeps one row; exact beats near (it is the stronger reason)."""
    order = np.lexsort((~d["exact"], d["doc_id"]))
    d = {k: v[order] for k, v in d.items()}
    keep = np.ones(d["doc_id"].shape[0], dtype=bool)
    keep[1:] = d["doc_id"][1:] != d["doc_id"][:-1]
    return {k: v[keep] for k, v in d.items()}
