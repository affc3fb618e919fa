"""What a sweep leaves behind: a table (console and `summary.csv`), `trials.jsonl`, `curves.png`, and the winner.

Plain Python over `TrialRecord`s (the driver turns Tune's ResultGrid into them), so unit tests feed fake trials.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from llm_platform import storage

METRIC_KEY = re.compile(r"^(train|val|perf)/")
FINISHED, STOPPED, ERROR = "finished", "stopped", "error"


@dataclass
class TrialRecord:
    """One trial of a sweep."""

    trial_id: str
    params: dict[str, Any]
    """Dotted config key -> the trial's value."""
    reports: list[dict[str, Any]] = field(default_factory=list)
    """Every report in order: `training_iteration`, `step` and the metrics."""
    status: str = FINISHED
    """finished (trained to the end and exported), stopped (by the scheduler) or error."""
    error: str | None = None
    """The error's first line, for an errored trial."""
    run_uri: str | None = None
    """The trial's training run folder."""
    export_uri: str | None = None
    """The trial's HF export (finished trials only)."""

    def values(self, metric: str) -> list[float]:
        return [float(r[metric]) for r in self.reports if _finite(r.get(metric))]

    def best(self, metric: str, mode: str = "min") -> float | None:
        vals = self.values(metric)
        return (min(vals) if mode == "min" else max(vals)) if vals else None

    def last(self, metric: str) -> float | None:
        vals = self.values(metric)
        return vals[-1] if vals else None

    @property
    def iterations(self) -> int:
        return max((int(r.get("training_iteration", 0)) for r in self.reports), default=0)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def select_winner(trials: list[TrialRecord], metric: str = "val/loss", mode: str = "min") -> TrialRecord | None:
    """The finished trial with the best final `metric` (the exported weights are the final ones).

    Stopped and errored trials never win: they have no export. Ties go to the earlier trial.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be min or max, got {mode!r}")
    candidates = [t for t in trials if t.status == FINISHED and t.last(metric) is not None]
    if not candidates:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(candidates, key=lambda t: sign * t.last(metric))  # type: ignore[operator]


def table_rows(trials: list[TrialRecord], metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial: trial, each param, best and final metric, iterations, last step, status."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.trial_id}
        row.update(t.params)
        row[f"best {metric}"] = t.best(metric, mode)
        row[f"final {metric}"] = t.last(metric)
        row["iterations"] = t.iterations
        row["steps"] = max((int(r.get("step", 0)) for r in t.reports), default=0)
        row["status"] = t.status if not t.error else f"{t.status}: {t.error}"
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table."""
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def trials_jsonl(trials: list[TrialRecord]) -> str:
    """One JSON object per report: trial_id, training_iteration, step, metrics, params (what eval reads)."""
    lines = []
    for t in trials:
        for r in t.reports:
            metrics = {k: v for k, v in r.items() if METRIC_KEY.match(k) and _finite(v)}
            lines.append(json.dumps({"trial_id": t.trial_id, "training_iteration": int(r.get("training_iteration", 0)),
                                     "step": int(r.get("step", 0)), "metrics": metrics, "params": t.params,
                                     "status": t.status}, default=str))
    return "\n".join(lines) + ("\n" if lines else "")


def curves_png(trials: list[TrialRecord], metric: str, winner: TrialRecord | None) -> bytes:
    """The trials' `metric` against training step, one line per trial (the winner drawn thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        points = [(int(r.get("step", 0)), float(r[metric])) for r in t.reports if _finite(r.get(metric))]
        if not points:
            continue
        steps, values = zip(*points)
        best = winner is not None and t.trial_id == winner.trial_id
        ax.plot(steps, values, marker="o", markersize=3, linewidth=2.5 if best else 1.0,
                linestyle="-" if t.status == FINISHED else "--",
                label=f"{t.trial_id} ({t.status}{', winner' if best else ''})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early or errored)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_summary(sweep_uri: str, trials: list[TrialRecord], metric: str, mode: str,
                  winner: TrialRecord | None) -> str:
    """Write summary.csv, trials.jsonl and curves.png under the sweep folder; returns the console table."""
    rows = table_rows(trials, metric, mode)
    storage.write_text(storage.join(sweep_uri, "summary.csv"), to_csv(rows))
    storage.write_text(storage.join(sweep_uri, "trials.jsonl"), trials_jsonl(trials))
    storage.write_bytes(storage.join(sweep_uri, "curves.png"), curves_png(trials, metric, winner))
    return format_table(rows)
