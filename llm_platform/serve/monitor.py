"""Serving metrics (Prometheus, through `ray.serve.metrics`) and prompt drift against the training data.

Drift compares a rolling window of live prompts with reference statistics of the training set (the dataset
manifest's `stats`): Jensen-Shannon divergence (base 2, so 0..1) of token frequencies, the population stability index
of prompt lengths over the manifest's histogram edges, and the mean prompt perplexity under the served model. Above
the configured thresholds a warning is logged once per excursion. The drift math is plain numpy; only
`ServeMetrics` touches Ray, and only when built inside a replica.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_platform.config.prices import PricesConfig
from llm_platform.errors import ConfigError

log = logging.getLogger(__name__)
_EPS = 1e-6


@dataclass
class DriftReference:
    """What live prompts are compared with."""

    token_frequencies: np.ndarray
    """(V,) probabilities of each token id in the training data."""
    length_edges: list[float]
    """Histogram edges of document lengths in tokens."""
    length_counts: list[float]
    """Counts per histogram bin (len(edges) - 1)."""
    source: str = "texts"
    """Where it came from (a manifest URI or `texts`)."""


def default_length_edges(max_len: int) -> list[float]:
    """Roughly logarithmic length bins up to `max_len` tokens."""
    edges = sorted({0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, max_len} | {max_len + 1})
    return [float(e) for e in edges if e <= max_len + 1]


def reference_from_texts(tokenizer, texts: list[str], edges: list[float] | None = None) -> DriftReference:
    """A reference built by tokenizing `texts` (for tests and models without lineage)."""
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    counts = np.bincount(np.concatenate([np.asarray(i, dtype=np.int64) for i in ids if i]), minlength=len(tokenizer))
    lengths = np.array([len(i) for i in ids])
    edges = edges or default_length_edges(int(lengths.max(initial=1)))
    hist, _ = np.histogram(lengths, bins=edges)
    return DriftReference(counts / max(counts.sum(), 1), list(edges), hist.tolist())


def reference_from_manifest(manifest: dict[str, Any], source: str = "manifest") -> DriftReference:
    """The reference in a dataset manifest's `stats` (token_frequencies, doc_length_tokens)."""
    stats = manifest.get("stats") or {}
    if "token_frequencies" not in stats or "doc_length_tokens" not in stats:
        raise KeyError(f"{source}: stats.token_frequencies or stats.doc_length_tokens missing")
    lengths = stats["doc_length_tokens"]
    return DriftReference(np.asarray(stats["token_frequencies"], dtype=np.float64), list(lengths["edges"]),
                          list(lengths["counts"]), source)


def reference_for_model(model_dir: str) -> DriftReference | None:
    """The reference of a served model through its lineage.json -> dataset manifest; None when there is none."""
    import os

    from llm_platform import storage

    lineage_path = os.path.join(model_dir, "lineage.json")
    if not os.path.exists(lineage_path):
        return None
    try:
        lineage = storage.read_json(lineage_path)
        uri = (lineage.get("dataset") or {}).get("uri")
        if not uri:
            return None
        manifest_uri = storage.join(uri, "manifest.json")
        return reference_from_manifest(storage.read_json(manifest_uri), manifest_uri)
    except Exception as e:  # drift is optional: a missing or old manifest must not stop serving
        log.warning("no drift reference for %s: %s", model_dir, e)
        return None


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same, 1 = disjoint) of two count or probability vectors."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / max(p.sum(), _EPS), q / max(q.sum(), _EPS)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def psi(expected_counts, actual_counts) -> float:
    """Population stability index of two histograms over the same bins (> 0.25 is usually called a shift)."""
    # Half a count of additive smoothing per bin: a small live window leaves bins empty, and an empty bin would
    # otherwise weigh log(eps) and call every short window a shift.
    e = np.asarray(expected_counts, dtype=np.float64) + 0.5
    a = np.asarray(actual_counts, dtype=np.float64) + 0.5
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Rolling window of live prompts compared with a `DriftReference` (thread-safe)."""

    def __init__(self, reference: DriftReference | None, window_prompts: int = 200, min_prompts: int = 20,
                 js_threshold: float = 0.3, psi_threshold: float = 0.25, metrics=None):
        self.reference, self.min_prompts = reference, min_prompts
        self.js_threshold, self.psi_threshold, self.metrics = js_threshold, psi_threshold, metrics
        self._window: collections.deque = collections.deque(maxlen=window_prompts)
        self._lock = threading.Lock()
        self.alerting = False
        self.alerts = 0

    def observe_prompt(self, token_ids: list[int], token_logprobs: list[float | None]) -> None:
        """Add one prompt (its ids and the model's log-probability of each token after the first)."""
        lps = [lp for lp in token_logprobs if lp is not None]
        nll = -sum(lps) / len(lps) if lps else None
        with self._lock:
            self._window.append((np.asarray(token_ids, dtype=np.int64), nll))
        report = self.report()
        if self.metrics is not None and report.get("js_divergence") is not None:
            self.metrics.set_drift(report)
        self._maybe_alert(report)

    def report(self) -> dict[str, Any]:
        """Current drift numbers (None until `min_prompts` prompts were seen or without a reference)."""
        with self._lock:
            window = list(self._window)
        nlls = [n for _, n in window if n is not None]
        out: dict[str, Any] = {"window_prompts": len(window), "js_divergence": None, "psi_prompt_length": None,
                               "mean_prompt_perplexity": math.exp(float(np.mean(nlls))) if nlls else None,
                               "js_threshold": self.js_threshold, "psi_threshold": self.psi_threshold,
                               "reference": self.reference.source if self.reference else None,
                               "alert": self.alerting, "alerts_logged": self.alerts}
        if self.reference is None or len(window) < self.min_prompts:
            return out
        ref = self.reference.token_frequencies
        ids = np.concatenate([i for i, _ in window]) if window else np.zeros(0, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(ref))]
        out["js_divergence"] = js_divergence(np.bincount(ids, minlength=len(ref)), ref)
        edges = np.asarray(self.reference.length_edges, dtype=np.float64)
        lengths = np.clip([len(i) for i, _ in window], edges[0], np.nextafter(edges[-1], -np.inf))
        live, _ = np.histogram(lengths, bins=edges)
        out["psi_prompt_length"] = psi(self.reference.length_counts, live)
        return out

    def _maybe_alert(self, report: dict[str, Any]) -> None:
        js, p = report.get("js_divergence"), report.get("psi_prompt_length")
        over = js is not None and (js > self.js_threshold or (p is not None and p > self.psi_threshold))
        if over and not self.alerting:
            self.alerts += 1
            log.warning("DRIFT ALERT: prompt distribution moved from the training data (js_divergence=%.3f > %.3f "
                        "or psi_prompt_length=%.3f > %.3f over the last %d prompts)", js, self.js_threshold, p,
                        self.psi_threshold, report["window_prompts"])
        self.alerting = over


class ServeMetrics:
    """Prometheus metrics of one replica through `ray.serve.metrics` (exported by Ray's metrics agent).

    Requests record their own (status, latency, time to first token, tokens); the engine's state (queue, batch, KV
    cache) is sampled every `SAMPLE_INTERVAL_S` by `start_sampler`'s thread as well as after each request, so a
    replica whose requests stop finishing (a wedged engine, a full queue) still reports it, and that thread moves the
    engine's inter-token gaps into their histogram (a few thousand a second at most, off the event loop). The
    sampler also sets the gauges that change rarely (cost rate, drift, last request's tokens/s) again: Ray's metrics
    agent drops a gauge value not set for two report intervals, and the cost rate, set once, was gone from
    Prometheus seconds after the replica started.
    """

    LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
    # A decode step of one sequence: from a fraction of a millisecond (a small model on a GPU) to seconds (a
    # large one on CPU, or a step stalled behind long prefills).
    INTER_TOKEN_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
    SAMPLE_INTERVAL_S = 1.0

    def __init__(self, engine: Any = None) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("llmp_serve_requests", "Requests by HTTP status.", tag_keys=("status",))
        self.latency = metrics.Histogram("llmp_serve_latency_s", "Generation latency in seconds.",
                                         boundaries=self.LATENCY_BOUNDARIES_S)
        self.ttft = metrics.Histogram("llmp_serve_ttft_s", "Time to first token in seconds.",
                                      boundaries=self.LATENCY_BOUNDARIES_S)
        self.inter_token = metrics.Histogram(
            "llmp_serve_inter_token_latency_s", "Seconds between consecutive tokens of a sequence, in the engine "
            "(a stream sends them in chunks of serve.engine.stream_interval_tokens).",
            boundaries=self.INTER_TOKEN_BOUNDARIES_S)
        self.tokens = metrics.Counter("llmp_serve_generated_tokens", "Generated tokens.")
        self.tokens_per_s = metrics.Gauge("llmp_serve_tokens_per_s", "Generated tokens per second (last request).")
        self.queue_depth = metrics.Gauge("llmp_serve_queue_depth", "Requests waiting for a batch slot.")
        self.running = metrics.Gauge("llmp_serve_running_sequences", "Sequences in the running batch.")
        self.kv_used = metrics.Gauge("llmp_serve_kv_cache_used_fraction", "Share of the replica's KV-cache budget "
                                     "(serve.engine.max_batch_tokens) the running batch's cache holds.")
        self.cost_rate = metrics.Gauge("llmp_serve_cost_usd_per_hour", "What the replica's resources cost per "
                                       "hour at the price table's prices (serve.prices).")
        self.drift_js = metrics.Gauge("llmp_serve_drift_js", "JS divergence of prompt tokens vs training data.")
        self.drift_psi = metrics.Gauge("llmp_serve_drift_psi", "PSI of prompt lengths vs training data.")
        self.drift_ppl = metrics.Gauge("llmp_serve_prompt_perplexity", "Mean prompt perplexity (rolling window).")
        self.engine = engine
        self._held: dict[str, tuple[Any, float]] = {}  # gauge name -> (gauge, last value), set again by the sampler
        self._held_lock = threading.Lock()
        self._stop = threading.Event()

    def count_request(self, status: int) -> None:
        self.requests.inc(tags={"status": str(status)})

    def observe_generation(self, latency_s: float, ttft_s: float, tokens: int) -> None:
        self.latency.observe(latency_s)
        self.ttft.observe(ttft_s)
        if tokens:
            self.tokens.inc(tokens)
            self._hold("tokens_per_s", self.tokens_per_s, tokens / max(latency_s, 1e-6))
        self._set_engine_gauges()

    def _hold(self, name: str, gauge: Any, value: float) -> None:
        with self._held_lock:
            self._held[name] = (gauge, value)
        gauge.set(value)

    def _set_engine_gauges(self) -> None:
        if self.engine is not None:
            self.queue_depth.set(self.engine.num_waiting())
            self.running.set(self.engine.num_running())
            self.kv_used.set(self.engine.kv_cache_used_fraction())

    def sample_engine(self) -> None:
        """The sampler's round (one thread; the inter-token gaps are drained here, never on the event loop): the
        engine's gauges, its inter-token gaps into the histogram, the held gauges set again."""
        self._set_engine_gauges()
        with self._held_lock:
            held = list(self._held.values())
        for gauge, value in held:
            gauge.set(value)
        if self.engine is not None:
            gaps = self.engine.token_gaps
            while gaps:  # popleft beside the engine thread's append: a deque makes both atomic
                self.inter_token.observe(gaps.popleft())

    def start_sampler(self) -> None:
        """Sample the engine every `SAMPLE_INTERVAL_S` in a daemon thread until `stop_sampler`."""
        def run() -> None:
            while not self._stop.wait(self.SAMPLE_INTERVAL_S):
                try:
                    self.sample_engine()
                except Exception as e:  # metrics must never take a replica down
                    log.warning("sampling the engine's metrics failed: %s", e)

        threading.Thread(target=run, name="llmp-metrics", daemon=True).start()

    def stop_sampler(self) -> None:
        self._stop.set()

    def set_cost_rate(self, usd_per_hour: float) -> None:
        self._hold("cost_rate", self.cost_rate, usd_per_hour)

    def set_drift(self, report: dict[str, Any]) -> None:
        self._hold("drift_js", self.drift_js, report["js_divergence"])
        self._hold("drift_psi", self.drift_psi, report["psi_prompt_length"])
        if report.get("mean_prompt_perplexity") is not None:
            self._hold("drift_ppl", self.drift_ppl, report["mean_prompt_perplexity"])


def replica_usd_per_hour(prices: PricesConfig, *, num_gpus: float, num_cpus: float, gpu_type: str | None) -> float:
    """What one replica's resources cost per hour at `prices.market`: its GPUs (a fraction of one costs that
    fraction) at the GPU's price, or, without GPUs, its vCPUs at the per-vCPU price.

    Raises:
        ConfigError: GPUs without a known type, or a GPU the table has no price for (naming the key to add).
    """
    from llm_platform import costs

    if num_gpus > 0:
        if not gpu_type:
            raise ConfigError(f"serve.deployment.num_gpus_per_replica={num_gpus:g}: the GPU type is unknown, so "
                              "the endpoint's cost rate is too")
        try:
            return num_gpus * costs.gpu_hour_usd(prices, gpu_type, prices.market)
        except ConfigError as e:  # the lookup names plan.prices, the planner's table; this one is the endpoint's
            raise ConfigError(str(e).replace("plan.prices", "serve.prices")) from None
    return num_cpus * costs.cpu_hour_usd(prices, prices.market)
