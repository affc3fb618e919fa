"""The evaluation report: matplotlib plots, report.md and report.html, and metrics.json (written last).

Plots (each only when its data exists; otherwise the report lists it as skipped with the reason):
    loss_curves.png    train/loss and val/loss against step, from the run's metrics.jsonl
    sweep_trials.png   one curve per trial from the sweep's trials.jsonl
    metrics.png        generation metrics (percent) and robustness deltas
    bias.png           mean log-likelihood gap per group with its CI (drawn by `bias.plot`)
    saliency.png       a token-attribution example (drawn by `explain.saliency_png`)
Tables: every metric, the gate (with `eval.compare_to`), and lm-evaluation-harness scores with their standard errors
and sample counts (`sections["harness"]`).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import Any

RECORD = "metrics.json"


@dataclass
class ReportData:
    """Everything the report shows."""

    title: str
    model: dict[str, str]
    metrics: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)  # bias, robustness, examples, human, harness
    images: dict[str, str] = field(default_factory=dict)  # caption -> file name in the report folder
    gate_table: str | None = None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(uri: str) -> list[dict]:
    """JSON lines of a run or sweep record; unparsable lines are skipped (a run may be writing its last line)."""
    from llm_platform import storage

    rows = []
    for line in storage.read_text(uri).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_loss_curves(rows: list[dict], path: str) -> bool:
    """train/loss and val/loss against step; False when neither is there."""
    series = {k: [(r["step"], r[k]) for r in rows if k in r and "step" in r] for k in ("train/loss", "val/loss")}
    if not any(series.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in series.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_trials(rows: list[dict], path: str) -> str | None:
    """One line per trial of the sweep's main metric (val/loss when present); returns the metric or None."""
    skip = {"trial_id", "training_iteration", "step"}
    keys = [k for r in rows for k, v in r.items() if k not in skip and isinstance(v, (int, float))]
    if not keys:
        return None
    metric = "val/loss" if "val/loss" in keys else keys[0]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    trials: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if metric in r:
            trials.setdefault(str(r.get("trial_id", "?")), []).append(
                (r.get("step", r.get("training_iteration", 0)), r[metric]))
    for trial, points in sorted(trials.items()):
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="o", markersize=3, label=trial)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"Sweep trials: {metric}")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return metric


def plot_metric_bars(metrics: dict[str, float], path: str) -> bool:
    """Generation metrics and robustness deltas as bars; False when there are none."""
    gen = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("gen/")}
    robust = {k[len("robust/"):]: v for k, v in metrics.items() if k.startswith("robust/") and "rougeL" in k}
    if not gen and not robust:
        return False
    plt = _plt()
    panels = [p for p in ((gen, "Generation metrics (%)"), (robust, "ROUGE-L change under perturbation")) if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (values, title) in zip(axes[0], panels):
        ax.bar(list(values), list(values.values()), color="#4f81bd")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _metrics_rows(metrics: dict[str, float]) -> list[tuple[str, str]]:
    return [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in sorted(metrics.items())]


HARNESS_COLUMNS = ["task", "metric", "filter", "value", "stderr", "samples", "better"]


def _harness_table(section: dict) -> tuple[str, list[list[str]]]:
    """The lm-evaluation-harness section as a caption and rows of HARNESS_COLUMNS."""
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [[r["task"], r["metric"], r["filter"], fmt(r["value"]), fmt(r["stderr"]), fmt(r["samples"]),
             "higher" if r["higher_is_better"] else "lower"] for r in section.get("rows") or []]
    caption = f"lm-evaluation-harness {section.get('lm_eval_version', '')}, {section.get('mode', '')}"
    return caption, rows


def to_markdown(data: ReportData) -> str:
    lines = [f"# {data.title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in data.model.items()]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _metrics_rows(data.metrics)]
    if data.gate_table:
        lines += ["", "## Gate", "", "```", data.gate_table, "```"]
    if data.sections.get("harness"):
        caption, rows = _harness_table(data.sections["harness"])
        lines += ["", "## lm-evaluation-harness", "", caption, "", "| " + " | ".join(HARNESS_COLUMNS) + " |",
                  "|" + "---|" * len(HARNESS_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if data.skipped:
        lines += ["", "## Skipped", ""] + [f"- **{k}**: {v}" for k, v in data.skipped.items()]
    for caption, name in data.images.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({name})"]
    examples = data.sections.get("examples") or []
    if examples:
        lines += ["", "## Generation examples", "", "| prompt | output | references |", "|---|---|---|"]
        esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += [f"| {esc(e['prompt'])} | {esc(e['output'])} | {esc(' / '.join(e['references']))} |"
                  for e in examples]
    return "\n".join(lines) + "\n"


def to_html(data: ReportData) -> str:
    esc = html.escape
    parts = [f"<h1>{esc(data.title)}</h1>", "<table>"]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in data.model.items()]
    parts += ["</table>", "<h2>Metrics</h2>", "<table><tr><th>metric</th><th>value</th></tr>"]
    parts += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _metrics_rows(data.metrics)]
    parts.append("</table>")
    if data.gate_table:
        parts += ["<h2>Gate</h2>", f"<pre>{esc(data.gate_table)}</pre>"]
    if data.sections.get("harness"):
        caption, rows = _harness_table(data.sections["harness"])
        parts += ["<h2>lm-evaluation-harness</h2>", f"<p>{esc(caption)}</p>",
                  "<table><tr>" + "".join(f"<th>{c}</th>" for c in HARNESS_COLUMNS) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    if data.skipped:
        parts += ["<h2>Skipped</h2>", "<ul>"]
        parts += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in data.skipped.items()]
        parts.append("</ul>")
    for caption, name in data.images.items():
        parts += [f"<h2>{esc(caption)}</h2>", f'<img src="{esc(name)}" alt="{esc(caption)}">']
    examples = data.sections.get("examples") or []
    if examples:
        parts += ["<h2>Generation examples</h2>", "<table><tr><th>prompt</th><th>output</th><th>references</th></tr>"]
        parts += [f"<tr><td>{esc(e['prompt'])}</td><td>{esc(e['output'])}</td>"
                  f"<td>{esc(' / '.join(e['references']))}</td></tr>" for e in examples]
        parts.append("</table>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(data.title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(data: ReportData, folder: str, record: dict) -> None:
    """Write report.md, report.html and metrics.json into a local folder (the record last)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as f:
        f.write(to_markdown(data))
    with open(os.path.join(folder, "report.html"), "w", encoding="utf-8") as f:
        f.write(to_html(data))
    with open(os.path.join(folder, "details.json"), "w", encoding="utf-8") as f:
        json.dump(data.sections, f, indent=2, default=str)
    with open(os.path.join(folder, RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)


def publish(folder: str, uri: str) -> None:
    """Copy the report folder to storage with metrics.json last, so a folder with it is complete."""
    from llm_platform import storage

    files = sorted(os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/")
                   for d, _, names in os.walk(folder) for n in names)
    for rel in [f for f in files if f != RECORD] + [RECORD]:
        with open(os.path.join(folder, rel), "rb") as f:
            storage.write_bytes(storage.join(uri, rel), f.read())
