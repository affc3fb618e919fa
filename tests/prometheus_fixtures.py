"""A real Prometheus server for the tests: Debian's `prometheus` binary on 127.0.0.1 with its own temporary TSDB,
scraping the given targets every second, and a small client of its HTTP API (`/api/v1/query`) whose `wait_for` polls
an expression until a check holds or a deadline passes. (Range queries: cluster/monitoring/plot_panels.py.)

`make setup-monitoring` installs the package; without the binary the tests that need it skip naming it (and fail in
CI, which must run them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

SCRAPE_INTERVAL_S = 1


def prometheus_binary() -> str:
    """The `prometheus` executable, or a skip (a failure in CI) naming the package that provides it."""
    exe = shutil.which("prometheus")
    if exe is None:
        why = "prometheus is not installed: `make setup-monitoring` installs Debian's prometheus package"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why + " (CI must run this test)")
        pytest.skip(why)
    return exe


class Prometheus:
    """A running Prometheus server and a client of its HTTP API."""

    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path):
        self.url, self.proc, self.log_path = url, proc, log_path

    def _get(self, path: str, params: dict) -> list[dict]:
        reply = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = reply.json()
        if reply.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: HTTP {reply.status_code} {body}")
        return body["data"]["result"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr` now: [{"metric": {labels}, "value": [t, "value"]}, ...]."""
        return self._get("/api/v1/query", {"query": expr})

    def wait_for(self, expr: str, check: Callable[[list[dict]], bool] = bool, timeout_s: float = 60.0,
                 what: str = "") -> list[dict]:
        """Poll `expr` (about twice a scrape interval) until `check(result)` holds; its last result, or an
        AssertionError with the last result and the scrape targets' health after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or expr}: still {result} after {timeout_s:g} s; "
                                     f"targets: {self.target_health()}")
            time.sleep(SCRAPE_INTERVAL_S / 2)

    def target_health(self) -> list[tuple[str, str, str]]:
        """(scrape URL, health, last error) of every active target."""
        reply = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in reply["data"]["activeTargets"]]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def start_prometheus(targets: list[str], workdir: Path, port: int, timeout_s: float = 60.0) -> Prometheus:
    """Start Prometheus on 127.0.0.1:`port` scraping `targets` (host:port) every second; its config, TSDB and log
    under `workdir`. Returns once it answers ready."""
    exe = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                         "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
              "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}]}
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return Prometheus(url, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"prometheus not ready after {timeout_s:g} s: {log_path.read_text()[-3000:]}")
