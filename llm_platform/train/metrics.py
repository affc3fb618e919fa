"""Training metrics: throughput and MFU arithmetic, and the rank-0 sinks (console, metrics.jsonl, TensorBoard).

`metrics.jsonl` holds one JSON object per logged step (`step` plus `train/loss`, `val/loss`, `perf/tokens_per_s`...).
Writing it costs what each line costs, never the whole history again:

- local storage: each line is appended (one write of a whole line; `read_metrics` skips a torn last line);
- S3, which cannot append: lines go to parts `metrics.parts/part-NNNNNN.jsonl` of at most `PART_LINES` lines (the
  open part is re-PUT on each log, so a log costs at most `PART_LINES` lines), and `close` consolidates them into
  `metrics.jsonl` with one PUT and removes the parts.

On resume the lines after the checkpoint's step are dropped (one rewrite per restart), so the record always tells
one consistent history. `read_metrics` reads a run's records in either state (finished, or still going on S3).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

from llm_platform import storage

log = logging.getLogger("llm_platform.train")


class Throughput:
    """Tokens per second and MFU over the interval since the last call to `measure`."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, num_devices: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_devices = num_devices
        self.tokens = 0
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        """Count one optimizer step and the tokens it processed on all workers."""
        self.tokens += tokens
        self.steps += 1

    def measure(self) -> dict[str, float]:
        """`perf/tokens_per_s`, `perf/flops_per_s`, `perf/step_time_s` (when a step was counted) and (on a known
        device) `perf/mfu`; resets the interval."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        out = {"perf/tokens_per_s": tokens_per_s, "perf/flops_per_s": tokens_per_s * self.flops_per_token}
        if self.steps:
            out["perf/step_time_s"] = elapsed / self.steps
        if self.peak_flops:
            out["perf/mfu"] = out["perf/flops_per_s"] / (self.peak_flops * self.num_devices)
        self.tokens, self.steps, self.start = 0, 0, now
        return out


def device_memory() -> dict[str, float]:
    """Peak allocated accelerator memory (GiB) since the last call, or the process RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 1024**3
        torch.cuda.reset_peak_memory_stats()
        return {"perf/memory_gib": peak}
    try:
        import resource

        return {"perf/memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    except ImportError:  # pragma: no cover - not POSIX
        return {}


class TrainGauges:
    """Rank 0's key figures as Prometheus gauges through Ray's metrics agent, exported as `ray_llmp_train_*` with a
    `run` label (cluster/monitoring/ dashboards and alerts read them). Set from each logged record.

    Ray 2.60's agent drops a gauge not set for two report intervals (20 s by default), so a thread sets the last
    values again every `refresh_s` (logs can be minutes apart on a big model; the budget is set only once).
    """

    SERIES = {
        "perf/tokens_per_s": ("llmp_train_tokens_per_s", "Training tokens per second (all workers)."),
        "perf/mfu": ("llmp_train_mfu", "Model FLOPs utilization."),
        "perf/step_time_s": ("llmp_train_step_time_s", "Seconds per optimizer step."),
        "train/loss": ("llmp_train_loss", "Training loss (global token mean)."),
        "val/loss": ("llmp_train_val_loss", "Validation loss."),
        "cost/usd": ("llmp_train_cost_usd", "Dollars the run has spent (plan.prices)."),
        "cost/gpu_hours": ("llmp_train_gpu_hours", "GPU-hours the run has used."),
    }

    def __init__(self, run_name: str, budget_usd: float | None = None, refresh_s: float = 5.0):
        import threading

        from ray.util import metrics

        self.gauges = {}
        for key, (name, description) in self.SERIES.items():
            gauge = metrics.Gauge(name, description, tag_keys=("run",))
            gauge.set_default_tags({"run": run_name})
            self.gauges[key] = gauge
        self.last: dict[str, float] = {}
        if budget_usd is not None:
            self.gauges["budget/usd"] = metrics.Gauge(
                "llmp_train_budget_usd", "The run's dollar budget (train.budget.max_cost_usd).", tag_keys=("run",))
            self.gauges["budget/usd"].set_default_tags({"run": run_name})
            self.last["budget/usd"] = float(budget_usd)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresh_s = refresh_s
        self._flush()
        self._thread = threading.Thread(target=self._run, name="train-gauges", daemon=True)
        self._thread.start()

    def set(self, metrics: dict[str, Any]) -> None:
        with self._lock:
            for key in self.SERIES:
                value = metrics.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.last[key] = float(value)
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            for key, value in self.last.items():
                self.gauges[key].set(value)

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self._flush()

    def close(self) -> None:
        self._stop.set()


PART_LINES = 100
PARTS = "metrics.parts"


def _parse_lines(text: str) -> list[str]:
    """The complete JSON lines of `text` (a torn last line, from a reader racing an append, is left out)."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            continue
        lines.append(line)
    return lines


def _metrics_lines(run_uri: str) -> list[str]:
    uri = storage.join(run_uri, "metrics.jsonl")
    lines = _parse_lines(storage.read_text(uri)) if storage.exists(uri) else []
    if storage.is_remote(run_uri):
        seen = set(lines)  # a reader between `close`'s consolidation and its removal of the parts sees both
        for part in sorted(storage.glob(storage.join(run_uri, PARTS, "part-*.jsonl"))):
            lines += [line for line in _parse_lines(storage.read_text(part)) if line not in seen]
    return lines


def read_metrics(run_uri: str) -> list[dict]:
    """A run's metric records in order: `metrics.jsonl` and, for a run still going on S3, its open parts."""
    return [json.loads(line) for line in _metrics_lines(run_uri)]


class MetricsLogger:
    """Rank 0's sinks. Values that are not finite numbers are written as null in JSON."""

    def __init__(self, run_uri: str, *, resume_step: int = 0, total_steps: int = 0, trackers=None,
                 gauges: TrainGauges | None = None):
        self.run_uri = run_uri
        self.gauges = gauges
        self.uri = storage.join(run_uri, "metrics.jsonl")
        self.remote = storage.is_remote(run_uri)
        self.trackers = trackers  # tracking.Trackers (MLflow, W&B) or None
        self.total_steps = total_steps
        self.part: list[str] = []  # S3: the lines of the open part
        self.part_index = 0
        kept = [line for line in _metrics_lines(run_uri) if json.loads(line).get("step", 0) <= resume_step]
        if self.remote:
            # A restart: what earlier attempts logged up to the checkpoint becomes metrics.jsonl (one PUT), and
            # new lines start new parts.
            if kept or storage.exists(self.uri):
                storage.write_text(self.uri, "".join(f"{line}\n" for line in kept))
            storage.delete(storage.join(run_uri, PARTS))
        elif kept or storage.exists(self.uri):
            storage.write_text(self.uri, "".join(f"{line}\n" for line in kept))  # one rewrite per restart
        # TensorBoard writes event files locally; for s3:// storage they are uploaded at `close`.
        self.tb_remote = storage.join(run_uri, "tensorboard")
        self.tb_local = (tempfile.mkdtemp(prefix="llmp-tb-") if storage.is_remote(run_uri)
                         else storage.filesystem(self.tb_remote)[1])
        self._tb = None

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.tb_local, exist_ok=True)
            self._tb = SummaryWriter(self.tb_local)
        return self._tb

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for key, value in metrics.items():
            record[key] = value if not isinstance(value, float) or math.isfinite(value) else None
        self._append(json.dumps(record, sort_keys=True))
        writer = self._writer()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, step)
        writer.flush()
        if self.trackers is not None:
            self.trackers.log(step, metrics)
        if self.gauges is not None:
            self.gauges.set(metrics)
        log.info("%s", format_console(step, self.total_steps, metrics))

    def _append(self, line: str) -> None:
        if not self.remote:
            path = storage.filesystem(self.uri)[1]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")  # one write of the whole line
            return
        self.part.append(line)
        storage.write_text(storage.join(self.run_uri, PARTS, f"part-{self.part_index:06d}.jsonl"),
                           "".join(f"{x}\n" for x in self.part))
        if len(self.part) >= PART_LINES:
            self.part, self.part_index = [], self.part_index + 1

    def consolidate(self) -> None:
        """S3: the parts become `metrics.jsonl` (one PUT of the whole record, once), then the parts go."""
        if self.remote:
            storage.write_text(self.uri, "".join(f"{line}\n" for line in _metrics_lines(self.run_uri)))
            storage.delete(storage.join(self.run_uri, PARTS))
            self.part, self.part_index = [], 0

    def close(self, status: str = "FINISHED") -> None:
        if self.gauges is not None:
            self.gauges.close()
        self.consolidate()
        if self.trackers is not None:
            self.trackers.close(status)
        if self._tb is not None:
            self._tb.close()
        if storage.is_remote(self.tb_remote) and os.path.isdir(self.tb_local):
            storage.upload_dir(self.tb_local, self.tb_remote)


class FollowMetrics:
    """On the driver, while `trainer.fit()` runs: print rank 0's new `metrics.jsonl` lines as they land.

    Rank 0 logs them itself, but a quiet console does not forward workers' output (console.py), so the driver
    shows the run's progress from the record it writes anyway. A no-op when the workers' lines reach the console.
    """

    def __init__(self, run_uri: str, total_steps: int, *, interval_s: float = 2.0):
        import threading

        self.run_uri = run_uri
        self.total_steps, self.interval_s = total_steps, interval_s
        self.shown_step = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-metrics", daemon=True)

    def __enter__(self) -> FollowMetrics:
        from llm_platform import console

        if not console.verbose():
            # Lines already in the file (a resumed run) are not news.
            self.shown_step = max((r.get("step", 0) for r in self._records()), default=-1)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.show()

    def _records(self) -> list[dict]:
        try:
            return read_metrics(self.run_uri)
        except Exception:  # noqa: BLE001 - progress display only; a partial read is retried next tick
            return []

    def show(self) -> None:
        for record in self._records():
            step = record.get("step", 0)
            if step > self.shown_step:
                self.shown_step = step
                metrics = {k: v for k, v in record.items() if k not in ("step", "time") and v is not None}
                log.info("%s", format_console(step, self.total_steps, metrics))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.show()


CONSOLE_QUIET = ("cost/hours", "perf/flops_per_s", "train/tokens", "train/epoch")
"""Logged and recorded, but left off the console line (the record and TensorBoard have them)."""


def format_console(step: int, total: int, metrics: dict[str, Any]) -> str:
    """`step 20/200 (10%) cost/usd 0.012 train/loss 5.1234 val/loss 5.2 perf/tokens_per_s 1.2e+04 ...`"""
    pct = f" ({100 * step / total:.0f}%)" if total else ""
    parts = [f"step {step}/{total}{pct}"]
    for key in sorted(metrics):
        value = metrics[key]
        if key in CONSOLE_QUIET or (key == "cost/gpu_hours" and not value):  # CPU workers hold no GPU-hours
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " ".join(parts)
