"""A real Prometheus (Debian's `prometheus` binary) scrapes the session Ray's metrics agent every second, and the
series the dashboards and alerts read are asserted through its HTTP API after real work: an endpoint's traffic
(successes, a 400, a 404, streamed and not) and the data stage plus a short training run.

Counts are checked against what the test itself sent (requests by status, generated tokens, one inter-token gap per
token after a sequence's first); gauges against what the replica reports (drift) or was configured with (the cost
rate from the app's price table). The engine's gauges (queue, batch, KV cache) only have to have been seen.

`LLMP_DASHBOARD_PICTURES=docs/img` draws the dashboards' panels from this run's series
(cluster/monitoring/plot_panels.py) before Prometheus stops.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import math
import os
import time

import httpx
import openai
import pytest
from conftest import free_port
from fixtures.prometheus import Prometheus, start_prometheus
from fixtures.serving import build_tiny_model, sample_texts, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "metrics"
CPUS_PER_REPLICA = 0.5
CPU_USD_PER_HOUR = 0.25  # the app's own price per vCPU: its cost gauge must read 0.5 x 0.25
# Long enough for several of the replica's 1 s metric samples to see a running batch (longer for the pictures).
TRAFFIC_S = 30.0 if os.environ.get("LLMP_DASHBOARD_PICTURES") else 4.0
TRAIN_STEPS = 1500 if os.environ.get("LLMP_DASHBOARD_PICTURES") else 4
SELECTOR = f'{{application="{APP}"}}'


@pytest.fixture(scope="module")
def prometheus(ray_session, tmp_path_factory):
    """Prometheus scraping this node's metrics agent (`metrics_export_port`), for the module's tests."""
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    prom = start_prometheus([f"127.0.0.1:{port}"], tmp_path_factory.mktemp("prometheus"), free_port())
    try:
        prom.wait_for("up", lambda r: any(s["value"][1] == "1" for s in r), 30, "the metrics agent's scrape")
        yield prom
    finally:
        prom.stop()


@functools.cache
def _plot_panels():
    """cluster/monitoring/plot_panels.py (it imports build_dashboards.py beside it: the dashboards' panels)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "cluster" / "monitoring" / "plot_panels.py"
    spec = importlib.util.spec_from_file_location("plot_panels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _panels_without_data(prom: Prometheus, uid: str, started: float) -> set[str]:
    """Titles of the dashboard's panels none of whose queries returned a series since `started`. Evaluated every
    0.2 s: a 4-step run's gauges are in one or two scrapes only (1 s apart), then marked stale."""
    module = _plot_panels()
    (board,) = [b for b in module.BOARDS if b.uid == uid]
    return {panel.title for row in board.rows.values() for panel in row
            if not module.panel_series(prom.url, panel, started - 5, time.time(), 0.2, "10s")}


def _draw(prom: Prometheus, boards: str, started: float) -> None:
    """With LLMP_DASHBOARD_PICTURES set: the dashboards `boards` (uids) drawn from this test's series."""
    folder = os.environ.get("LLMP_DASHBOARD_PICTURES")
    if folder:
        _plot_panels().main(["--url", prom.url, "--start", str(started - 5), "--end", str(time.time() + 1),
                             "--out", folder, "--boards", boards])


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    """One replica of a tiny model behind Serve's proxy, with a drift reference and its own CPU price."""
    from ray import serve

    from llm_platform.serve.app import build_app

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(folder), "model_name": "tiny", "auth": {"api_key_env": "LLMP_TEST_UNSET_API_KEYS"},
            "deployment": {"num_cpus_per_replica": CPUS_PER_REPLICA, "health_check_period_s": 1.0,
                           "graceful_shutdown_timeout_s": 2.0},
            "engine": {"max_batch_tokens": 2048, "stream_interval_tokens": 1},
            "limits": {"max_tokens_cap": 64},
            "drift": {"window_prompts": 30, "min_prompts": 5, "perplexity_every": 1},
            "prices": {"market": "on_demand", "cpu": {"on_demand_usd_per_hour": CPU_USD_PER_HOUR}},
            "drift_reference": sample_texts(200, seed=1)}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"http://127.0.0.1:{port}/{APP}"
    if not wait_healthy(base, 180, poll_s=0.5):
        pytest.fail(f"Serve app not healthy: {serve.status()}")
    yield base
    serve.delete(APP)
    serve.shutdown()


def _traffic(base: str) -> tuple[int, int]:
    """Four clients sending completions for TRAFFIC_S (every third streamed), each with `ignore_eos`, so a request
    generates exactly its `max_tokens`. Returns (requests, generated tokens)."""
    client = openai.OpenAI(api_key="unused", base_url=f"{base}/v1", max_retries=0, timeout=60)
    prompts = sample_texts(64, seed=7)
    deadline = time.monotonic() + TRAFFIC_S

    def worker(w: int) -> list[int]:
        sent = []
        i = w
        while time.monotonic() < deadline:
            max_tokens = 8 + (i * 7) % 40
            kwargs = dict(model="tiny", prompt=prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0.8,
                          seed=i, extra_body={"ignore_eos": True})
            if i % 3 == 0:
                text = "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kwargs)
                               if ch.choices)
            else:
                text = client.completions.create(**kwargs).choices[0].text
            assert isinstance(text, str)
            sent.append(max_tokens)
            i += 4
        return sent

    with cf.ThreadPoolExecutor(4) as pool:
        sent = [n for part in pool.map(worker, range(4)) for n in part]
    return len(sent), sum(sent)


def _by(result: list[dict], label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}


def _scalar(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_serving_series_reach_prometheus(prometheus, endpoint):
    prom = prometheus
    started = time.time()
    requests, tokens = _traffic(endpoint)
    client = openai.OpenAI(api_key="unused", base_url=f"{endpoint}/v1", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError):  # over serve.limits.max_tokens_cap
        client.completions.create(model="tiny", prompt="the cat", max_tokens=1000)
    with pytest.raises(openai.NotFoundError):  # a model this endpoint does not serve
        client.completions.create(model="no-such-model", prompt="the cat", max_tokens=4)

    # Counters: exactly what was sent.
    expected = {"200": requests, "400": 1, "404": 1}
    prom.wait_for(f"sum by (status) (ray_llmp_serve_requests_total{SELECTOR})",
                  lambda r: _by(r, "status") == expected, what=f"requests by status {expected}")
    for name, want in (("ray_llmp_serve_ttft_s_count", requests), ("ray_llmp_serve_latency_s_count", requests),
                       ("ray_llmp_serve_generated_tokens_total", tokens),
                       # every token after a sequence's first follows a gap (n=1: one sequence a request)
                       ("ray_llmp_serve_inter_token_latency_s_count", tokens - requests)):
        prom.wait_for(f"sum({name}{SELECTOR})", lambda r, want=want: _scalar(r) == want, what=f"{name} == {want}")
    # Histograms: plausible seconds; the gaps of a request lie inside its latency.
    sums = {name: _scalar(prom.query(f"sum(ray_llmp_serve_{name}_s_sum{SELECTOR})"))
            for name in ("ttft", "latency", "inter_token_latency")}
    assert all(v is not None and v > 0 for v in sums.values()), sums
    assert sums["inter_token_latency"] < sums["latency"] and sums["ttft"] < sums["latency"], sums
    p95 = _scalar(prom.query(f"histogram_quantile(0.95, sum by (le) "
                             f"(ray_llmp_serve_inter_token_latency_s_bucket{SELECTOR}))"))
    assert p95 is not None and 0 < p95 <= 5, p95

    # Engine gauges, sampled every second while the clients ran: a batch and its cache were seen.
    window = "[10m]"
    seen = {name: _scalar(prom.query(f"max(max_over_time(ray_llmp_serve_{name}{SELECTOR}{window}))"))
            for name in ("running_sequences", "queue_depth", "kv_cache_used_fraction")}
    assert seen["running_sequences"] is not None and seen["running_sequences"] >= 1, seen
    assert seen["queue_depth"] is not None and seen["queue_depth"] >= 0, seen
    assert seen["kv_cache_used_fraction"] is not None and 0 < seen["kv_cache_used_fraction"] <= 1, seen

    # The cost rate: the replica's vCPUs at the app's own price table.
    prom.wait_for(f"ray_llmp_serve_cost_usd_per_hour{SELECTOR}",
                  lambda r: _scalar(r) is not None and math.isclose(_scalar(r), CPUS_PER_REPLICA * CPU_USD_PER_HOUR),
                  what="the cost rate")

    # Drift: the gauges hold what the replica's drift monitor reports for its window.
    drift = httpx.get(f"{endpoint}/v1/monitoring", timeout=10).json()["drift"]
    assert drift["window_prompts"] >= 5 and drift["js_divergence"] is not None
    for gauge, key in (("drift_js", "js_divergence"), ("drift_psi", "psi_prompt_length"),
                       ("prompt_perplexity", "mean_prompt_perplexity")):
        prom.wait_for(f"ray_llmp_serve_{gauge}{SELECTOR}",
                      lambda r, key=key: _scalar(r) is not None and math.isclose(_scalar(r), drift[key], rel_tol=1e-6),
                      what=f"{gauge} == {drift[key]}")

    # Every panel of the serving dashboard shows something, but the share of 5xx answers (there were none).
    assert _panels_without_data(prom, "llmp-serve", started) == {"5xx share"}
    _draw(prom, "llmp-serve", started)


# Training gauge -> the metrics.jsonl key it is set from (rank 0's logged records).
TRAIN_SERIES = {"llmp_train_loss": "train/loss", "llmp_train_tokens_per_s": "perf/tokens_per_s",
                "llmp_train_step_time_s": "perf/step_time_s", "llmp_train_mfu": "perf/mfu",
                "llmp_train_cost_usd": "cost/usd"}


def test_training_and_data_series_reach_prometheus(prometheus, tmp_path):
    """The data stage and a short training run (debug preset, TRAIN_STEPS steps) export their figures: the data counters
    grow by what the manifest counted, and each training gauge's last value is the last one the run logged (a
    worker's gauges vanish with it, so they are read with `last_over_time`)."""
    import json

    from llm_platform.config import compose
    from llm_platform.data import pipeline
    from llm_platform.train.launcher import launch

    prom = prometheus
    started = time.time()
    root = str(tmp_path)
    cfg = compose("train", ["debug=smoke", f"storage.root={root}", f"train.max_steps={TRAIN_STEPS}",
                            "train.log_interval_steps=1", f"train.eval_interval_steps={max(TRAIN_STEPS // 4, 2)}",
                            f"train.checkpoint.interval_steps={TRAIN_STEPS}",
                            "train.budget.max_cost_usd=100", "scaling.num_workers=1",
                            f"data.sample.num_documents={400 if TRAIN_STEPS > 4 else 150}"])
    documents = "sum by (phase) (ray_llmp_data_documents_total)"
    before = _by(prom.query(documents), "phase")  # the session's Ray may have run other data stages
    data = pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    launch(cfg.model, cfg.train, cfg.scaling, data.uri, root, run_name="prom", prices=cfg.plan.prices)

    counts = data.manifest["counts"]
    grown = {"read": counts["records_in"], "pack": counts["documents_kept"]}
    result = prom.wait_for(documents, lambda r: all(_by(r, "phase").get(k, 0) - before.get(k, 0) == v
                                                    for k, v in grown.items()), 30, f"documents grown by {grown}")
    funnel = [_by(result, "phase").get(k, 0) - before.get(k, 0) for k in ("read", "clean", "dedup", "pack")]
    assert funnel == sorted(funnel, reverse=True) and funnel[-1] > 0, funnel
    read_bytes = prom.wait_for('sum(ray_llmp_data_bytes_total{phase="read"})', bool, 30, "bytes read")
    assert _scalar(read_bytes) >= sum(i["size"] for i in data.manifest["inputs"])

    lines = [json.loads(line) for line in open(os.path.join(root, "runs", "prom", "metrics.jsonl"))]
    for name, key in TRAIN_SERIES.items():
        logged = [line[key] for line in lines if isinstance(line.get(key), (int, float)) and math.isfinite(line[key])]
        expr = f'last_over_time(ray_{name}{{run="prom"}}[10m])'
        if not logged:  # MFU on CPU: no peak FLOPs, never logged, so never set
            assert not prom.query(expr), f"{name} exported though the run logged no {key}"
            continue
        prom.wait_for(expr, lambda r, want=logged[-1]: _scalar(r) is not None
                      and math.isclose(_scalar(r), want, rel_tol=1e-6), 30, f"{name} == {logged[-1]}")
    prom.wait_for('last_over_time(ray_llmp_train_budget_usd{run="prom"}[10m])', lambda r: _scalar(r) == 100, 30,
                  "the budget gauge")
    no_mfu = {"Model FLOPs utilisation"} if not any("perf/mfu" in line for line in lines) else set()
    assert _panels_without_data(prom, "llmp-train", started) == no_mfu
    assert _panels_without_data(prom, "llmp-data", started) == set()
    _draw(prom, "llmp-train,llmp-data", started)
