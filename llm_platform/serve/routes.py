"""The OpenAI-compatible FastAPI app over an `Engine`: routes, SSE streaming, errors. No Ray. API keys and the
fail-closed rule are in `auth.py`, request size limits in `limits.py`, what a request needs (engine, tokenizer,
checks) in `service.py`.

The handlers are module-level functions on one router, and each finds the replica's `Service` in its app's state:
`create_api(service)` builds the app around one. `app.py`'s replica builds it as its Ray Serve ingress; unit tests
drive the same app in-process. Completions and chat differ only in the shape of a choice: both gather a
non-streamed answer with `_collect` and stream through `_stream`. An exception nothing maps (a bug) becomes a generic
500 with an error id (`InternalErrors`), never its text.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_platform.serve import ingress, limits
from llm_platform.serve.api import (
    DEFAULT_CHAT_TEMPLATE,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    error_body,
    internal_error,
    validation_error,
)
from llm_platform.serve.engine import RequestOutput
from llm_platform.serve.sampling import TokenLogprob
from llm_platform.serve.service import Service

# `code` of FastAPI's own errors in OpenAI's shape.
_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
router = APIRouter()


def create_api(service: Service) -> FastAPI:
    """The FastAPI app of one replica's `service`."""
    app = FastAPI(title="llm-platform OpenAI-compatible API", version="1", openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.service = service
    app.include_router(router)
    # Starlette types a handler as taking any Exception; each of these is registered for its own class only.
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    # FastAPI's own errors (a body it cannot parse, such as JSON nested too deep; an unknown route; a wrong method)
    # would be `{"detail": ...}`: the same OpenAI shape as every other error instead.
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_middleware(limits.BodySizeLimit, max_bytes=service.cfg.limits.max_request_bytes)
    app.add_middleware(InternalErrors)  # added last: the outermost of ours, around the body limit too
    return app


class InternalErrors:
    """ASGI middleware: an exception no handler answered is logged in full under an error id and answered as a
    generic 500 in OpenAI's shape carrying only that id. Without it Starlette wrote a plain-text 500, and the
    exception itself reached Serve (whose proxy passed its text on) or uvicorn."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            error = internal_error(e, f"{scope.get('method')} {scope.get('path')}")
            if started:  # the response is under way: it can only end here (the stream's own errors go in-band)
                return
            _count(Request(scope), error.status)
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


# ---------------------------------------------------------------------- request plumbing
def _service(request: Request) -> Service:
    return request.app.state.service


async def _authorized(request: Request) -> Service:
    """The dependency of every route but /health: the replica's service, once the request's key is checked."""
    service = _service(request)
    service.check_key(request.headers.get("authorization"))
    return service


def _count(request: Request, status: int) -> None:
    metrics = _service(request).metrics
    if metrics is not None:
        metrics.count_request(status)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    _count(request, exc.status)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count(request, 400)
    return JSONResponse(validation_error(list(exc.errors())).body(), status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    _count(request, exc.status_code)
    if exc.status_code >= 500:
        error = internal_error(detail=f"{exc.status_code} {exc.detail}", status=exc.status_code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))
    return JSONResponse(error_body(str(exc.detail), code=_HTTP_CODES.get(exc.status_code)),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _schema_url(request: Request) -> str:
    """/openapi.json under the app's route prefix (Serve's `route_prefix` arrives as the ASGI root_path)."""
    return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------- what completions and chat share
@dataclass
class _Collected:
    """A non-streamed request's output, per choice index."""

    texts: list[str]
    tokens: list[list[TokenLogprob]]
    reasons: list[str | None]
    prompt_logprobs: list[TokenLogprob] | None = None


async def _collect(events: AsyncIterator[RequestOutput], n: int) -> _Collected:
    """Join the events of a request with `n` choices."""
    got = _Collected([""] * n, [[] for _ in range(n)], [None] * n)
    async for out in events:
        if out.prompt_logprobs is not None:
            got.prompt_logprobs = out.prompt_logprobs
        for d in out.deltas:
            got.texts[d.index] += d.text
            got.tokens[d.index] += d.tokens
            got.reasons[d.index] = d.finish_reason or got.reasons[d.index]
    return got


async def _stream(request: Request, events: AsyncIterator[RequestOutput], head: dict[str, Any], body,
                  prompt_tokens: int, choices: Callable[[RequestOutput], Iterator[dict[str, Any]]],
                  opening: list[dict[str, Any]] | None = None) -> StreamingResponse:
    """An SSE response: the `opening` choices, then `choices(event)` of each engine event, each as one chunk
    `{**head, "choices": [choice]}`, then the usage (when `stream_options.include_usage`) and `[DONE]`.

    The first event is awaited before the response starts, so 429/503/400 still become proper status codes; an error
    after the headers went out is reported in-band, as OpenAI does.
    """
    first = await anext(events, None)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        completion = 0
        for choice in opening or []:
            yield _sse({**head, "choices": [choice]})
        try:
            out = first
            while out is not None:
                completion += sum(len(d.tokens) for d in out.deltas)
                for choice in choices(out):
                    yield _sse({**head, "choices": [choice]})
                out = await anext(events, None)
        except APIError as e:
            yield _sse(e.body())
        except Exception as e:  # noqa: BLE001 - after the headers went out an error can only go in-band
            yield _sse(internal_error(e, "while streaming").body())
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion)})
        yield "data: [DONE]\n\n"

    _count(request, 200)
    return StreamingResponse(chunks(), media_type="text/event-stream")


# ---------------------------------------------------------------------- routes
# Unauthenticated (load balancers and probes call it), so it says healthy or not and nothing else: no model id or
# queue depths for an anonymous caller (those are in /v1/monitoring, behind the key).
@router.get("/health")
async def health(request: Request):
    service = _service(request)
    if not service.engine.healthy():
        raise APIError(503, "unhealthy", type="server_error", code="unhealthy",
                       headers={"Retry-After": str(service.cfg.deployment.retry_after_s)})
    return {"status": "ok"}


# The schema and its two viewers need the key whenever keys are set (FastAPI's own routes for them take no
# dependencies, hence these). The pages load /openapi.json from the browser, which then needs the same header.
@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, service: Service = Depends(_authorized)):
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(request: Request, service: Service = Depends(_authorized)):
    return get_swagger_ui_html(openapi_url=_schema_url(request), title=f"{request.app.title} - docs")


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request, service: Service = Depends(_authorized)):
    return get_redoc_html(openapi_url=_schema_url(request), title=f"{request.app.title} - ReDoc")


@router.get("/v1/models")
async def models(service: Service = Depends(_authorized)):
    return {"object": "list", "data": [{"id": m, "object": "model", "created": service.created,
                                        "owned_by": "llm-platform"} for m in service.model_ids]}


@router.get("/v1/monitoring")
async def monitoring(service: Service = Depends(_authorized)):
    engine = service.engine
    report = {"model": service.model_id, "engine": {"healthy": engine.healthy(), "waiting": engine.num_waiting(),
                                                    "running": engine.num_running(), **engine.stats},
              # How this replica process runs the app (what the serve config's replica settings became).
              "replica": {"gil_switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
                          "stream_interval_tokens": service.cfg.engine.stream_interval_tokens,
                          "ingress": ingress.active()}}
    if service.monitor is not None:
        report["drift"] = service.monitor.report()
    return report


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, service: Service = Depends(_authorized)):
    lora = service.check_model(body.model)
    prompts = body.prompts()
    limits.check_prompt_count(service.cfg.limits, len(prompts))
    if body.stream and len(prompts) > 1:
        raise APIError(400, "stream supports a single prompt", param="prompt", code="invalid_value")
    encoded = [service.encode_prompt(p) for p in prompts]
    params = [service.sampling(body, len(ids), body.max_tokens, service.cfg.limits.default_max_tokens, body.logprobs,
                               body.echo) for ids in encoded]
    limits.check_generation_budget(service.cfg.limits, body.n, [sp.max_tokens for sp in params])
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        return await _stream(request, service.run(encoded[0], params[0], lora=lora), head, body, len(encoded[0]),
                             _completion_choices(service, body, encoded[0]))
    choices, completion = [], 0
    for p, (ids, sp) in enumerate(zip(encoded, params)):
        got = await _collect(service.run(ids, sp, stream=False, lora=lora), body.n)
        prefix, prompt_lp = _echo(service, body, ids, got.prompt_logprobs)
        for i in range(body.n):
            completion += len(got.tokens[i])
            lp = None
            if body.logprobs is not None:
                lp = service.completion_logprobs(got.tokens[i], len(prefix))
                if prompt_lp:
                    lp = {k: prompt_lp[k] + lp[k] for k in lp}
            choices.append({"index": p * body.n + i, "text": prefix + got.texts[i], "logprobs": lp,
                            "finish_reason": got.reasons[i]})
    _count(request, 200)
    return {**head, "choices": choices, "usage": _usage(sum(map(len, encoded)), completion)}


def _echo(service: Service, body: CompletionRequest, ids: list[int],
          prompt_logprobs: list[TokenLogprob] | None) -> tuple[str, dict | None]:
    """The echoed prompt's text ("" without `echo`) and its log-probs (None unless `echo` with `logprobs`: the
    engine computes a prompt's log-probs only for those, and for the drift monitor's sample of prompts)."""
    text = service.tokenizer.decode(ids) if body.echo else ""
    lp = service.completion_logprobs(prompt_logprobs, 0) if body.echo and body.logprobs is not None \
        and prompt_logprobs else None
    return text, lp


def _completion_choices(service: Service, body: CompletionRequest, ids: list[int]
                        ) -> Callable[[RequestOutput], Iterator[dict[str, Any]]]:
    """The streamed completion choices of each event (the echoed prompt first); keeps each choice's text offset."""
    offsets: dict[int, int] = {}
    echoed = [not body.echo]

    def choices(out: RequestOutput) -> Iterator[dict[str, Any]]:
        if not echoed[0]:  # the first event (it carries the prompt's log-probs when they were asked for)
            echoed[0] = True
            text, lp = _echo(service, body, ids, out.prompt_logprobs)
            for i in range(body.n):
                offsets[i] = len(text)
                yield {"index": i, "text": text, "logprobs": lp, "finish_reason": None}
        for d in out.deltas:
            lp = service.completion_logprobs(d.tokens, offsets.get(d.index, 0)) if body.logprobs is not None else None
            offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
            yield {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}

    return choices


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request, service: Service = Depends(_authorized)):
    lora = service.check_model(body.model)
    ids = service.encode_prompt(_chat_prompt(service.tokenizer, body.messages), "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = service.sampling(body, len(ids), body.max_completion_tokens or body.max_tokens, None, top, False)
    limits.check_generation_budget(service.cfg.limits, body.n, [params.max_tokens])
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(body.n)]
        return await _stream(request, service.run(ids, params, lora=lora), {**head, "object": "chat.completion.chunk"},
                             body, len(ids), partial(_chat_choices, service, body), opening)
    got = await _collect(service.run(ids, params, stream=False, lora=lora), body.n)
    choices = [{"index": i, "message": {"role": "assistant", "content": got.texts[i]},
                "logprobs": service.chat_logprobs(got.tokens[i]) if body.logprobs else None,
                "finish_reason": got.reasons[i]} for i in range(body.n)]
    _count(request, 200)
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": _usage(len(ids), sum(len(t) for t in got.tokens))}


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The conversation through the tokenizer's chat template (ours when it has none), ready for the reply."""
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                         chat_template=template, tokenize=False, add_generation_prompt=True)


def _chat_choices(service: Service, body: ChatCompletionRequest, out: RequestOutput) -> Iterator[dict[str, Any]]:
    """The streamed chat choices of one event."""
    for d in out.deltas:
        lp = service.chat_logprobs(d.tokens) if body.logprobs else None
        delta = {"content": d.text} if d.text or not d.finish_reason else {}
        yield {"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
