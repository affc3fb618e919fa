"""Writes the Grafana dashboards of llm-platform (serving, training, data) to cluster/monitoring/dashboards/.

    python cluster/monitoring/build_dashboards.py          # rewrite the JSON files
    python cluster/monitoring/build_dashboards.py --check  # exit 1 if a file differs from what this script builds

The dashboards are built with Grafana's own SDK (`grafana-foundation-sdk`, pinned in pyproject.toml's `test` extra)
and committed as JSON, so Grafana, terraform/monitoring.tf and a reviewer read the same files;
tests/unit/test_monitoring.py rebuilds them and compares. Edit the panel lists below, never the JSON.

Series names are what Prometheus scrapes from Ray's metrics agent: `ray_` + the metric name, counters with `_total`,
histograms with `_bucket` (README.md). Serving: llm_platform/serve/monitor.py and Ray Serve's own metrics; training:
llm_platform/train/metrics.py (rank 0's gauges); data: llm_platform/data/metrics.py (counters added when a data stage
finishes). plot_panels.py draws the same panels as PNGs from a Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
PANEL_W, PANEL_H = 12, 8  # two panels a row on Grafana's 24-column grid


@dataclass(frozen=True)
class Panel:
    """One time-series panel: a title, the unit Grafana formats values in, and (PromQL, legend) pairs."""

    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]
    description: str = ""


def _p95(metric: str) -> str:
    return f"histogram_quantile(0.95, sum by (application, le) (rate({metric}_bucket[$__rate_interval])))"


def _p50(metric: str) -> str:
    return f"histogram_quantile(0.5, sum by (application, le) (rate({metric}_bucket[$__rate_interval])))"


SERVE = {
    "Traffic": [
        Panel("Requests by status", "reqps",
              (('sum by (status) (rate(ray_llmp_serve_requests_total[$__rate_interval]))', "{{status}}"),)),
        Panel("5xx share", "percentunit",
              (('sum by (application) (rate(ray_llmp_serve_requests_total{status=~"5.."}[$__rate_interval]))'
                ' / sum by (application) (rate(ray_llmp_serve_requests_total[$__rate_interval]))', "{{application}}"),),
              "Alert ServeHighErrorRate above 5%."),
        Panel("Generation latency", "s",
              ((_p50("ray_llmp_serve_latency_s"), "p50 {{application}}"),
               (_p95("ray_llmp_serve_latency_s"), "p95 {{application}}")),
              "Alert ServeHighLatencyP95 above 30 s."),
        Panel("Time to first token", "s",
              ((_p50("ray_llmp_serve_ttft_s"), "p50 {{application}}"),
               (_p95("ray_llmp_serve_ttft_s"), "p95 {{application}}")),
              "Alert ServeHighTimeToFirstTokenP95 above 5 s."),
    ],
    "Engine": [
        Panel("Generated tokens per second", "short",
              (("sum by (application) (rate(ray_llmp_serve_generated_tokens_total[$__rate_interval]))",
                "{{application}}"),
               ("avg by (replica) (ray_llmp_serve_tokens_per_s)", "last request {{replica}}"))),
        Panel("Batch and queue per replica", "short",
              (("ray_llmp_serve_running_sequences", "running {{replica}}"),
               ("ray_llmp_serve_queue_depth", "waiting {{replica}}")),
              "Alert ServeQueueSaturated at 24 waiting for 10 minutes."),
        Panel("Inter-token latency", "s",
              ((_p50("ray_llmp_serve_inter_token_latency_s"), "p50 {{application}}"),
               (_p95("ray_llmp_serve_inter_token_latency_s"), "p95 {{application}}")),
              "Seconds between consecutive tokens of a sequence in the engine; a stream sends them in chunks of "
              "serve.engine.stream_interval_tokens."),
        Panel("KV-cache use per replica", "percentunit",
              (("max by (replica) (ray_llmp_serve_kv_cache_used_fraction)", "{{replica}}"),),
              "Share of serve.engine.max_batch_tokens the running batch's cache holds; near 1, requests wait for "
              "room."),
    ],
    "Drift": [
        Panel("Prompt drift", "short",
              (("max by (application) (ray_llmp_serve_drift_js)", "JS tokens {{application}}"),
               ("max by (application) (ray_llmp_serve_drift_psi)", "PSI lengths {{application}}")),
              "Alerts at serve.drift.js_threshold (0.3) and psi_threshold (0.25)."),
        Panel("Prompt perplexity", "short",
              (("avg by (application) (ray_llmp_serve_prompt_perplexity)", "{{application}}"),)),
    ],
    "Replicas (Ray Serve)": [
        Panel("Healthy replicas", "short",
              (("sum by (application, deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}"),)),
        Panel("Replica starts and failed health checks", "short",
              (("sum by (deployment) (ray_serve_deployment_replica_starts_total)", "starts {{deployment}}"),
               ("sum by (deployment) (increase(ray_serve_health_check_failures_total[$__rate_interval]))",
                "failed checks {{deployment}}"))),
        Panel("Cost rate", "currencyUSD",
              (("sum by (application) (ray_llmp_serve_cost_usd_per_hour)", "$/hour {{application}}"),),
              "What the running replicas cost per hour at serve.prices (GPUs x the GPU's price, or vCPUs x the "
              "vCPU price)."),
    ],
}

TRAIN = {
    "Throughput": [
        Panel("Tokens per second", "short", (("sum by (run) (ray_llmp_train_tokens_per_s)", "{{run}}"),)),
        Panel("Model FLOPs utilisation", "percentunit", (("avg by (run) (ray_llmp_train_mfu)", "{{run}}"),)),
        Panel("Step time", "s", (("max by (run) (ray_llmp_train_step_time_s)", "{{run}}"),)),
    ],
    "Progress and cost": [
        Panel("Loss", "short", (("avg by (run) (ray_llmp_train_loss)", "train {{run}}"),
                                ("avg by (run) (ray_llmp_train_val_loss)", "val {{run}}"))),
        Panel("Cost against budget", "currencyUSD",
              (("max by (run) (ray_llmp_train_cost_usd)", "spent {{run}}"),
               ("max by (run) (ray_llmp_train_budget_usd)", "budget {{run}}")),
              "Alert TrainBudgetNearlySpent at 90%; at 100% the run stops at a checkpoint (train.budget)."),
    ],
}

# A data stage adds its counts once, when it finishes: a counter's first sample is its whole value, which `rate()`
# cannot see, so these panels show totals and shares per dataset, not rates.
DATA = {
    "Pipeline": [
        Panel("Documents by phase (total)", "short",
              (("sum by (dataset, phase) (ray_llmp_data_documents_total)", "{{dataset}} {{phase}}"),),
              "Documents each phase (read, clean, dedup, pack) left, summed over the stage's runs."),
        Panel("Share of read documents kept", "percentunit",
              (("sum by (dataset, phase) (ray_llmp_data_documents_total) / ignoring (phase) group_left "
                'sum by (dataset) (ray_llmp_data_documents_total{phase="read"})', "{{dataset}} {{phase}}"),),
              "Cleaning, quality and language filters, then exact and near duplicates."),
        Panel("Bytes read (total)", "bytes",
              (("sum by (dataset) (ray_llmp_data_bytes_total)", "{{dataset}}"),)),
    ],
}


@dataclass(frozen=True)
class Board:
    """One dashboard: the file it is written to, its Grafana uid and title, its rows of panels, its tags."""

    file: str
    uid: str
    title: str
    rows: dict[str, list[Panel]]
    tags: tuple[str, ...]


BOARDS = (
    Board("llm-platform-serve.json", "llmp-serve", "llm-platform / serving", SERVE, ("serve",)),
    Board("llm-platform-train.json", "llmp-train", "llm-platform / training", TRAIN, ("train",)),
    Board("llm-platform-data.json", "llmp-data", "llm-platform / data", DATA, ("data",)),
)
"""Every dashboard this script writes (plot_panels.py draws the same panels from a Prometheus)."""


def build(uid: str, title: str, rows: dict[str, list[Panel]], tags: list[str]) -> dict:
    """One dashboard as the dict Grafana imports: a Prometheus datasource variable, then a row per group."""
    # Imported here: plot_panels.py reads the panels above without Grafana's SDK installed.
    from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import (
        LegendDisplayMode,
        LegendPlacement,
        SortOrder,
        TooltipDisplayMode,
    )
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

    datasource = DataSourceRef(type_val="prometheus", uid="${datasource}")
    board = (dashboard.Dashboard(title).uid(uid).tags(["llm-platform", *tags]).editable()
             .time("now-6h", "now").refresh("1m").timezone("browser")
             .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    y, panel_id = 0, 0  # Grafana wants ids unique within a dashboard (links and `viewPanel=` use them)
    for row_title, panels in rows.items():
        panel_id += 1
        board = board.with_row(dashboard.Row(row_title).id(panel_id).grid_pos(GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        for i, panel in enumerate(panels):
            panel_id += 1
            built = (timeseries.Panel().id(panel_id).title(panel.title).unit(panel.unit).datasource(datasource)
                     .grid_pos(GridPos(h=PANEL_H, w=PANEL_W, x=(i % 2) * PANEL_W, y=y + (i // 2) * PANEL_H))
                     .legend(common.VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                             .placement(LegendPlacement.BOTTOM))
                     .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
            if panel.description:
                built = built.description(panel.description)
            for ref, (expr, legend) in zip("ABCDEFGH", panel.queries):
                built = built.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
                                          .datasource(datasource))
            board = board.with_panel(built)
        y += ((len(panels) + 1) // 2) * PANEL_H
    return json.loads(JSONEncoder(sort_keys=True).encode(board.build()))


def dashboards() -> dict[str, dict]:
    """File name -> dashboard JSON (as dicts) of every dashboard this script writes."""
    return {b.file: build(b.uid, b.title, b.rows, list(b.tags)) for b in BOARDS}


def render(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path = OUT / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale dashboards (rerun {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
