"""The data stage's figures as Prometheus counters through Ray's metrics agent: `ray_llmp_data_documents_total` and
`ray_llmp_data_bytes_total`, labelled by `phase` and `dataset` (cluster/monitoring/'s data dashboard reads them).

Phases: `read` (records read, input bytes), `clean` (documents left after cleaning and the quality and language
filters), `dedup` (left after exact and near duplicates), `pack` (documents in the written shards). The counters
are recorded by a zero-CPU Ray task, in a pooled worker process that outlives a short-lived driver such as
`llm-platform data` (a driver's own metrics may never be exported if it exits first).
"""

from __future__ import annotations

import logging
from typing import Any

from llm_platform.data.results import FileResult

log = logging.getLogger("llm_platform.data")


def phase_figures(inputs: list[dict], units: list[FileResult], duplicates: int, manifest: Any) -> dict[str, dict]:
    """`{phase: {"documents": n, "bytes": n}}` from what the stage counted (bytes only where they are known)."""
    kept = sum(u.kept for u in units)
    return {
        "read": {"documents": sum(u.records for u in units), "bytes": sum(int(m["size"]) for m in inputs)},
        "clean": {"documents": kept},
        "dedup": {"documents": kept - duplicates},
        "pack": {"documents": int(manifest["counts"]["documents_kept"])},
    }


def record(figures: dict[str, dict], dataset: str) -> None:
    """Add the figures to the counters (in the calling process; `export` calls it in a Ray worker)."""
    from ray.util import metrics

    documents = metrics.Counter("llmp_data_documents", "Documents through each data-stage phase.",
                                tag_keys=("phase", "dataset"))
    size = metrics.Counter("llmp_data_bytes", "Bytes read by the data stage.", tag_keys=("phase", "dataset"))
    for phase, values in figures.items():
        tags = {"phase": phase, "dataset": dataset}
        if values.get("documents"):
            documents.inc(values["documents"], tags=tags)
        if values.get("bytes"):
            size.inc(values["bytes"], tags=tags)


def export(figures: dict[str, dict], dataset: str) -> None:
    """Record the figures in a Ray worker; a no-op without a running Ray (the in-process executor)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        ray.get(ray.remote(num_cpus=0)(record).remote(figures, dataset), timeout=60)
    except Exception as e:  # noqa: BLE001 - metrics must never fail a finished stage
        log.warning("the data stage's metrics were not recorded: %s", e)
