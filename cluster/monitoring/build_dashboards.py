"""Writes the Grafana dashboards of llm-platform (serving, training, data) to cluster/monitoring/dashboards/.

    python cluster/monitoring/build_dashboards.py          # rewrite the JSON files
    python cluster/monitoring/build_dashboards.py --check  # exit 1 if a file differs from what this script builds

The dashboards are built with Grafana's own SDK (`grafana-foundation-sdk`, pinned in pyproject.toml's `test` extra)
and committed as JSON, so Grafana, terraform/monitoring.tf and a reviewer read the same files;
tests/unit/test_monitoring.py rebuilds them and compares. Edit the panel lists below, never the JSON.

Series names are what Prometheus scrapes from Ray's metrics agent: `ray_` + the metric name, counters with `_total`,
histograms with `_bucket` (README.md). The serving panels use metrics that exist (llm_platform/serve/monitor.py and
Ray Serve's own); the training and data panels use the names planned for them (`ray_llmp_train_*`,
`ray_llmp_data_*`), which nothing exports yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, SortOrder, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
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
    ],
}

# Planned metrics (README.md): nothing exports them yet.
TRAIN = {
    "Throughput": [
        Panel("Tokens per second", "short", (("sum by (run) (ray_llmp_train_tokens_per_s)", "{{run}}"),)),
        Panel("Model FLOPs utilisation", "percentunit", (("avg by (run) (ray_llmp_train_mfu)", "{{run}}"),)),
        Panel("Step time", "s", (("max by (run) (ray_llmp_train_step_time_s)", "{{run}}"),)),
    ],
    "Progress and cost": [
        Panel("Training loss", "short", (("avg by (run) (ray_llmp_train_loss)", "{{run}}"),)),
        Panel("Cost against budget", "currencyUSD",
              (("max by (run) (ray_llmp_train_cost_usd)", "spent {{run}}"),
               ("max by (run) (ray_llmp_train_budget_usd)", "budget {{run}}")),
              "Alert TrainBudgetNearlySpent at 90% (depends on the budget feature)."),
    ],
}

DATA = {
    "Pipeline": [
        Panel("Documents per second by phase", "short",
              (("sum by (phase) (rate(ray_llmp_data_documents_total[$__rate_interval]))", "{{phase}}"),)),
        Panel("Bytes per second by phase", "Bps",
              (("sum by (phase) (rate(ray_llmp_data_bytes_total[$__rate_interval]))", "{{phase}}"),)),
        Panel("Documents by phase (total)", "short",
              (("sum by (phase) (ray_llmp_data_documents_total)", "{{phase}}"),),
              "How many documents each phase (read, clean, dedup, tokenize, pack) kept."),
    ],
}


def build(uid: str, title: str, rows: dict[str, list[Panel]], tags: list[str]) -> dict:
    """One dashboard as the dict Grafana imports: a Prometheus datasource variable, then a row per group."""
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
            built = (timeseries.Panel().id(panel_id).title(panel.title).unit(panel.unit).datasource(DATASOURCE)
                     .grid_pos(GridPos(h=PANEL_H, w=PANEL_W, x=(i % 2) * PANEL_W, y=y + (i // 2) * PANEL_H))
                     .legend(common.VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                             .placement(LegendPlacement.BOTTOM))
                     .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
            if panel.description:
                built = built.description(panel.description)
            for ref, (expr, legend) in zip("ABCDEFGH", panel.queries):
                built = built.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
                                          .datasource(DATASOURCE))
            board = board.with_panel(built)
        y += ((len(panels) + 1) // 2) * PANEL_H
    return json.loads(JSONEncoder(sort_keys=True).encode(board.build()))


def dashboards() -> dict[str, dict]:
    """File name -> dashboard JSON (as dicts) of every dashboard this script writes."""
    return {
        "llm-platform-serve.json": build("llmp-serve", "llm-platform / serving", SERVE, ["serve"]),
        "llm-platform-train.json": build("llmp-train", "llm-platform / training (planned metrics)", TRAIN, ["train"]),
        "llm-platform-data.json": build("llmp-data", "llm-platform / data (planned metrics)", DATA, ["data"]),
    }


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
