"""Mixtures (`data.mixture`): named sources weighted into one dataset, as pretraining corpora are built (Dolma's
sampling rates, FineWeb-Edu and Marin mixes), decided on exact token counts.

Every source's files go through the same read, clean, filter and dedup phases as one corpus (a document repeated
across sources is kept once, in the first file). Then:

1. Membership (`encode_unit`, per document): the first source, in name order, that lists the document's file and
   keeps its language (`languages`, detected by LID-176); a document no source keeps is counted as `unassigned`.
2. Draw: each document gets a bucket in [0, BUCKETS) from its text hash and `data.mixture_seed` (splitmix64), a
   uniform draw independent of its split and shard. Tokenization counts each source's documents and tokens per
   (split, bucket) in a histogram.
3. Plan (the driver, from the summed histograms): a source's pool is its lowest buckets within its caps
   (`max_tokens`, `max_documents`, on train counts); with weights w (normalized) and pool tokens A, the mixture's
   train tokens T are `data.mixture_tokens` or, when 0, min(A / w) (the source shortest of its share is taken
   whole, nothing is repeated). A source then takes T * w tokens: `passes` whole copies of its pool and the lowest
   buckets that come closest to the rest (one more copy of each of their documents).
4. Selection (`pack_shard`, per output shard): each record's copies by its source and bucket; a shard writes pass
   0's records in document order, then pass 1's, and so on, so a repeated document's copies sit a shard apart.
   Validation documents take the same buckets, at most once.

The realised proportions (what was written) are in the manifest's `mixture`; they miss the weights only by the
granularity of a bucket (1/1024 of a source's pool).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_platform.data.results import ShardResult
from llm_platform.errors import ConfigError, DataError

BUCKETS = 1024
UNASSIGNED = -1
SPLITS = ("train", "val")
_DOCS, _TOKENS = 0, 1


@dataclass(frozen=True)
class Membership:
    """Which source each document belongs to (plain values: it pickles to Ray workers)."""

    names: tuple[str, ...]
    """The sources, in name order (a source's index is its place here)."""
    piece_sources: tuple[tuple[int, ...], ...]
    """Per input piece (by index): the sources that list its file, in name order."""
    languages: tuple[tuple[str, ...], ...]
    """Per source: the languages it keeps (empty: any)."""
    seed: int = 0

    def assign(self, doc_ids: np.ndarray, languages: list[str]) -> np.ndarray:
        """Each document's source index (UNASSIGNED when none keeps it); a doc id's high half is its piece."""
        out = np.full(doc_ids.shape[0], UNASSIGNED, np.int16)
        for i, (piece, lang) in enumerate(zip((doc_ids >> 32).tolist(), languages)):
            for s in self.piece_sources[piece]:
                if not self.languages[s] or lang in self.languages[s]:
                    out[i] = s
                    break
        return out

    def buckets(self, text_hashes: np.ndarray) -> np.ndarray:
        return draw_buckets(text_hashes, self.seed)


def draw_buckets(text_hashes: np.ndarray, seed: int) -> np.ndarray:
    """A uniform bucket in [0, BUCKETS) per document: splitmix64 of its text hash mixed with the seed."""
    with np.errstate(over="ignore"):
        x = text_hashes.astype(np.int64).view(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(64 - int(math.log2(BUCKETS)))).astype(np.int16)


def empty_histogram(sources: int) -> np.ndarray:
    """Counts per (source, plus a last row for unassigned documents; split; documents/tokens; bucket)."""
    return np.zeros((sources + 1, len(SPLITS), 2, BUCKETS), np.int64)


def add(hist: np.ndarray, source: np.ndarray, split: int, bucket: np.ndarray, tokens: np.ndarray) -> None:
    row = np.where(source < 0, hist.shape[0] - 1, source).astype(np.int64)
    at = bucket.astype(np.int64)
    np.add.at(hist[:, split, _DOCS], (row, at), 1)
    np.add.at(hist[:, split, _TOKENS], (row, at), tokens.astype(np.int64))


def to_record(hist: np.ndarray) -> dict[str, Any]:
    """A histogram as its nonzero cells (a task marker's JSON)."""
    flat = np.flatnonzero(hist)
    return {"shape": list(hist.shape), "at": flat.tolist(), "n": hist.reshape(-1)[flat].tolist()}


def from_record(record: dict[str, Any]) -> np.ndarray:
    hist = np.zeros(int(np.prod(record["shape"])), np.int64)
    hist[np.asarray(record["at"], np.int64)] = np.asarray(record["n"], np.int64)
    return hist.reshape(record["shape"])


@dataclass(frozen=True)
class Plan:
    """What each source takes (plain values: it pickles to Ray workers); see the module docstring."""

    pool: tuple[int, ...]
    """Per source: buckets below this are its pool (its caps)."""
    passes: tuple[int, ...]
    """Per source: whole copies of its pool in train."""
    partial: tuple[int, ...]
    """Per source: train documents in buckets below this get one copy more."""

    def copies(self, source: np.ndarray, bucket: np.ndarray, split: str) -> np.ndarray:
        """Each record's copies in the output (validation records: 0 or 1)."""
        assigned = source >= 0
        s = np.where(assigned, source, 0).astype(np.int64)
        pool, passes, partial = (np.asarray(v, np.int64)[s] for v in (self.pool, self.passes, self.partial))
        n = np.where(bucket < pool, passes + (bucket < partial), 0) * assigned
        return np.minimum(n, 1) if split != "train" else n


def order(copies: np.ndarray) -> np.ndarray:
    """Record indices to write: pass 0's records in document order, then pass 1's, and so on."""
    top = int(copies.max()) if copies.size else 0
    return np.concatenate([np.flatnonzero(copies > k) for k in range(top)] or [np.empty(0, np.int64)])


def gather(flat: np.ndarray, lengths: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The records `idx` (in that order) of records laid end to end in `flat` with `lengths`."""
    lengths = lengths.astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    take = lengths[idx]
    if not take.size:
        return flat[:0]
    within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    return flat[np.repeat(starts[idx], take) + within]


def plan(hist: np.ndarray, mixture: dict[str, Any], names: tuple[str, ...], total_tokens: int, *,
         files: list[int], seed: int) -> tuple[Plan, dict[str, Any]]:
    """The plan from the summed histograms, and its record for the manifest (before anything is written; `files`:
    each source's input files, `seed`: data.mixture_seed, both for the record)."""
    train = hist[:len(names), 0]  # (sources, docs/tokens, buckets)
    cum = np.cumsum(train, axis=2)
    weights = np.asarray([float(mixture[n].weight) for n in names])
    weights = weights / weights.sum()
    pool = []
    for s, name in enumerate(names):
        fits = np.ones(BUCKETS, bool)
        if mixture[name].max_tokens:
            fits &= cum[s, _TOKENS] <= mixture[name].max_tokens
        if mixture[name].max_documents:
            fits &= cum[s, _DOCS] <= mixture[name].max_documents
        pool.append(int(np.argmin(fits)) if not fits.all() else BUCKETS)
    available = np.asarray([cum[s, _TOKENS, p - 1] if p else 0 for s, p in enumerate(pool)], np.int64)
    for s, name in enumerate(names):
        if weights[s] > 0 and available[s] == 0:
            raise DataError(f"data.mixture.{name}: no train tokens left after reading, filters, dedup and caps "
                            f"(its files: {int(hist[s, :, _DOCS].sum())} documents kept)")
    used = weights > 0
    target = int(total_tokens) if total_tokens else int(np.floor((available[used] / weights[used]).min()))
    passes, partial, sources = [], [], {}
    for s, name in enumerate(names):
        want = target * weights[s]
        whole = int(want // available[s]) if available[s] else 0
        rest = want - whole * available[s]
        below = np.concatenate([[0], cum[s, _TOKENS, :pool[s]]])  # tokens of the buckets below k, k = 0..pool
        k = int(np.argmin(np.abs(below - rest)))
        passes.append(whole)
        partial.append(k)
        sources[name] = {
            "weight": round(float(weights[s]), 6), "files": files[s],
            "available": {"documents": int(cum[s, _DOCS, -1]), "tokens": int(cum[s, _TOKENS, -1])},
            "pool": {"documents": int(cum[s, _DOCS, pool[s] - 1]) if pool[s] else 0, "tokens": int(available[s]),
                     "capped": pool[s] < BUCKETS},
            "planned_tokens": int(round(want)),
            "repeats": round(float(want / available[s]), 4) if available[s] else 0.0}
    unassigned = hist[-1, :, :, :].sum(axis=(0, 2))
    record = {"seed": seed, "tokens_target": target, "sources": sources,
              "unassigned": {"documents": int(unassigned[_DOCS]), "tokens": int(unassigned[_TOKENS])}}
    return Plan(tuple(pool), tuple(passes), tuple(partial)), record


def realised(record: dict[str, Any], names: tuple[str, ...], shard_stats: list[ShardResult]) -> dict[str, Any]:
    """The plan's record with what the shards wrote per source and split, and each source's share of train."""
    written = {(split, s): [0, 0] for split in SPLITS for s in range(len(names))}
    for stat in shard_stats:
        for source, (docs, tokens) in (stat.mixture or {}).items():
            cell = written[(stat.split, int(source))]
            cell[0] += int(docs)
            cell[1] += int(tokens)
    train_total = sum(written[("train", s)][1] for s in range(len(names))) or 1
    for s, name in enumerate(names):
        entry = record["sources"][name]
        for split in SPLITS:
            docs, tokens = written[(split, s)]
            entry[split] = {"documents": docs, "tokens": tokens}
        entry["share"] = round(written[("train", s)][1] / train_total, 6)
    return record


def validate(mixture: dict[str, Any], sources: list[str], total_tokens: int) -> None:
    from llm_platform.storage import names

    if not mixture:
        return
    if sources:
        raise ConfigError("data.sources and data.mixture are both set: list each source's files under "
                          "data.mixture.<name>.sources")
    if total_tokens < 0:
        raise ConfigError(f"data.mixture_tokens={total_tokens} must be >= 0")
    for name, source in mixture.items():
        key = f"data.mixture.{name}"
        names.check(name, key)
        if not source.sources:
            raise ConfigError(f"{key}.sources is empty: give the URIs or globs of its files")
        if not (math.isfinite(source.weight) and source.weight >= 0):
            raise ConfigError(f"{key}.weight={source.weight} must be a finite number >= 0")
        for cap in ("max_tokens", "max_documents"):
            if getattr(source, cap) < 0:
                raise ConfigError(f"{key}.{cap}={getattr(source, cap)} must be >= 0 (0: no cap)")
        from llm_platform.data.filters.language import LABELS

        unknown = [code for code in source.languages if code not in LABELS]
        if unknown:
            raise ConfigError(f"{key}.languages: {unknown} are not LID-176 language codes")
    if sum(s.weight for s in mixture.values()) <= 0:
        raise ConfigError("data.mixture: every weight is 0; give at least one source a weight > 0")


def table(record: dict[str, Any]) -> str:
    """The console's view of a mixture: per source, its weight, pool, what it took and its realised share."""
    rows = [("source", "weight", "pool tokens", "train tokens", "share", "repeats", "val tokens")]
    for name, e in record["sources"].items():
        rows.append((name, f"{e['weight']:.3f}", f"{e['pool']['tokens']:,}" + (" (capped)" if e["pool"]["capped"]
                                                                               else ""),
                     f"{e['train']['tokens']:,}", f"{e['share']:.3f}", f"{e['repeats']:.2f}x",
                     f"{e['val']['tokens']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"mixture (seed {record['seed']}, {record['tokens_target']:,} train tokens planned):"]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    if record["unassigned"]["documents"]:
        lines.append(f"  {record['unassigned']['documents']:,} documents in no source (language not kept)")
    return "\n".join(lines) + "\n"


def list_inputs(mixture: dict[str, Any], fmt: str) -> tuple[list[dict], list[dict]]:
    """Every source's files, once each, in URI order (as `sources.list_inputs`), each with `mixture`: the indices
    (in name order) of the sources that list it. Missing paths name their source."""
    from llm_platform.data import sources

    by_uri: dict[str, dict] = {}
    missing: list[dict] = []
    for s, name in enumerate(sorted(mixture)):
        found, lost = sources.list_inputs(list(mixture[name].sources), fmt)
        missing += [{**m, "source": f"{m['source']} (data.mixture.{name})"} for m in lost]
        for meta in found:
            by_uri.setdefault(meta["uri"], {**meta, "mixture": []})["mixture"].append(s)
    return [by_uri[u] for u in sorted(by_uri)], missing


def membership(mixture: dict[str, Any], pieces: list[dict], seed: int) -> Membership:
    ordered = sorted(mixture)
    return Membership(names=tuple(ordered), piece_sources=tuple(tuple(p["mixture"]) for p in pieces),
                      languages=tuple(tuple(mixture[n].languages) for n in ordered), seed=int(seed))


def fingerprint_record(data: dict[str, Any], inputs: list[dict]) -> None:
    """In the fingerprinted config: each source's files (from `inputs`), not the patterns that named them."""
    if not data.get("mixture"):
        for key in ("mixture", "mixture_tokens", "mixture_seed"):
            data.pop(key, None)  # datasets without a mixture keep the fingerprints they had before it existed
        return
    for s, name in enumerate(sorted(data["mixture"])):
        data["mixture"][name]["sources"] = [m["uri"] for m in inputs if s in m.get("mixture", ())]
