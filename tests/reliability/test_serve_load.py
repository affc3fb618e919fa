"""Serving under sustained load with a replica killed in the middle.

Fault: one of the two replicas of the deployment is killed (`ray.kill`, no restart by Ray: Serve's controller must
notice and replace it) once a third of the requests have been answered.
Load: 2,000 completion requests (tiny GPT-2, 4 new tokens each) from 64 concurrent clients.
What must hold: every response is a 200 with a completion, or a documented 429/503 in OpenAI's error shape with a
`Retry-After` header (never a 500, never a dropped connection, nothing left hanging: the proxy's request timeout is
30 s and the clients wait 120 s); most requests succeed; the killed replica is replaced, the deployment is HEALTHY
again, and afterwards every request succeeds.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import pytest

from conftest import free_port
from serve_fixtures import build_tiny_model, sample_texts

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "sk-reliability"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = "load"
REQUESTS, CONCURRENCY, KILL_AFTER = 2000, 64, 650


def replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))


async def sustained_load(base: str, prompts: list[str], on_progress) -> list[tuple[int, dict, dict, float]]:
    """(status, JSON body or {}, headers, seconds) for each of REQUESTS requests at CONCURRENCY."""
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, headers=AUTH, limits=limits, timeout=120) as http:
        async def one(i: int):
            nonlocal done
            async with gate:
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/completions", json={"model": "tiny", "prompt": prompts[i % len(prompts)],
                                                                  "max_tokens": 4})
                    outcome = (r.status_code, r.json() if r.content else {}, dict(r.headers),
                               time.perf_counter() - t0)
                except httpx.HTTPError as e:  # a dropped connection or a timeout: never allowed
                    outcome = (-1, {"transport_error": repr(e)}, {}, time.perf_counter() - t0)
            done += 1
            if done % 250 == 0:  # shown if the test fails
                print(f"{time.strftime('%X')} {done}/{REQUESTS} answered", file=sys.stderr, flush=True)
            await on_progress(done)
            return outcome

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def test_sustained_load_with_a_replica_killed(ray_session, tmp_path, reliability_report):
    import ray
    from ray import serve

    from llm_platform.serve.app import build_app

    folder = build_tiny_model(tmp_path / "tiny")
    (tmp_path / "keys").write_text(KEY + "\n")
    port = free_port()
    # As `llm-platform serve` does (serve.request_timeout_s), with a limit well above this load's p99: a request
    # whose replica died without Serve noticing ends as a retryable 503 instead of hanging.
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30})
    serve.run(build_app({"model": str(folder), "model_name": "tiny", "api_key_file": str(tmp_path / "keys"),
                         "num_replicas": 2, "num_cpus_per_replica": 0.5, "max_ongoing_requests": 48,
                         "max_queued_requests": 64, "max_batch_size": 32, "health_check_period_s": 1.0,
                         "graceful_shutdown_timeout_s": 2.0}),
              name=APP, route_prefix=f"/{APP}")
    base = f"http://127.0.0.1:{port}/{APP}"
    try:
        before = replicas()
        assert len(before) == 2
        killed: dict = {}

        async def on_progress(done: int):
            if done == KILL_AFTER and not killed:
                killed["at"] = time.perf_counter()
                ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)

        t0 = time.perf_counter()
        outcomes = asyncio.run(sustained_load(base, sample_texts(50, seed=3), on_progress))
        elapsed = time.perf_counter() - t0
        assert killed, "the replica was never killed"

        codes: dict[int, int] = {}
        for status, body, headers, _ in outcomes:
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                assert body["choices"][0]["text"] is not None and body["usage"]["completion_tokens"] >= 1
            else:
                assert status in (429, 503), (status, body)
                assert set(body["error"]) == {"message", "type", "param", "code"}, body
                assert int(headers["retry-after"]) >= 1
        assert sum(codes.values()) == REQUESTS
        assert codes.get(200, 0) >= REQUESTS // 2, codes

        # Serve replaces the killed replica; then every request succeeds again.
        deadline = time.time() + 180
        while time.time() < deadline:
            now = replicas()
            if len(now) == 2 and before[0] not in now and \
                    serve.status().applications[APP].deployments["openai"].status == "HEALTHY":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"replica not replaced: {replicas()}")
        recovered_s = time.perf_counter() - killed["at"]
        after = [httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=60,
                            json={"model": "tiny", "prompt": "the dog", "max_tokens": 4}) for _ in range(20)]
        assert [r.status_code for r in after] == [200] * 20

        latencies = sorted(o[3] for o in outcomes if o[0] == 200)
        reliability_report("serve: 2,000 requests at c=64, one of 2 replicas killed after 650",
                           responses=dict(sorted(codes.items())), seconds=round(elapsed, 1),
                           ok_per_s=round(codes.get(200, 0) / elapsed, 1),
                           p50_ms=round(1000 * latencies[len(latencies) // 2]),
                           p99_ms=round(1000 * latencies[int(len(latencies) * 0.99)]),
                           replaced_within_s=round(recovered_s, 1))
    finally:
        serve.shutdown()
