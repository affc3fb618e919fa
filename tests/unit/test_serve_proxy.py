"""The proxy middleware that gives Serve's own plain-text errors OpenAI's shape (no Ray: a stand-in ASGI app)."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from llm_platform.serve.proxy import OpenAIErrorShape, middlewares


async def _plain(request):
    status = int(request.path_params["status"])
    headers = {"Retry-After": "7"} if request.query_params.get("retry") else {}
    return PlainTextResponse(f"plain {status} from the proxy", status_code=status, headers=headers)


async def _json(request):
    return JSONResponse({"error": {"message": "bad temperature", "type": "invalid_request_error",
                                   "param": "temperature", "code": None}}, status_code=400)


async def _stream(request):
    async def chunks():
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    return StreamingResponse(chunks(), media_type="text/event-stream")


APP = Starlette(routes=[Route("/plain/{status}", _plain), Route("/json", _json), Route("/stream", _stream)])


def get(path: str, app=APP) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=OpenAIErrorShape(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as c:
            return await c.get(path)

    return asyncio.run(go())


def test_dead_replica_500_becomes_retryable_503_in_openai_shape(caplog):
    r = get("/plain/500")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1" and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "replica_failed" and "the model replica failed" in err["message"]
    assert int(r.headers["content-length"]) == len(r.content)
    # Serve's text (it can carry the replica's exception) is not sent; the proxy's log has it under the error id.
    found = re.search(r"\(id ([0-9a-f]+)\)$", err["message"])
    assert found and "plain 500" not in err["message"]
    assert any(found.group(1) in m and "plain 500 from the proxy" in m for m in caplog.messages)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_no_5xx_body_carries_the_proxy_text(status):
    leak = "CUDA out of memory. Tried to allocate 2.00 GiB; tensor of shape [8, 12, 2048, 64]"
    app = Starlette(routes=[Route("/leak", lambda request: PlainTextResponse(leak, status_code=status))])
    r = get("/leak", app=app)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert "CUDA" not in r.text and "shape" not in r.text and "(id " in r.json()["error"]["message"]


async def _no_response(scope, receive, send):
    """What Serve 2.60's proxy does when the replica handling the request dies: it returns without a response."""


async def _raises(scope, receive, send):
    raise RuntimeError("proxy bug")


@pytest.mark.parametrize("app", [_no_response, _raises], ids=["no-response", "raises"])
def test_a_request_ended_without_a_response_gets_a_retryable_503(app):
    r = get("/v1/completions", app=app)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "replica_failed" and r.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize("status,kind,code", [(429, "rate_limit_error", "overloaded"),
                                              (503, "server_error", "unavailable")])
def test_backpressure_keeps_status_and_its_retry_after(status, kind, code):
    r = get(f"/plain/{status}?retry=1")
    assert r.status_code == status and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == kind and r.json()["error"]["code"] == code


def test_unknown_route_keeps_its_code_and_a_timeout_is_a_retryable_503():
    r = get("/plain/404")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "retry-after" not in r.headers
    # Serve's proxy answers 408 when serve.http.request_timeout_s runs out (and cancels the request)
    r = get("/plain/408")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "request_timeout" and r.json()["error"]["type"] == "timeout"


def test_app_json_errors_and_streams_pass_through_untouched():
    r = get("/json")
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = get("/stream")
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_callback_returns_starlette_middlewares():
    from starlette.middleware import Middleware

    (mw,) = middlewares()
    assert isinstance(mw, Middleware) and mw.cls is OpenAIErrorShape
