"""The dataset's manifest: what went in, what was dropped and why, what came out (written last by the stage)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, NotRequired, TypedDict

import numpy as np

from llm_platform.data import pack
from llm_platform.data.exchange import sum_counters
from llm_platform.data.results import Duplicates, FileResult, ShardResult

# Bump when the shard layout or any phase's semantics change: it is part of the fingerprint. 3: chat turns are
# cleaned and scrubbed like text (they were tokenized raw).
FORMAT_VERSION = 3


class Split(TypedDict):
    """One split's entry in the manifest."""

    files: list[str]  # shard paths relative to the dataset folder
    # Each file's parquet row groups as [rows, count] runs, aligned with `files` (training workers plan their reads
    # from it instead of every worker reading every footer). Absent in manifests from before it existed.
    row_groups: NotRequired[list[list[list[int]]]]
    num_records: int
    num_tokens: int
    documents: int
    tokens_in: int
    remainder_tokens: int
    skipped_prompt_too_long: int
    chat: dict[str, int]  # chat: truncated and skipped conversations by reason
    # Packed sft/chat (data.pack_supervised): examples, rows, tokens (not padding), examples_per_row, fill_rate
    # (tokens / (rows x seq_len)), from pack.packing_summary. Absent for every other dataset.
    packing: NotRequired[dict[str, float | int]]


class Manifest(TypedDict, total=False):
    """`manifest.json`: what the data stage wrote, read by every later stage (`dataset.DatasetInfo.manifest`).
    Documented field by field in docs/ARCHITECTURE.md ("Records shared between stages")."""

    name: str
    fingerprint: str
    format_version: int
    kind: str
    seq_len: int
    target_len: int
    tokenizer: dict[str, Any]  # path, sha256, vocab_size, eos/pad/mask token ids (+ base_sha256 ... if pretrained)
    splits: dict[str, Split]  # "train", "val"
    counts: dict[str, Any]
    skipped: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    config: dict[str, Any]
    stats: dict[str, Any]  # token_frequencies, doc_length_tokens: the drift monitor's reference
    timings_s: dict[str, float]
    created_at: str
    resumed_phases: list[str]
    dropped_by_file: dict[str, dict[str, int]]  # input URI -> drop reason -> records (files with drops only)
    filter_examples: dict[str, list[dict[str, Any]]]  # per drop reason: the first dropped (source, line, text)
    # With data.filters.decontamination on: mode, ngram, the tasks (name, source, sha256 of their texts, n-grams),
    # `counts` (`decontamination.<task>` -> documents, dropped or reported) and `documents` (the first ones in file
    # order: task, source, line, ngrams, span). Absent when it is off.
    decontamination: dict[str, Any]
    # With data.mixture: per source its weight, files, available and pool (caps) documents and tokens, planned
    # tokens, repeats, what train and val hold and its realised share of train tokens; the seed, the planned train
    # tokens and the documents no source kept (`unassigned`). Absent without a mixture (llm_platform/data/mixture.py).
    mixture: dict[str, Any]


def _empty_split() -> Split:
    return {"files": [], "num_records": 0, "num_tokens": 0, "documents": 0, "tokens_in": 0, "remainder_tokens": 0,
            "skipped_prompt_too_long": 0, "chat": {}}


def build(cfg, tok, fp: str, inputs: list[dict], missing: list[dict], units: list[FileResult], dups: Duplicates,
          tok_record: dict, shards: list[ShardResult], timings: dict[str, float]) -> Manifest:
    """The manifest from the stage's per-unit counts (`prepare.prepare_unit`), the duplicates, the tokenizer's
    record and the shards' entries (`shards.pack_shard`)."""
    counts: dict[str, Any] = {"files": len(inputs), "units": len(units),
                              "records_in": sum(u.records for u in units),
                              "dropped": sum_counters([u.dropped for u in units]),
                              "pii_replacements": sum(u.pii_replacements for u in units)}
    # The sample of skipped records is the first ones in file order (units come in file order, each with its first
    # ones in order), whatever order the tasks finished in, so the same inputs always give the same manifest.
    limit = max(0, cfg.max_records_reported - len(missing))
    dropped = [r for u in units for r in u.skipped][:limit]
    skipped = list(missing) + dropped
    for m in missing:
        reason = m["reason"].split(":")[0]
        counts["dropped"][reason] = counts["dropped"].get(reason, 0) + 1
    counts["exact_duplicates"] = int(dups.exact.sum())
    counts["near_duplicates"] = int((~dups.exact).sum())
    counts["languages"] = language_counts(units)
    splits: dict[str, Split] = {}
    token_counts = np.zeros(tok_record["vocab_size"], dtype=np.int64)
    hist = np.zeros(len(pack.LENGTH_EDGES) - 1, dtype=np.int64)
    groups: dict[str, list] = {}
    for s in sorted(shards, key=lambda r: r.shard):
        split = splits.setdefault(s.split, _empty_split())
        if s.records:
            split["files"].append(s.file)
            groups.setdefault(s.split, []).append(s.row_groups)  # None: a marker from an older run
        split["num_records"] += int(s.records)
        split["num_tokens"] += int(s.tokens_out)
        split["documents"] += int(s.documents)
        split["tokens_in"] += int(s.tokens_in)
        split["remainder_tokens"] += int(s.remainder)
        split["skipped_prompt_too_long"] += int(s.skipped_prompt_too_long)
        for key, n in s.chat.items():  # chat: truncated and skipped conversations by reason
            split["chat"][key] = split["chat"].get(key, 0) + int(n)
        if s.split == "train":
            token_counts += np.asarray(s.token_counts, dtype=np.int64)
            hist += np.asarray(s.length_hist, dtype=np.int64)
    for name in ("train", "val"):
        splits.setdefault(name, _empty_split())
        if all(g is not None for g in groups.get(name, [])):
            splits[name]["row_groups"] = groups.get(name, [])
    if pack.packs(str(cfg.kind), cfg.pack_supervised):
        _add_packing(splits, shards, cfg.seq_len)
    counts["documents_kept"] = sum(s["documents"] for s in splits.values())
    total = max(1, int(token_counts.sum()))
    return {
        "name": cfg.name, "fingerprint": fp, "format_version": FORMAT_VERSION, "kind": cfg.kind,
        "seq_len": cfg.seq_len, "target_len": cfg.target_len, "tokenizer": tok_record, "splits": splits,
        "counts": counts, "skipped": skipped[: cfg.max_records_reported],
        "inputs": [{k: m[k] for k in ("uri", "size", "marker", "format")} for m in inputs],
        "config": {"data": asdict(cfg), "tokenizer": asdict(tok)},
        "stats": {"token_frequencies": (token_counts / total).tolist(),
                  "doc_length_tokens": {"edges": pack.LENGTH_EDGES, "counts": hist.tolist()}},
        "dropped_by_file": dropped_by_file(units),
        "filter_examples": first_examples(units, cfg.filter_examples_reported),
        "timings_s": timings, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _add_packing(splits: dict[str, Split], shards: list[ShardResult], seq_len: int) -> None:
    """Each split's `packing` entry, summed over its shards' counts (pack.pack_examples)."""
    for name, split in splits.items():
        got = [s.packing for s in shards if s.split == name and s.packing is not None]
        split["packing"] = pack.packing_summary(sum(int(p["examples"]) for p in got), sum(int(p["rows"]) for p in got),
                                                sum(int(p["tokens"]) for p in got), seq_len)


def dropped_by_file(units: list[FileResult]) -> dict[str, dict[str, int]]:
    """The units' drops per input file and reason (files without drops left out). Outside `counts`, which stays the
    same wherever the same files are read from."""
    out: dict[str, dict[str, int]] = {}
    for u in units:
        for source, reasons in u.dropped_by_file.items():
            out[source] = sum_counters([out.get(source, {}), reasons])
    return dict(sorted(out.items()))


def language_counts(units: list[FileResult]) -> dict[str, dict[str, int]]:
    """Documents per detected language: `detected` (all that reached language ID) and `kept` (passed every rule,
    before dedup)."""
    langs = [u.languages for u in units]
    return {k: sum_counters([lang.get(k) or {} for lang in langs]) for k in ("detected", "kept")}


def first_examples(units: list[FileResult], limit: int) -> dict[str, list[dict[str, Any]]]:
    """Per drop reason, the first `limit` dropped documents in file order (units come in file order, each with its
    first ones in order), whatever order the tasks finished in."""
    out: dict[str, list[dict[str, Any]]] = {}
    for u in units:
        for reason, examples in u.examples.items():
            out.setdefault(reason, []).extend(examples)
    return {reason: examples[:limit] for reason, examples in sorted(out.items()) if limit > 0}


def decontamination(cfg: Any, tasks: list[Any], contaminated: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `decontamination` entry from `data.filters.decontamination`, the eval tasks it read
    (`decontam.TaskText`) and every contaminated document (`decontam.count`, in file order)."""
    from llm_platform.data.filters import decontam

    counts: dict[str, int] = {}
    for c in contaminated:
        reason = f"decontamination.{c['task']}"
        counts[reason] = counts.get(reason, 0) + 1
    return {"mode": str(cfg.mode), "ngram": int(cfg.ngram),
            "tasks": [{"name": name, "source": source, "sha256": sha, "texts": len(t.texts)}
                      for (name, source, sha), t in zip(decontam.digest(tasks), tasks)],
            "counts": dict(sorted(counts.items())), "documents_total": len(contaminated),
            "documents": [{k: c[k] for k in ("task", "source", "line", "ngrams", "span")}
                          for c in contaminated[:max(0, cfg.documents_reported)]]}


def decontamination_report(manifest: Any) -> str:
    """The console lines for a manifest's `decontamination` entry ("" without one): what each task matched, and
    the first contaminated documents with their span."""
    d = manifest.get("decontamination")
    if not d:
        return ""
    verb = "dropped" if d["mode"] == "drop" else "kept (report mode)"
    found = ", ".join(f"{k}: {n:,}" for k, n in d["counts"].items()) or "none"
    lines = [f"decontamination ({d['ngram']}-grams, {len(d['tasks'])} tasks): {d['documents_total']:,} documents "
             f"{verb}; {found}"]
    lines += [f"  {c['source']}:{c['line']} [{c['task']}]: {c['span'][:100]}" for c in d["documents"][:5]]
    return "\n".join(lines) + "\n"
