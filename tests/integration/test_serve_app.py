"""The Serve app on the session's local Ray: the openai client, errors and auth, backpressure, drift, a rolling
update, a schemathesis run over the app's OpenAPI schema that must find no 5xx, and the fail-closed rule (a replica
that other hosts could reach refuses to start without a key; on loopback it may serve without one). (A replica
killed under load, and hostile input, are in tests/reliability/test_serve_load.py.)"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import free_port
from fixtures.serving import build_tiny_model, sample_texts
from fixtures.waiting import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]
KEY = "sk-serve-test-key"
# An API-key variable that no environment sets: the app reading it has no key at all.
UNSET_KEYS_ENV = "LLMP_TEST_UNSET_API_KEYS"
AUTH = {"Authorization": f"Bearer {KEY}"}
_COMMON: dict = {}


def served_common() -> dict:
    return dict(_COMMON)


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied, nested dicts (config nodes) merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main_args(common, **changes):
    return merged(common, {"deployment": {"num_replicas": 2, "max_ongoing_requests": 32}, **changes})


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """Two apps on one Serve instance: `main` (2 replicas, a key file) and `single` (1 replica, tiny queue, drift
    window, no key: allowed on loopback, which also shows that the replica found where Serve listens)."""
    from ray import serve

    from llm_platform.serve.app import build_app

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    key_file = tmp_path_factory.mktemp("secret") / "keys"
    key_file.write_text(f"{KEY}\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"model": str(folder), "model_name": "tiny", "auth": {"api_key_file": str(key_file)},
              "deployment": {"num_cpus_per_replica": 0.5, "health_check_period_s": 1.0,
                             "graceful_shutdown_timeout_s": 2.0},
              "limits": {"max_tokens_cap": 32}}
    serve.run(build_app(main_args(common)), name="main", route_prefix="/main", blocking=False)
    serve.run(build_app(merged(common, {"auth": {"api_key_file": None, "api_key_env": UNSET_KEYS_ENV},
                                        "deployment": {"max_ongoing_requests": 1, "max_queued_requests": 1,
                                                       "retry_after_s": 2},
                                        "drift_reference": sample_texts(400, seed=1),
                                        "drift": {"window_prompts": 30, "min_prompts": 20, "js_threshold": 0.3}})),
              name="single", route_prefix="/single", blocking=False)
    base = f"http://127.0.0.1:{port}"
    _COMMON.update(common)
    wait_until(lambda: all(healthy(f"{base}/{a}/health") for a in ("main", "single")), 240,
               lambda: f"the Serve apps to be healthy: {serve.status()}")
    yield base
    serve.shutdown()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def client(base, app="main", key=KEY):
    return openai.OpenAI(api_key=key, base_url=f"{base}/{app}/v1", max_retries=0, timeout=60)


def test_completions_and_chat_with_openai_client(served):
    c = client(served)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    comp = c.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0)
    assert comp.object == "text_completion" and comp.usage.completion_tokens == len(
        comp.choices[0].logprobs.tokens if comp.choices[0].logprobs else range(comp.usage.completion_tokens))
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
                                     temperature=0.8, seed=3, n=2)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens >= 2


def test_streaming_completion_and_chat(served):
    c = client(served)
    full = c.completions.create(model="tiny", prompt="a big dog", max_tokens=10, temperature=0).choices[0].text
    parts = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="a big dog", max_tokens=10,
                                                               temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == full
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)


def test_logprobs_completion_and_chat(served):
    c = client(served)
    comp = c.completions.create(model="tiny", prompt="the cat", max_tokens=3, logprobs=2, echo=True, temperature=0)
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert comp.choices[0].text.startswith("the cat") and all(len(t) == 2 for t in lp.top_logprobs[2:])
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                     logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and len(content[0].top_logprobs) == 2


def test_errors(served):
    c = client(served)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", top_p=5)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="the " * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").models.list()
    big = httpx.post(f"{served}/main/v1/completions", headers=AUTH,
                     json={"model": "tiny", "prompt": "x" * 2_000_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_backpressure_answers_429_with_retry_after(served):
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 32, "ignore_eos": True}

    def one(_):
        return httpx.post(f"{served}/single/v1/completions", json=body, headers=AUTH, timeout=60)

    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes and not any(code >= 500 for code in codes), codes
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 429)
    # Rejections by Serve's queue (max_queued_requests) are written by the proxy: still OpenAI's shape.
    for r in responses:
        if r.status_code == 429:
            assert r.headers["content-type"] == "application/json"
            assert r.json()["error"]["type"] == "rate_limit_error", r.text


def test_drift_low_in_distribution_then_high_when_shifted(served):
    c = client(served, "single")
    for text in sample_texts(30, seed=5):  # a full window: PSI is noisy on a handful of prompts
        c.completions.create(model="tiny", prompt=text, max_tokens=1)
    report = httpx.get(f"{served}/single/v1/monitoring", headers=AUTH).json()
    low = report["drift"]
    # The replica settings took effect in the replica process.
    assert report["replica"] == {"gil_switch_interval_ms": 0.5, "stream_interval_tokens": 4, "ingress": "proxy"}
    for _ in range(30):
        c.completions.create(model="tiny", prompt="ZQX 1234 !!! @@ ### ünïcode café 日本語 ", max_tokens=1)
    high = httpx.get(f"{served}/single/v1/monitoring", headers=AUTH).json()["drift"]
    assert low["js_divergence"] < 0.2 and not low["alert"]
    assert high["js_divergence"] > 0.3 and high["alert"] and high["psi_prompt_length"] > low["psi_prompt_length"]
    assert high["mean_prompt_perplexity"] > 0


def test_schemathesis_finds_no_5xx(served):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{served}/main/openapi.json", headers=AUTH)  # the schema needs the key
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=30, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=f"{served}/main", headers=AUTH, timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        check()
        checked += 1
    assert checked >= 4


def test_a_replica_reachable_from_other_hosts_refuses_to_start_without_a_key(served):
    from llm_platform.config.serve import AuthConfig, DeploymentConfig, HTTPConfig, ServeConfig
    from llm_platform.errors import ConfigError
    from llm_platform.serve.app import deploy, undeploy

    # serve.http.host=0.0.0.0 (Serve itself keeps listening on 127.0.0.1: its HTTP options are set once per instance).
    cfg = ServeConfig(model=served_common()["model"], model_name="tiny", app_name="exposed",
                      http=HTTPConfig(host="0.0.0.0", route_prefix="/exposed"),
                      auth=AuthConfig(api_key_env=UNSET_KEYS_ENV),
                      deployment=DeploymentConfig(num_cpus_per_replica=0.5))
    try:
        with pytest.raises(ConfigError) as e:
            deploy(cfg)
        message = str(e.value)
        assert "replicas refused to start: serving on 0.0.0.0 (reachable from other hosts) without an API key" \
            in message
        assert UNSET_KEYS_ENV in message and "serve.auth.api_key_file" in message
        assert httpx.get(f"{served}/exposed/health", timeout=10).status_code != 200
    finally:
        undeploy(cfg)


def test_rolling_update_keeps_in_flight_requests(served):
    from ray import serve

    from llm_platform.serve.app import build_app

    c = client(served)

    started = [threading.Event() for _ in range(6)]

    def long_request(i):
        # Streamed, so that the test knows when each request is being generated by an old replica.
        stream = c.completions.create(model="tiny", prompt="the cat", max_tokens=32, stream=True,
                                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage = None
        for chunk in stream:
            started[i].set()
            usage = chunk.usage or usage
        return SimpleNamespace(usage=usage)

    with cf.ThreadPoolExecutor(6) as pool:
        in_flight = [pool.submit(long_request, i) for i in range(6)]
        # Roll only once every request is in flight on an old replica (its first tokens came back).
        wait_until(lambda: all(e.is_set() or f.done() for e, f in zip(started, in_flight)), 120,
                   "every long request's first tokens")
        serve.run(build_app(main_args(served_common(), limits={"max_tokens_cap": 40},
                                      deployment={"graceful_shutdown_timeout_s": 60.0})),
                  name="main", route_prefix="/main", blocking=False)
        results = [f.result() for f in in_flight]  # none dropped
    assert all(r.usage.completion_tokens == 32 for r in results)
    # The new version (cap 40 instead of 32) now answers every request.
    for _ in range(4):
        assert c.completions.create(model="tiny", prompt="x", max_tokens=40, extra_body={"ignore_eos": True}).usage \
            .completion_tokens == 40
