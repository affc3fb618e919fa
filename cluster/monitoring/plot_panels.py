"""Draws the panels of llm-platform's Grafana dashboards as PNGs, from the series a Prometheus holds.

    python cluster/monitoring/plot_panels.py --url http://127.0.0.1:9090 --start -30m --out docs/img
    LLMP_DASHBOARD_PICTURES=docs/img pytest tests/integration/test_prometheus.py   # from that test's real run

The panels and their PromQL are build_dashboards.py's (`BOARDS`), not a copy: each query runs as a range query over
[--start, --end] (Grafana's `$__rate_interval` becomes --rate-interval) and each panel becomes one subplot, its
series labelled by the panel's legend format. A dashboard none of whose queries returns a series is skipped with a
line saying so. Pictures only: Grafana is what operators look at (README.md in this folder).
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_dashboards import BOARDS, Board, Panel  # noqa: E402 - a script beside its sibling, not a package

PICTURES = {"llmp-serve": "dashboard-serving.png", "llmp-train": "dashboard-training.png",
            "llmp-data": "dashboard-data.png"}
"""The file each dashboard (by uid) is drawn to."""
COLUMNS = 3
# Grafana's units as an axis label and the factor a value is shown with.
UNITS = {"s": ("seconds", 1.0), "percentunit": ("%", 100.0), "reqps": ("requests/s", 1.0),
         "currencyUSD": ("$", 1.0), "Bps": ("bytes/s", 1.0), "bytes": ("bytes", 1.0), "short": ("", 1.0)}


def parse_time(text: str, now: float) -> float:
    """Unix seconds from `text`: a number, or a time relative to now (`-30m`, `-2h`, `-90s`)."""
    relative = re.fullmatch(r"-(\d+(?:\.\d+)?)([smh])", text)
    if relative:
        return now - float(relative.group(1)) * {"s": 1, "m": 60, "h": 3600}[relative.group(2)]
    return float(text)


def query_range(url: str, expr: str, start: float, end: float, step_s: float) -> list[dict]:
    """The matrix of `expr` over [start, end]: [{"metric": {labels}, "values": [[t, "v"], ...]}, ...]."""
    reply = httpx.get(f"{url.rstrip('/')}/api/v1/query_range",
                      params={"query": expr, "start": start, "end": end, "step": step_s}, timeout=30)
    body = reply.json()
    if reply.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"{expr}: HTTP {reply.status_code} {body.get('error', body)}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legend format (`p95 {{application}}`) filled from a series' labels."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or str(labels)


def panel_series(url: str, panel: Panel, start: float, end: float, step_s: float, rate_interval: str
                 ) -> list[tuple[str, list[float], list[float]]]:
    """(legend, times, values) of every series the panel's queries return."""
    out = []
    for expr, fmt in panel.queries:
        for series in query_range(url, expr.replace("$__rate_interval", rate_interval), start, end, step_s):
            times = [float(t) for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            out.append((legend(fmt, series["metric"]), times, values))
    return out


def draw(board: Board, series: list[list[tuple[str, list[float], list[float]]]], start: float, end: float,
         out: Path) -> None:
    """One PNG: a subplot per panel, in the dashboard's order, titled as in Grafana; time runs from `start`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Time on the x axis as seconds (minutes, hours) since `start`: a short run's clock times crowd the axis.
    span = end - start
    unit, per = ("hours", 3600) if span >= 3 * 3600 else ("minutes", 60) if span >= 3 * 60 else ("seconds", 1)
    since = f"{unit} since {datetime.datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S}"

    panels = [p for row in board.rows.values() for p in row]
    rows = (len(panels) + COLUMNS - 1) // COLUMNS
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(5 * COLUMNS, 3.1 * rows), squeeze=False)
    for ax, panel, lines in zip(axes.flat, panels, series):
        label, factor = UNITS.get(panel.unit, (panel.unit, 1.0))
        for name, times, values in lines:
            ax.plot([(t - start) / per for t in times], [v * factor for v in values], label=name, linewidth=1.4)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, (end - start) / per)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{board.title} (x: {since})", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # the top 3% for the title
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the Prometheus to query (http://host:9090)")
    parser.add_argument("--start", default="-1h", help="unix seconds, or relative to now: -30m, -2h")
    parser.add_argument("--end", default="-0s", help="unix seconds, or relative to now (default: now)")
    parser.add_argument("--out", default="docs/img", help="folder the PNGs are written to")
    parser.add_argument("--rate-interval", default="10s",
                        help="what Grafana's $__rate_interval becomes (at least 4 scrape intervals)")
    parser.add_argument("--boards", default=",".join(PICTURES), help="dashboard uids to draw, comma-separated")
    args = parser.parse_args(argv)
    now = time.time()
    start, end = parse_time(args.start, now), parse_time(args.end, now)
    if end <= start:
        parser.error(f"--start {args.start} is not before --end {args.end}")
    step_s = max(1.0, (end - start) / 300)  # about 300 points a line
    wanted = set(args.boards.split(","))
    for board in BOARDS:
        if board.uid not in wanted:
            continue
        panels = [p for row in board.rows.values() for p in row]
        series = [panel_series(args.url, p, start, end, step_s, args.rate_interval) for p in panels]
        if not any(series):
            print(f"{board.uid}: no series in that range; not drawn")
            continue
        out = Path(args.out) / PICTURES[board.uid]
        draw(board, series, start, end, out)
        print(f"{board.uid}: {sum(map(bool, series))} of {len(panels)} panels with data -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
