"""`llm-platform submit` against a real Ray head started here (`ray start --head`, dashboard on 127.0.0.1).

The head has its own ports and temp dir and is stopped by signalling the process group this test started, never
with `ray stop` (which would stop every Ray on the machine). The debug data and train jobs run through the Jobs
API with this checkout as their working dir and must leave their records in storage (one `run` job chains both).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from fixtures.waiting import poll

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 600


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `ray start`, run through Ray's own CLI entry point with one change: Ray waits a fixed 30 s for the raylet to
# register (ray/_private/node.py, not configurable), which a shared, overloaded CI machine can miss. The head's
# node module gets a clock that runs 10x slower, so that wait (and only node.py's waits) becomes 300 s.
RAY_START = """
import sys, time
import ray._private.node as node


class PatientClock:
    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def monotonic():
        return time.monotonic() / 10


node.time = PatientClock()
from ray.scripts.scripts import main

sys.argv = ["ray", *sys.argv[1:]]
main()
"""


def _jobs_api_up(address: str) -> bool:
    from llm_platform import jobs

    try:
        # jobs.connect sends the auth token that `ray start` wrote to ~/.ray/auth_token (token mode is the default).
        jobs.connect(address).list_jobs()
        return True
    except Exception:  # not up yet: connection refused, 503 while the job agent starts
        return False


def _group_gone(proc: subprocess.Popen) -> bool:
    """True once the head (reaped here) and every other process of its group have exited."""
    if proc.poll() is None:
        return False
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop a head started by `_start_head`: its own process group only, never `ray stop`."""
    # start_new_session=True made the head its own group leader, so its group id is its pid (even once it has
    # exited). `ray start --block` tears its children down on SIGTERM; the group SIGKILL catches any stragglers.
    # A short grace: this head's state is thrown away, and a full `ray start --block` teardown took 35 s in CI.
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        # Bounded: a process this container's init never reaps stays in the group as a zombie.
        poll(lambda: _group_gone(proc), grace_s)


def _start_head(temp_dir: Path, log: Path, timeout_s: float = 420) -> tuple[subprocess.Popen | None, str, str]:
    """Start `ray start --head --block` with free ports; returns (process or None on failure, address, log tail)."""
    dashboard_port = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dashboard_port, "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
    }
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # The raylet gives the dashboard agent 10-odd seconds to write its port file and dies otherwise; on a shared,
    # overloaded CI machine the agent's Python start-up alone can take longer.
    env["RAY_agent_register_timeout_ms"] = "300000"
    # The job's `llm-platform` is the console script of this environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-c", RAY_START, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "8", "--num-gpus", "0",
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    # Until the Jobs API answers, or the head has exited (a failed start: no use waiting on).
    poll(lambda: proc.poll() is not None or _jobs_api_up(address), timeout_s, poll_s=1.0)
    if proc.poll() is None and _jobs_api_up(address):
        return proc, address, ""
    _stop(proc)
    return None, address, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head with the dashboard (Jobs API) on 127.0.0.1; yields the dashboard URL."""
    # On a loaded machine the raylet can miss Ray's fixed 30 s registration window: try a few times.
    failures = []
    for _ in range(3):
        # Short: Ray puts Unix sockets under the temp dir, and their paths are limited to ~107 bytes.
        temp_dir = Path(tempfile.mkdtemp(prefix="llmp-jobs-", dir="/tmp"))
        log = temp_dir.parent / f"{temp_dir.name}.log"
        proc, address, tail = _start_head(temp_dir, log)
        if proc is not None:
            break
        failures.append(tail)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
    else:
        pytest.fail("ray start --head failed 3 times; last log:\n" + failures[-1])
    try:
        yield address
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def storage_root():
    root = Path(tempfile.mkdtemp(prefix="llmp-jobs-store-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _submit(address: str, *args: str) -> subprocess.CompletedProcess:
    """`llm-platform submit ...` as a user runs it, in a subprocess (it exits with the job's status)."""
    return subprocess.run(
        [sys.executable, "-m", "llm_platform", "submit", *args, "--address", address],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO,
    )


def test_run_job_prepares_data_then_trains(ray_head, storage_root):
    # One job through the Jobs API for two stages: `run` chains data -> train in the job's driver on the cluster.
    proc = _submit(ray_head, "run", "debug=smoke", f"storage.root={storage_root}", "run.stages=[data,train]",
                   "train.max_steps=10")
    assert proc.returncode == 0, \
        f"run job failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    assert "SUCCEEDED" in proc.stderr
    manifests = glob.glob(str(storage_root / "datasets" / "*" / "*" / "manifest.json"))
    assert manifests, f"no dataset manifest under {storage_root}:\n{proc.stdout[-3000:]}"
    lineages = glob.glob(str(storage_root / "runs" / "*" / "lineage.json"))
    assert lineages, f"no run lineage under {storage_root}:\n{proc.stdout[-3000:]}"
    assert glob.glob(str(storage_root / "runs" / "*" / "metrics.jsonl")), "the run wrote no metrics"
    # The job's own log streamed back to this terminal.
    assert proc.stdout.strip(), "the job's log was not streamed"


def test_failing_job_mirrors_exit_status_and_jobs_commands_see_it(ray_head, storage_root):
    from llm_platform import jobs

    # A misspelt key fails on the cluster (Hydra exits 1); --no-check skips the local compose that would catch it.
    job_id = f"llmp-fail-{uuid.uuid4().hex[:8]}"
    proc = _submit(ray_head, "data", "debug=smoke", f"storage.root={storage_root}", "dat.seq_len=3",
                   "--no-check", "--submission-id", job_id)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert f"{job_id} FAILED" in proc.stderr, proc.stderr[-2000:]
    listed = subprocess.run([sys.executable, "-m", "llm_platform", "jobs", "list", "--address", ray_head],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stdout + listed.stderr
    logs = subprocess.run([sys.executable, "-m", "llm_platform", "jobs", "logs", job_id, "--address", ray_head],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert logs.returncode == 0 and "dat.seq_len" in logs.stdout, logs.stdout[-2000:] + logs.stderr

    # stop: a long job submitted without waiting, then stopped.
    client = jobs.connect(ray_head)
    long_id = client.submit_job(entrypoint="sleep 300", runtime_env={})
    stopped = subprocess.run([sys.executable, "-m", "llm_platform", "jobs", "stop", long_id, "--wait",
                              "--address", ray_head], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert stopped.returncode == 0, stopped.stderr
    assert jobs.result(client, long_id).status == "STOPPED"
    assert jobs.result(client, long_id).exit_code == 130
