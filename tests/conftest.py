"""Shared fixtures: one loopback S3 (moto server) and one local Ray per test session, started only when used."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Before anything imports Ray or torch: quiet, offline, single-threaded, our own Ray temp dir (one per pytest-xdist
# worker: each worker starts its own session Ray).
os.environ.setdefault("RAY_TMPDIR", "/tmp/llmp-ray")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"{os.environ['RAY_TMPDIR']}-{os.environ['PYTEST_XDIST_WORKER']}"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# No spot preemption on one machine: one actor process fewer per training run (cluster.connect does the same for a
# local Ray; set here too for the Ray heads that tests start themselves).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's processes push their metrics to the node's metrics agent every 10 s by default; at 1 s (its floor) a test's
# Prometheus (tests/integration/test_prometheus.py) sees a series a second after it is recorded.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Ray's agent drops a gauge not set again for two report intervals (2 s here); Serve's controller sets its replica
# health gauge every 10 s unless told otherwise.
os.environ.setdefault("RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S", "1")
# Fake credentials for the loopback S3 only; never real ones in tests.
for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[key] = value
os.environ.pop("AWS_PROFILE", None)


# Property tests (hypothesis): a fixed profile, so CI runs the same examples every time (derandomized, no example
# database written into the checkout, no per-example deadline on a loaded 2-core machine). `HYPOTHESIS_PROFILE=dev`
# explores new random examples locally and keeps a database under .hypothesis/ (git-ignored).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)
    # A controller (or a plain run) has its own file, also when it is a pytest started by a test (which inherits a
    # worker's environment, PYTEST_XDIST_WORKER included): only a real xdist worker has `workerinput`.
    if not hasattr(config, "workerinput"):
        # Reliability figures recorded in xdist workers reach the controller (which prints them) through a file.
        import tempfile

        fd, path = tempfile.mkstemp(prefix="llmp-figures-", suffix=".jsonl")
        os.close(fd)
        os.environ["LLMP_FIGURES_FILE"] = path


def pytest_collection_modifyitems(config, items):
    """The README story first: it is the longest test, so with pytest-xdist (`make test`) its worker starts on it at
    once while the other worker takes everything else."""
    first = [i for i in items if i.nodeid.startswith("tests/integration/test_readme.py")]
    items[:] = first + [i for i in items if i not in first]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 and a free port; AWS_ENDPOINT_URL points at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    from llm_platform import storage

    storage.configure({"endpoint_url": endpoint})
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket; returns its `s3://` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the session (8 logical CPUs on 2 cores), started after the S3 endpoint is exported."""
    import ray

    from llm_platform import cluster
    from llm_platform.config.cluster import ClusterConfig

    if ray.is_initialized():
        ray.shutdown()
    cluster.connect(ClusterConfig(num_cpus=8, log_to_driver=False))
    yield ray
    ray.shutdown()


@pytest.fixture
def another_ray_instance(tmp_path_factory):
    """A second, idle local Ray on this machine (its own process group), as when a user's `llm-platform serve` runs
    beside another command: Ray's address discovery then finds two instances."""
    import contextlib
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    temp_dir = tempfile.mkdtemp(prefix="llmp-2nd-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ready = os.path.join(temp_dir, "ready")
    code = ("import ray, time, pathlib\n"
            f"ray.init(address='local', num_cpus=1, include_dashboard=False, _temp_dir={temp_dir!r})\n"
            f"pathlib.Path({ready!r}).write_text('up')\n"
            "time.sleep(3600)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    log = os.path.join(temp_dir, "start.log")
    for _ in range(3):  # under a full suite on 2 cores a start can fail (once in many runs): try again
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                                    stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while not os.path.exists(ready) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        if os.path.exists(ready):
            break
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    else:
        with open(log, errors="replace") as f:
            raise AssertionError(f"the second Ray instance did not start in 3 tries; its output:\n{f.read()[-3000:]}")
    yield proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


_RELIABILITY_FIGURES: list[tuple[str, dict]] = []


@pytest.fixture
def reliability_report():
    """`reliability_report(scenario, **figures)`: figures printed at the end of the run (the README quotes them)."""

    def record(scenario: str, **figures):
        path = os.environ.get("LLMP_FIGURES_FILE")
        if path:
            import json

            with open(path, "a") as f:
                f.write(json.dumps([scenario, figures], default=str) + "\n")
        else:
            _RELIABILITY_FIGURES.append((scenario, figures))

    return record


_SECONDS_BY_TEST: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _SECONDS_BY_TEST[report.nodeid] = _SECONDS_BY_TEST.get(report.nodeid, 0.0) + report.duration


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """Last before the final line, so that the tail of a CI log shows them: the reliability figures, then the
    slowest test files (setup, call and teardown together) and the total."""
    if hasattr(terminalreporter.config, "workerinput"):
        return  # an xdist worker: its figures are in the file, for the controller to print
    figures_file = os.environ.get("LLMP_FIGURES_FILE")
    if figures_file and os.path.exists(figures_file):
        import json

        with open(figures_file) as f:
            _RELIABILITY_FIGURES.extend(tuple(json.loads(line)) for line in f if line.strip())
        os.remove(figures_file)
    if _RELIABILITY_FIGURES:
        terminalreporter.section("reliability figures")
        for scenario, figures in _RELIABILITY_FIGURES:
            terminalreporter.write_line(f"{scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    if _SECONDS_BY_TEST:
        by_file: dict[str, float] = {}
        for nodeid, seconds in _SECONDS_BY_TEST.items():
            name = nodeid.split("::")[0]
            by_file[name] = by_file.get(name, 0.0) + seconds
        terminalreporter.section("seconds per test file")
        for name, seconds in sorted(by_file.items(), key=lambda kv: -kv[1])[:12]:
            terminalreporter.write_line(f"{seconds:8.1f}  {name}")
        terminalreporter.write_line(f"{sum(by_file.values()):8.1f}  all {len(_SECONDS_BY_TEST)} tests")
