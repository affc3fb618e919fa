"""`llm-platform serve serve.http.ingress=direct` end to end: the CLI starts its own local Ray with Serve's direct
ingress behind HAProxy (not the session's Ray: Serve reads the flags when a cluster starts), and the openai client
gets the same API as through Serve's proxy: completions and chat, streamed and not, errors in OpenAI's shape, auth. At
the end the CLI gets SIGTERM (as `kill`, systemd or a stopping pod send it) and must drain and exit 0 as on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest
from conftest import free_port
from fixtures.serving import build_tiny_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]
KEY = "sk-direct-test-key"


def _stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM, which the CLI handles as Ctrl-C (it undeploys, then its local Ray goes); returns its exit code (None:
    it had to be killed). The group SIGKILL then catches any of this Ray instance's processes that outlived it."""
    code = None
    try:
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    return code


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
    """(base URL, CLI log path) of `llm-platform serve` with direct ingress, stopped at the end of the module."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    key_file = tmp_path_factory.mktemp("secret") / "keys"
    key_file.write_text(f"{KEY}\n")
    log = tmp_path_factory.mktemp("log") / "serve.log"
    port = free_port()
    # Short: Ray puts Unix sockets under its temp dir, and their paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="llmp-di-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    # HAProxy's Prometheus exporter listens on every interface: a free port, so it cannot clash with another run.
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    # A deleted replica stays reachable this long so that load balancers can take it out (Serve's default 30 s):
    # Ctrl-C would wait it out. Nothing balances this test's replica but Serve's own HAProxy.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    cmd = [sys.executable, "-m", "llm_platform", "serve", f"serve.model={folder}", "serve.model_name=tiny",
           f"serve.http.port={port}", "serve.http.ingress=direct", "serve.deployment.num_cpus_per_replica=0.5",
           f"serve.auth.api_key_file={key_file}", "serve.limits.max_tokens_cap=32",
           "serve.deployment.graceful_shutdown_timeout_s=2",
           "cluster.num_cpus=4", f"cluster.temp_dir={temp_dir}", "cluster.log_to_driver=false"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"llm-platform serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:  # ready: the CLI printed its URL and the replica answers behind HAProxy
                if "serving" in log.read_text() and httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"direct ingress never became healthy:\n{log.read_text()[-4000:]}")
        yield base, log
    finally:
        code = _stop(proc)
    assert code == 0, f"llm-platform serve did not drain and exit on SIGTERM ({code}):\n{log.read_text()[-3000:]}"


def test_openai_client_through_direct_ingress(direct):
    base, log = direct
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    # The replica itself reports the ingress its process runs with (its node's environment, not the config's).
    report = httpx.get(f"{base}/v1/monitoring", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert report["replica"]["ingress"] == "direct"

    done = client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0, seed=1)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=6, temperature=0, stream=True)
    assert sum(len(c.choices[0].delta.content or "") for c in chat if c.choices) > 0

    # Errors keep OpenAI's shape without Serve's proxy: the app's own, and the auth check.
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="the " * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    big = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                     json={"model": "tiny", "prompt": "x" * 2_000_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert KEY not in log.read_text()  # the key is never logged
