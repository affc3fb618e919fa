"""The OpenAI routes in-process (no Ray): the official openai client over an ASGI transport, errors, auth, limits."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from fixtures.serving import build_tiny_model

from llm_platform.config.serve import AuthConfig, LimitsConfig, ServeConfig
from llm_platform.serve.api import CompletionRequest, validation_error
from llm_platform.serve.engine import Engine, load_model
from llm_platform.serve.routes import Service, create_api

KEY = "sk-test-0123456789"


def _config() -> ServeConfig:
    import os

    os.environ["LLMP_TEST_SERVE_KEYS"] = f"other-key,{KEY}"
    return ServeConfig(auth=AuthConfig(api_key_env="LLMP_TEST_SERVE_KEYS"),
                       limits=LimitsConfig(max_request_bytes=4000, max_tokens_cap=64))


@pytest.fixture(scope="module")
def builtin_service(tmp_path_factory):
    """The built-in engine on a tiny GPT-2 (the tests that reach into that engine use this one)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, tok = load_model(folder)
    engine = Engine(model, tok, max_batch_size=8)
    engine.start()
    yield Service(engine, tok, "tiny", _config())
    engine.shutdown(5)


@pytest.fixture(scope="module")
def vllm_service(tmp_path_factory):
    """vLLM's engine (serve.engine.backend=vllm) in process on a tiny Llama-3-layout checkpoint (own tokenizer, chat
    template, padded vocab, bf16 weights; head_dim 32, the least vLLM's CPU attention takes). Runs where vLLM is
    installed: `make test-vllm`, part of `make test`, in .venv-vllm."""
    import dataclasses

    pytest.importorskip("vllm")
    from fixtures.checkpoints import llama3_checkpoint

    from llm_platform.config.serve import EngineConfig, VLLMConfig
    from llm_platform.serve.loading import load_tokenizer
    from llm_platform.serve.vllm_engine import VLLMEngine

    folder = str(llama3_checkpoint(tmp_path_factory.mktemp("llama"), head_dim=32, max_positions=128))
    tok = load_tokenizer(folder)
    cfg = _config()
    cfg = dataclasses.replace(cfg, engine=EngineConfig(
        backend="vllm", max_batch_size=8, vllm=VLLMConfig(enforce_eager=True, cpu_kvcache_space_gb=1)))  # type: ignore
    engine = VLLMEngine(folder, cfg.engine, tok)
    engine.start()
    yield Service(engine, tok, "tiny", cfg)
    engine.shutdown(5)


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def service(request):
    """The same API tests against both backends."""
    return request.getfixturevalue(f"{request.param}_service")


def call(service, fn):
    """Run `fn(openai_client, httpx_client)` against the app on an in-process ASGI transport."""
    app = create_api(service)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = openai.AsyncOpenAI(api_key=KEY, base_url="http://test/v1", http_client=http, max_retries=0)
            return await fn(client, http)
    return asyncio.run(go())


def test_completion_and_chat(service):
    async def fn(client, http):
        c = await client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0)
        chat = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4, temperature=0, n=2)
        return c, chat
    c, chat = call(service, fn)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens <= 5
    assert c.usage.prompt_tokens == len(service.tokenizer("the cat").input_ids)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: same


def test_streaming_matches_non_streaming(service):
    async def fn(client, http):
        full = await client.completions.create(model="tiny", prompt="a big dog", max_tokens=12, temperature=0)
        parts, usage = [], None
        stream = await client.completions.create(model="tiny", prompt="a big dog", max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            parts += [ch.text for ch in chunk.choices]
        return full, parts, usage
    full, parts, usage = call(service, fn)
    assert "".join(parts) == full.choices[0].text and len(parts) > 1
    assert usage.completion_tokens == full.usage.completion_tokens


def test_logprobs_echo_max_tokens_zero(service):
    async def fn(client, http):
        return await client.completions.create(model="tiny", prompt="the cat sat", max_tokens=0, echo=True,
                                               logprobs=1)
    c = call(service, fn)
    n_prompt = len(service.tokenizer("the cat sat").input_ids)
    lp = c.choices[0].logprobs
    assert c.choices[0].text == "the cat sat" and len(lp.token_logprobs) == n_prompt
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert c.usage.completion_tokens == 0


def test_echo_without_logprobs_returns_the_prompt_when_the_engine_scores_no_prompt(tmp_path):
    """A replica scores only every Nth prompt for the drift monitor (`serve.drift.perplexity_every`): echo without
    logprobs must not depend on it, streamed or not."""
    folder = build_tiny_model(tmp_path / "tiny")
    model, tok = load_model(folder)
    engine = Engine(model, tok, max_batch_size=4, score_prompts_every=0)
    engine.start()
    try:
        quiet = Service(engine, tok, "tiny", ServeConfig(auth=AuthConfig(allow_unauthenticated=True)))

        async def fn(client, http):
            full = await client.completions.create(model="tiny", prompt="the cat sat", max_tokens=4, echo=True,
                                                   temperature=0)
            plain = await client.completions.create(model="tiny", prompt="the cat sat", max_tokens=4, temperature=0)
            stream = await client.completions.create(model="tiny", prompt="the cat sat", max_tokens=4, echo=True,
                                                     temperature=0, stream=True)
            parts = [ch.text async for chunk in stream for ch in chunk.choices]
            return full, plain, parts
        full, plain, parts = call(quiet, fn)
    finally:
        engine.shutdown(5)
    assert full.choices[0].text == "the cat sat" + plain.choices[0].text
    assert full.choices[0].logprobs is None
    assert "".join(parts) == full.choices[0].text and parts[0] == "the cat sat"


def test_errors_are_openai_shaped(service):
    async def fn(client, http):
        errors = {}
        for name, kwargs in {
            "temperature": dict(model="tiny", prompt="x", temperature=9),
            "cap": dict(model="tiny", prompt="x", max_tokens=65),
            "context": dict(model="tiny", prompt="the " * 200, max_tokens=5),
            "model": dict(model="nope", prompt="x"),
        }.items():
            try:
                await client.completions.create(**kwargs)
            except openai.APIStatusError as e:
                errors[name] = e
        bad = openai.AsyncOpenAI(api_key="wrong", base_url="http://test/v1", http_client=http, max_retries=0)
        try:
            await bad.models.list()
        except openai.AuthenticationError as e:
            errors["auth"] = e
        big = await http.post("/v1/completions", content=b"{" + b" " * 5000 + b"}",
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        junk = await http.post("/v1/completions", content=b"not json",
                               headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        noauth = await http.get("/v1/models")
        return errors, big, junk, noauth
    errors, big, junk, noauth = call(service, fn)
    assert isinstance(errors["temperature"], openai.BadRequestError)
    assert errors["temperature"].body["param"] == "temperature"
    assert errors["cap"].status_code == 400 and errors["cap"].body["param"] == "max_tokens"
    assert errors["context"].status_code == 400 and errors["context"].body["code"] == "context_length_exceeded"
    assert isinstance(errors["model"], openai.NotFoundError) and errors["model"].body["code"] == "model_not_found"
    assert errors["auth"].status_code == 401
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert junk.status_code == 400 and set(junk.json()["error"]) == {"message", "type", "param", "code"}
    assert noauth.status_code == 401 and noauth.headers["www-authenticate"] == "Bearer"


def test_key_never_logged(service, caplog):
    async def fn(client, http):
        await http.get("/v1/models", headers={"Authorization": "Bearer sk-leak-me"})
    caplog.set_level("DEBUG")
    call(service, fn)
    assert "sk-leak-me" not in caplog.text and KEY not in caplog.text


def test_validation_error_names_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        CompletionRequest(model="m", prompt="x", top_p=0)
    err = validation_error(info.value.errors())
    assert err.status == 400 and err.param == "top_p" and json.dumps(err.body())


def test_overloaded_engine_answers_429_and_stopped_engine_503(builtin_service):
    service = builtin_service  # this test reaches into the built-in engine
    full = Service(Engine(service.engine.model, service.tokenizer, max_waiting=0), service.tokenizer, "tiny",
                   service.cfg)
    full.engine.start()
    stopped = Service(Engine(service.engine.model, service.tokenizer), service.tokenizer, "tiny", service.cfg)

    async def fn(client, http):
        errors = []
        for svc in (full, stopped):
            app = create_api(svc)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
                errors.append(await h.post("/v1/completions", json={"model": "tiny", "prompt": "x"},
                                           headers={"Authorization": f"Bearer {KEY}"}))
        return errors
    try:
        overloaded, unavailable = call(service, fn)
    finally:
        full.engine.shutdown(1)
    assert overloaded.status_code == 429 and overloaded.headers["retry-after"] == "1"
    assert overloaded.json()["error"]["type"] == "rate_limit_error"
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "1"


def test_build_app_checks_keys_and_the_switch_interval():
    from ray.serve import Application

    from llm_platform.errors import ConfigError
    from llm_platform.serve.app import build_app

    with pytest.raises(ConfigError, match=r"unknown config key serve.max_batch\b"):
        build_app({"model": "m", "max_batch": 8})
    with pytest.raises(ConfigError, match=r"unknown config key serve.engine.max_batch\b"):
        build_app({"model": "m", "engine": {"max_batch": 8}})
    with pytest.raises(ConfigError, match="serve.engine.gil_switch_interval_ms=-1"):
        build_app({"model": "m", "engine": {"gil_switch_interval_ms": -1}})
    assert isinstance(build_app({"model": "m", "engine": {"gil_switch_interval_ms": 0}}), Application)
    with pytest.raises(ConfigError, match="serve.engine.stream_interval_tokens=0"):
        build_app({"model": "m", "engine": {"stream_interval_tokens": 0}})
    with pytest.raises(ConfigError, match="serve.engine.stream_max_delay_ms=-5"):
        build_app({"model": "m", "engine": {"stream_max_delay_ms": -5}})
    with pytest.raises(ConfigError, match="serve.engine.stall_timeout_s=0"):
        build_app({"model": "m", "engine": {"stall_timeout_s": 0}})
    with pytest.raises(ConfigError, match="serve.engine.max_consecutive_failed_steps=0"):
        build_app({"model": "m", "engine": {"max_consecutive_failed_steps": 0}})
    assert isinstance(build_app({"model": "m", "engine": {"stall_timeout_s": None}}), Application)


def test_health_says_only_healthy_and_docs_need_the_key(service):
    async def fn(client, http):
        key = {"Authorization": f"Bearer {KEY}"}
        pages = {path: ((await http.get(path)), (await http.get(path, headers=key)))
                 for path in ("/openapi.json", "/docs", "/redoc")}
        return (await http.get("/health")), pages
    health, pages = call(service, fn)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # no model id, no queue depths
    for path, (anonymous, keyed) in pages.items():
        assert anonymous.status_code == 401, path
        assert anonymous.json()["error"]["code"] == "invalid_api_key", path
        assert keyed.status_code == 200, path
    assert "/v1/completions" in pages["/openapi.json"][1].json()["paths"]
    assert "/openapi.json" in pages["/docs"][1].text and "/openapi.json" in pages["/redoc"][1].text


def test_prompt_count_and_generation_budget_are_capped(service):
    import dataclasses

    small = Service(service.engine, service.tokenizer, "tiny",
                    dataclasses.replace(service.cfg, limits=dataclasses.replace(
                        service.cfg.limits, max_prompts_per_request=4, max_generated_tokens_per_request=100)))

    async def fn(client, http):
        app = create_api(small)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"Authorization": f"Bearer {KEY}"}) as h:
            async def post(path, **body):
                return await h.post(path, json={"model": "tiny", **body})
            return {
                "five_prompts": await post("/v1/completions", prompt=["the cat"] * 5, max_tokens=1),
                "four_prompts": await post("/v1/completions", prompt=["the cat"] * 4, max_tokens=2),
                "token_prompts": await post("/v1/completions", prompt=[[5, 6]] * 5, max_tokens=1),
                "budget": await post("/v1/completions", prompt=["a", "b"], n=4, max_tokens=13),  # 2 x 4 x 13 = 104
                "at_budget": await post("/v1/completions", prompt=["a", "b"], n=2, max_tokens=25),  # 100
                "chat_budget": await post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                                          n=8, max_tokens=13),  # 8 x 13 = 104
                # No max_tokens: chat defaults to the rest of the context (capped at 64): 2 x 64 > 100.
                "chat_default": await post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                                           n=2),
            }
    r = call(service, fn)
    for name in ("five_prompts", "token_prompts"):
        assert r[name].status_code == 400, name
        assert r[name].json()["error"] == {"message": "5 prompts in one request exceed this server's limit of 4 "
                                                      "prompts per request", "type": "invalid_request_error",
                                           "param": "prompt", "code": "too_many_prompts"}
    assert r["four_prompts"].status_code == 200 and len(r["four_prompts"].json()["choices"]) == 4
    assert r["at_budget"].status_code == 200 and len(r["at_budget"].json()["choices"]) == 4
    for name in ("budget", "chat_budget", "chat_default"):
        error = r[name].json()["error"]
        assert r[name].status_code == 400 and error["code"] == "request_too_large", name
        assert error["param"] == "max_tokens" and "limit is 100 tokens per request" in error["message"], name


def test_fastapi_own_errors_are_openai_shaped(service):
    async def fn(client, http):
        key = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        nested = "[" * 1500 + "]" * 1500  # past json's recursion limit: FastAPI answers 400 {"detail": ...}
        return [await http.post("/v1/completions", content=f'{{"model": "tiny", "prompt": {nested}}}', headers=key),
                await http.get("/v1/no-such-route", headers=key),
                await http.get("/v1/completions", headers=key)]
    for response, status in zip(call(service, fn), (400, 404, 405)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text


def test_a_request_that_can_never_fit_the_kv_budget_is_a_400_naming_max_tokens(builtin_service):
    service = builtin_service  # this test reaches into the built-in engine
    small = Service(Engine(service.engine.model, service.tokenizer, max_batch_tokens=40), service.tokenizer, "tiny",
                    service.cfg)
    small.engine.start()

    async def fn(client, http):
        app = create_api(small)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            headers = {"Authorization": f"Bearer {KEY}"}
            too_big = await h.post("/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 32,
                                                             "n": 2}, headers=headers)
            fits = await h.post("/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 8},
                                headers=headers)
        return too_big, fits
    try:
        too_big, fits = call(service, fn)
    finally:
        small.engine.shutdown(1)
    assert too_big.status_code == 400, too_big.text
    error = too_big.json()["error"]
    assert error["param"] == "max_tokens" and "40 tokens" in error["message"]
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] <= 8


LEAK = ("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity; 61.2 GiB already "
        "allocated); key states of shape [64, 32, 4096, 128]")


def test_5xx_bodies_are_generic_with_an_error_id_that_the_log_has_in_full(builtin_service, caplog):
    """Issue #24: the 503 body carried the raw torch exception (shapes, CUDA memory statistics). Now a step that
    fails before the response starts (503), one that fails mid-stream (in-band) and a bug in a route (500) all answer
    `internal error (id ...)`, and the replica's log has the exception under that id."""
    service = builtin_service  # this test reaches into the built-in engine
    import re

    eng = Engine(service.engine.model, service.tokenizer, max_batch_size=4, score_prompts_every=0,
                 max_consecutive_failed_steps=100)
    real, mode = eng.runner.forward, {"fail": "all"}

    def failing(input_ids, mask, cache, all_positions=False):
        decode = cache is not None and cache is eng.runner.cache
        if mode["fail"] == "all" or (mode["fail"] == "decode" and decode):
            raise RuntimeError(LEAK)
        return real(input_ids, mask, cache, all_positions)

    eng.runner.forward = failing
    eng.start()
    broken = Service(eng, service.tokenizer, "tiny", service.cfg)

    def bug(prompt, param="prompt"):
        raise KeyError(f"/srv/models/tiny/tokenizer.json: {LEAK}")

    buggy = Service(service.engine, service.tokenizer, "tiny", service.cfg)
    buggy.encode_prompt = bug

    async def fn(client, http):
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 6, "temperature": 0}
        out = {}
        for name, svc in (("engine", broken), ("route", buggy)):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_api(svc)), base_url="http://t",
                                         headers=headers) as h:
                out[name] = await h.post("/v1/completions", json=body)
                if name == "engine":
                    mode["fail"] = "decode"
                    out["stream"] = await h.post("/v1/completions", json={**body, "stream": True})
        return out

    try:
        r = call(service, fn)
    finally:
        eng.shutdown(1)
    assert r["engine"].status_code == 503 and r["engine"].headers["retry-after"] == "1"
    assert r["route"].status_code == 500
    assert r["stream"].status_code == 200
    events = [json.loads(line[6:]) for line in r["stream"].text.splitlines() if line.startswith("data: {")]
    assert events[0].get("choices") and any("error" in e for e in events)  # the first token, then the error in-band
    errors = [r["engine"].json()["error"], r["route"].json()["error"], next(e["error"] for e in events if "error" in e)]
    logged = "\n".join(f"{rec.getMessage()} {rec.exc_info[1] if rec.exc_info else ''}" for rec in caplog.records)
    for error in errors:
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        found = re.fullmatch(r"internal error \(id ([0-9a-f]{12})\)", error["message"])
        assert found, error
        line = next(line for line in logged.splitlines() if found.group(1) in line)
        assert "Tried to allocate 20.00 GiB" in line  # the details, in the log only
    for response in (r["engine"], r["route"], r["stream"]):
        assert "GiB" not in response.text and "shape" not in response.text and "/srv" not in response.text


def test_build_app_checks_the_vllm_keys():
    """`serve.engine.vllm.*` are checked on the driver, naming the key (vLLM itself is only imported in replicas)."""
    from ray.serve import Application

    from llm_platform.errors import ConfigError
    from llm_platform.serve.app import build_app

    def vllm(**keys):
        return {"model": "m", "engine": {"backend": "vllm", **keys.pop("engine", {}), "vllm": keys}}

    with pytest.raises(ConfigError, match="serve.engine.vllm.tensor_parallel_size=0"):
        build_app(vllm(tensor_parallel_size=0))
    with pytest.raises(ConfigError, match="serve.engine.vllm.gpu_memory_utilization=1.5"):
        build_app(vllm(gpu_memory_utilization=1.5))
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 but serve.deployment.num_gpus_per_replica=1"):
        build_app({**vllm(tensor_parallel_size=2, engine={"device": "cuda"}),
                   "deployment": {"num_gpus_per_replica": 1}})
    with pytest.raises(ConfigError, match=r"serve.engine.vllm.lora_adapters.\.\./x"):
        build_app(vllm(lora_adapters={"../x": "registry:a"}))
    with pytest.raises(ConfigError, match=r"unknown config key serve.engine.vllm.tp\b"):
        build_app(vllm(tp=2))
    assert isinstance(build_app({**vllm(tensor_parallel_size=2, engine={"device": "cuda"}),
                                 "deployment": {"num_gpus_per_replica": 2}}), Application)
