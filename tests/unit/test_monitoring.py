"""cluster/monitoring/: the alert rules pass `promtool check rules` and their own `promtool test rules` cases, the
committed dashboards are what build_dashboards.py builds, every series they name is one that Ray's metrics agent
exports (from llm_platform/serve/monitor.py, train/metrics.py, data/metrics.py or Ray Serve's own metrics), every
platform metric is on a dashboard, thresholds agree with the config defaults, and the PodMonitors and the
NetworkPolicy rules for Prometheus hold together. (tests/integration/test_prometheus.py has a real Prometheus scrape
them.)

A renamed metric breaks `test_real_series_are_exported`: the series names are derived from the metric definitions
the way Ray 2.60 exports them (`ray_` prefix; counters `_total`; histograms `_bucket`, `_sum`, `_count`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "cluster" / "monitoring"
# Platform metrics no dashboard panel shows, and why.
OFF_DASHBOARD = {
    "ray_llmp_train_gpu_hours": "the cost panel shows dollars; GPU-hours are in the run's status and lineage",
}
_DEFINITION = re.compile(r"metrics\.(Counter|Gauge|Histogram)\(\s*\"([a-zA-Z_][a-zA-Z0-9_]*)\"")
_SERIES = re.compile(r"\bray_[a-z0-9_]+\b")


def _exposed(kind: str, name: str) -> set[str]:
    """The series names Prometheus scrapes for one Ray metric (ray/_private/telemetry and prometheus_client)."""
    base = "ray_" + name
    if kind == "Counter":
        return {base.removesuffix("_total") + "_total"}
    if kind == "Histogram":
        return {base + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {base}


def _definitions(files) -> dict[str, str]:
    """Exposed series name -> where its metric is defined, for every `metrics.Counter/Gauge/Histogram("name"`."""
    found: dict[str, str] = {}
    for path in files:
        for kind, name in _DEFINITION.findall(path.read_text()):
            for series in _exposed(kind, name):
                found[series] = f"{path.name}: {kind} {name}"
    return found


@cache
def _real_series() -> dict[str, str]:
    # Found, not imported: importing Ray Serve takes seconds and this only reads its sources.
    ray_serve = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "serve"
    ours = sorted((REPO / "llm_platform").rglob("*.py"))
    found = _definitions(sorted(ray_serve.glob("_private/*.py")) + ours)
    # Training's gauges are named in a table (one `metrics.Gauge(name, ...)` call makes them all).
    from llm_platform.train.metrics import TrainGauges

    for name, _ in TrainGauges.SERIES.values():
        found |= {series: f"train/metrics.py: Gauge {name}" for series in _exposed("Gauge", name)}
    return found


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> dict[str, list[str]]:
    exprs: dict[str, list[str]] = {}
    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        exprs[path.name] = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return exprs


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        why = "promtool is not installed: `make setup-monitoring` installs Debian's prometheus package"
        if _in_ci():
            pytest.fail(why + " (CI must run this check)")
        pytest.skip(why)
    return exe


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def test_alert_rules_pass_promtool_check():
    proc = subprocess.run([_promtool(), "check", "rules", str(MONITORING / "alerts.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_pass_their_promtool_tests():
    proc = subprocess.run([_promtool(), "test", "rules", "alerts_test.yaml"], cwd=MONITORING,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_promtool_case_that_fires():
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert {r["alert"] for r in _alert_rules()} == fired


def test_dashboards_are_what_the_generator_builds():
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        why = "grafana-foundation-sdk (the `test` extra, Python >= 3.11) is not installed"
        if _in_ci() and sys.version_info >= (3, 11):
            pytest.fail(why)
        pytest.skip(why)
    spec = importlib.util.spec_from_file_location("build_dashboards", MONITORING / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    built = module.dashboards()
    uids = [board["uid"] for board in built.values()]
    assert len(set(uids)) == len(uids)
    assert sorted(built) == sorted(p.name for p in (MONITORING / "dashboards").glob("*.json"))
    for name, board in built.items():
        committed = (MONITORING / "dashboards" / name).read_text()
        assert committed == module.render(board), f"{name} is stale: run python cluster/monitoring/build_dashboards.py"
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: panel ids repeat"


def test_series_naming_is_what_rays_exporter_writes():
    # The exporter of Ray's metrics agent (OpenTelemetry into prometheus_client), run in this process: no Ray
    # cluster. If a Ray upgrade changes how names are exposed, `_exposed` and the rules must change with it.
    import prometheus_client
    from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder

    recorder = OpenTelemetryMetricRecorder()
    tags = {"application": "app", "deployment": "dep", "replica": "r1"}
    recorder.register_counter_metric("llmp_naming_probe_counter", "")
    recorder.register_counter_metric("llmp_naming_probe_failures_total", "")
    recorder.register_gauge_metric("llmp_naming_probe_gauge", "")
    recorder.register_histogram_metric("llmp_naming_probe_hist_s", "", [0.1, 1.0])
    for name in ("llmp_naming_probe_counter", "llmp_naming_probe_failures_total", "llmp_naming_probe_gauge",
                 "llmp_naming_probe_hist_s"):
        recorder.set_metric_value(name, tags, 0.5)
    text = prometheus_client.generate_latest().decode()
    scraped = set(re.findall(r"^(ray_llmp_naming_probe_[a-z_]+)\{", text, re.M))
    assert scraped == (_exposed("Counter", "llmp_naming_probe_counter")
                       | _exposed("Counter", "llmp_naming_probe_failures_total")
                       | _exposed("Gauge", "llmp_naming_probe_gauge")
                       | _exposed("Histogram", "llmp_naming_probe_hist_s")), text


def test_definition_scan_finds_what_it_must():
    # Guards the scan itself: if it found nothing, every name would look unknown (or a loose check would pass).
    real = _real_series()
    assert "ray_llmp_serve_requests_total" in real and "ray_llmp_serve_latency_s_bucket" in real
    assert "ray_llmp_serve_queue_depth" in real and "ray_llmp_serve_requests" not in real
    assert "ray_llmp_serve_inter_token_latency_s_bucket" in real and "ray_llmp_serve_cost_usd_per_hour" in real
    assert "ray_llmp_train_loss" in real and "ray_llmp_train_budget_usd" in real
    assert "ray_llmp_data_documents_total" in real and "ray_llmp_data_bytes_total" in real
    assert "ray_serve_deployment_replica_starts_total" in real
    assert "ray_serve_health_check_failures_total" in real  # already ends in _total: not doubled


def test_real_series_are_exported():
    real = _real_series()
    used = {f"alerts.yaml:{r['alert']}": r["expr"] for r in _alert_rules()}
    used |= {f"{name}#{i}": e for name, exprs in _dashboard_exprs().items() for i, e in enumerate(exprs)}
    unknown = [f"{where}: {series}" for where, expr in used.items() for series in sorted(set(_SERIES.findall(expr)))
               if series not in real]
    assert not unknown, "series no metric exports:\n" + "\n".join(unknown)


def test_every_platform_metric_is_on_a_dashboard():
    shown = {s for exprs in _dashboard_exprs().values() for e in exprs for s in _SERIES.findall(e)}
    ours = {series for series in _real_series() if series.startswith("ray_llmp_")}
    # A histogram is shown through its buckets; its _sum and _count are there for whoever wants means.
    missing = {s for s in ours - shown if not s.endswith(("_sum", "_count"))} - set(OFF_DASHBOARD)
    assert not missing, f"metrics no dashboard shows (add a panel, or to OFF_DASHBOARD with why): {sorted(missing)}"
    assert set(OFF_DASHBOARD) <= ours, "OFF_DASHBOARD names a metric nothing defines"


def test_thresholds_follow_the_config_defaults():
    from llm_platform.config.serve import DeploymentConfig, DriftConfig, EngineConfig

    rules = {r["alert"]: r["expr"] for r in _alert_rules()}

    def threshold(alert: str) -> float:
        return float(re.search(r">=?\s*([0-9.]+)\s*$", rules[alert].strip()).group(1))

    assert threshold("ServePromptTokenDrift") == DriftConfig().js_threshold
    assert threshold("ServePromptLengthDrift") == DriftConfig().psi_threshold
    # A replica holds max_ongoing_requests, runs max_batch_size: the rest is the most that can wait.
    most_waiting = DeploymentConfig().max_ongoing_requests - EngineConfig().max_batch_size
    assert 0 < threshold("ServeQueueSaturated") < most_waiting
    # Histogram quantiles cannot exceed the largest finite bucket bound.
    from llm_platform.serve.monitor import ServeMetrics

    assert threshold("ServeHighLatencyP95") < max(ServeMetrics.LATENCY_BOUNDARIES_S)
    assert threshold("ServeHighTimeToFirstTokenP95") < max(ServeMetrics.LATENCY_BOUNDARIES_S)


def _render(path: Path) -> list[dict]:
    spec = importlib.util.spec_from_file_location("cluster_render", REPO / "cluster" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = render.render(path.read_text(), {"ray_namespace": "ray"}, "0.1.0", source=path.name)
    return [d for d in yaml.safe_load_all(text) if d]


def test_podmonitors_scrape_every_ray_role_on_the_metrics_port():
    monitors = _render(MONITORING / "podmonitor.yaml")
    roles = set()
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
        assert monitor["metadata"]["namespace"] == "monitoring"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ray"]}
        (expression,) = monitor["spec"]["selector"]["matchExpressions"]
        assert expression["key"] == "llm-platform/role" and expression["operator"] == "In"
        roles |= set(expression["values"])
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert roles == {"ray-head", "ray-worker", "serve-head", "serve-worker"}


def test_network_policies_let_prometheus_in_on_the_metrics_port_only():
    docs = [d for d in yaml.safe_load_all((REPO / "cluster" / "network-policies.yaml").read_text()) if d]
    admitted = set()
    for policy in docs:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            monitoring = [p for p in peers if p.get("namespaceSelector", {}).get("matchLabels", {})
                          .get("kubernetes.io/metadata.name") == "monitoring"]
            if not monitoring:
                continue
            assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}], peers
            assert rule["ports"] == [{"protocol": "TCP", "port": 8080}], rule["ports"]
            admitted.add(policy["spec"]["podSelector"]["matchLabels"]["llm-platform/role"])
        for rule in policy["spec"].get("egress", []):
            assert "monitoring" not in json.dumps(rule), "nothing needs to reach the monitoring namespace"
    assert admitted == {"ray-head", "ray-worker", "serve-head", "serve-worker"}


def test_ray_pods_keep_kuberays_metrics_port():
    # The PodMonitors and NetworkPolicy rules name port 8080 (`metrics`), which KubeRay adds to every Ray container
    # and passes to `ray start --metrics-export-port` unless rayStartParams sets another.
    for path in sorted((REPO / "cluster").glob("ray-*.yaml")):
        text = path.read_text()
        assert "metrics-export-port" not in text or "metrics-export-port: \"8080\"" in text, path.name


def test_terraform_loads_the_files_that_exist():
    text = (REPO / "terraform" / "monitoring.tf").read_text()
    names = re.search(r"for name in \[([^\]]*)\]", text).group(1)
    assert sorted(n.strip().strip('"') + ".json" for n in names.split(",")) == \
        sorted(p.name for p in (MONITORING / "dashboards").glob("*.json"))
    assert "alerts.yaml" in text and (MONITORING / "alerts.yaml").exists()
    # The PodMonitors select the release's Prometheus by the release's name.
    assert 'name             = "kube-prometheus-stack"' in text
    assert 'namespace        = "monitoring"' in text
