"""Engine health (llm_platform/serve/health.py): a failed step fails only its requests, repeated failures or a device
error mark the engine failed, a stalled step with work pending makes it unhealthy while it lasts, and Serve's health
check (`OpenAIServer.check_health`) and `/health` say so. No Ray: the replica's method is called on a stand-in."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from fixtures.serving import build_tiny_model

from llm_platform.serve.engine import Engine, EngineStopped, load_model
from llm_platform.serve.health import StepHealth
from llm_platform.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = load_model(build_tiny_model(tmp_path_factory.mktemp("tiny")))
    return model, tok


async def serve_health_check(engine) -> str | None:
    """What Serve's periodic health check of the replica raises (None: it passes)."""
    from llm_platform.serve.app import OpenAIServer

    try:
        await OpenAIServer.func_or_class.check_health(SimpleNamespace(engine=engine))
    except RuntimeError as e:
        return str(e)
    return None


def check_health(engine) -> str | None:
    return asyncio.run(serve_health_check(engine))


async def collect(engine, ids, max_tokens=6):
    tokens, error = [], None
    async for out in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
        tokens += [t.token_id for d in out.deltas for t in d.tokens]
        error = out.error or error
    return tokens, error


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_step_health_counts_failures_in_a_row_and_stalls_only_with_work_pending():
    health = StepHealth(stall_timeout_s=0.05, max_consecutive_failed_steps=2)
    health.step_failed(RuntimeError("one"))
    health.iteration_done(did_work=False)  # an idle iteration does not end a run of failures
    assert health.problem(work_pending=False) is None and health.consecutive_failures == 1
    health.iteration_done(did_work=True)
    assert health.consecutive_failures == 0
    health.step_failed(RuntimeError("two"))
    health.step_failed(RuntimeError("three"))
    assert "2 engine steps in a row failed" in health.problem(work_pending=False)
    assert "three" in health.fatal_error

    stalled = StepHealth(stall_timeout_s=0.05)
    stalled.last_step_s -= 0.1  # the last iteration ended 0.1 s ago
    assert stalled.problem(work_pending=False) is None  # idle: nothing to be late for
    assert "serve.engine.stall_timeout_s=0.05" in stalled.problem(work_pending=True)
    assert StepHealth(stall_timeout_s=None).problem(work_pending=True) is None

    device = StepHealth(max_consecutive_failed_steps=100)
    device.step_failed(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert device.fatal_error is None  # out of memory: the next, smaller batch may well fit
    device.step_failed(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert device.fatal_error and "unusable" in device.fatal_error


def test_repeated_step_failures_make_the_replica_unhealthy(tiny):
    """Before: `fatal_error` was never set, so a replica whose every step raised kept passing Serve's health check
    and was never replaced."""
    model, tok = tiny
    eng = Engine(model, tok, max_batch_size=4, score_prompts_every=0, max_consecutive_failed_steps=2)

    def broken(*args, **kwargs):
        raise RuntimeError("weights on the wrong device")

    eng.runner.forward = broken
    eng.start()
    try:
        first = asyncio.run(asyncio.wait_for(collect(eng, [5, 6, 7]), 30))
        assert first[1] and eng.healthy() and check_health(eng) is None  # one failure: only its request fails
        second = asyncio.run(asyncio.wait_for(collect(eng, [5, 6, 7]), 30))
        assert second[1] and not eng.healthy()
        reason = check_health(eng)
        assert reason and "2 engine steps in a row failed" in reason and "weights on the wrong device" in reason
        with pytest.raises(EngineStopped):
            asyncio.run(collect(eng, [5, 6, 7]))
    finally:
        eng.shutdown(drain_timeout_s=1)
    assert eng.stats["failed_steps"] == 2


def a_then_b_with_a_failing_decode(eng, error: Exception):
    """One row at a time: A runs, B waits for its slot; A's second decode raises `error` (the forward pass fails
    once). Returns ((A's tokens, A's error), (B's tokens, B's error))."""
    real, calls, a_decoding, b_submitted = eng.runner.forward, [0], threading.Event(), threading.Event()

    def fails_at_the_second_decode(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # A's first decode: hold it until B waits
            a_decoding.set()
            b_submitted.wait(10)
        if calls[0] == 3:
            raise error
        return real(*args, **kwargs)

    eng.runner.forward = fails_at_the_second_decode
    eng.start()

    async def both():
        a = asyncio.ensure_future(collect(eng, [5, 6, 7]))
        await asyncio.to_thread(a_decoding.wait, 10)
        b = asyncio.ensure_future(collect(eng, [8, 9]))
        while not eng.num_waiting():  # B submitted (a step on this loop) and queued for A's slot
            await asyncio.sleep(0)
        b_submitted.set()
        return await a, await b
    return asyncio.run(asyncio.wait_for(both(), 60))


def test_a_failed_step_fails_only_the_requests_in_it(tiny):
    """One row at a time: A runs, B waits for its slot. A decode step of A fails: A gets an error, B, which was not
    in the step, still runs to the end (before, every waiting request was failed too), and the successful steps
    after it end the run of failures."""
    model, tok = tiny
    eng = Engine(model, tok, max_batch_size=1, score_prompts_every=0)
    try:
        (_, a_error), (b_tokens, b_error) = a_then_b_with_a_failing_decode(eng, RuntimeError("boom"))
    finally:
        eng.shutdown(drain_timeout_s=5)
    assert a_error and "boom" not in a_error
    assert b_error is None and b_tokens == hf_greedy(model, [8, 9], 6)
    assert eng.health.consecutive_failures == 0 and eng.fatal_error is None


def test_a_device_error_fails_the_engine_and_its_waiting_requests_at_once(tiny):
    model, tok = tiny
    eng = Engine(model, tok, max_batch_size=1, score_prompts_every=0, max_consecutive_failed_steps=100)
    try:
        error = RuntimeError("CUDA error: an illegal memory access was encountered")
        (_, a_error), (_, b_error) = a_then_b_with_a_failing_decode(eng, error)
        assert a_error and b_error and "CUDA" not in b_error
        assert "unusable" in check_health(eng)
    finally:
        eng.shutdown(drain_timeout_s=1)


def test_a_stalled_step_with_work_pending_fails_the_health_check(tiny):
    """Before: `last_step_s` was never read; a step that hung (a stuck device) kept the replica healthy."""
    model, tok = tiny
    eng = Engine(model, tok, max_batch_size=4, score_prompts_every=0, stall_timeout_s=0.3)
    real, calls, entered, release = eng.runner.forward, [0], threading.Event(), threading.Event()

    def hangs_at_the_first_decode(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            entered.set()
            release.wait(30)
        return real(*args, **kwargs)

    eng.runner.forward = hangs_at_the_first_decode
    eng.start()
    try:
        eng.health.last_step_s -= 1.0  # idle for longer than the limit: fine
        assert eng.healthy() and check_health(eng) is None

        async def go():
            task = asyncio.ensure_future(collect(eng, [5, 6, 7]))
            await asyncio.to_thread(entered.wait, 30)
            eng.health.last_step_s -= 1.0  # the hung step began a second ago (past stall_timeout_s=0.3)
            stalled = (eng.healthy(), await serve_health_check(eng), await health_route(eng))
            release.set()
            result = await task
            # the step that sent the last token ends (and leaves no work pending) soon after
            await asyncio.to_thread(eng.wait_idle, 10)
            return stalled, result, eng.healthy()
        (healthy, reason, route), (tokens, error), recovered = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        release.set()
        eng.shutdown(drain_timeout_s=5)
    assert not healthy and reason and "serve.engine.stall_timeout_s=0.3" in reason
    assert route == 503
    assert error is None and tokens == hf_greedy(model, [5, 6, 7], 6)  # it was slow, not broken
    assert recovered


async def health_route(engine) -> int:
    """The status of the app's unauthenticated `/health` over this engine."""
    import httpx

    from llm_platform.config.serve import AuthConfig, ServeConfig
    from llm_platform.serve.routes import Service, create_api

    service = Service(engine, engine.tokenizer, "tiny", ServeConfig(auth=AuthConfig(allow_unauthenticated=True)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_api(service)), base_url="http://t") as h:
        return (await h.get("/health")).status_code
