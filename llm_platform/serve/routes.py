"""The OpenAI-compatible FastAPI app over an `Engine`: routes, SSE streaming, errors. No Ray. API keys and the
fail-closed rule are in `auth.py`, request size limits in `limits.py`.

`app.py` wraps `create_api(get_service)` as a Ray Serve ingress; unit tests drive the same app in-process.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from functools import lru_cache
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_platform.config.serve import ServeConfig
from llm_platform.serve import auth, ingress, limits
from llm_platform.serve.api import (DEFAULT_CHAT_TEMPLATE, APIError, ChatCompletionRequest, CompletionRequest,
                                    error_body, validation_error)
from llm_platform.serve.engine import (Engine, EngineOverloaded, EngineStopped, RequestOutput, RequestTooLarge,
                                       TokenLogprob)
from llm_platform.serve.sampling import SamplingParams

log = logging.getLogger(__name__)
# `code` of FastAPI's own errors in OpenAI's shape.
_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}


class Service:
    """Everything a request needs: engine, tokenizer, served model id, limits, keys and an optional monitor."""

    def __init__(self, engine: Engine, tokenizer, model_id: str, cfg: ServeConfig, monitor=None, metrics=None):
        self.engine, self.tokenizer, self.model_id, self.cfg = engine, tokenizer, model_id, cfg
        self.monitor, self.metrics = monitor, metrics
        self.api_keys = auth.load_api_keys(cfg)
        self.created = int(time.time())
        self.token_text = lru_cache(maxsize=65536)(lambda i: tokenizer.decode([i]))

    def check_key(self, authorization: str | None) -> None:
        """Raise 401 unless no key is configured (a loopback endpoint, or `serve.allow_unauthenticated`) or the
        Bearer token equals one of them (constant-time compare)."""
        if self.api_keys and not auth.authorized(self.api_keys, authorization):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"model {model!r} is not served here; available: {self.model_id!r}",
                           type="invalid_request_error", param="model", code="model_not_found")

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            if not ids:  # an empty prompt still needs a first token to condition on
                ids = [self.tokenizer.eos_token_id]
            return ids
        vocab = len(self.tokenizer)
        if any(i < 0 or i >= vocab for i in prompt):
            raise APIError(400, f"{param}: token ids must be in [0, {vocab})", param=param, code="invalid_value")
        return list(prompt)

    def sampling(self, req, prompt_len: int, max_tokens: int | None, default: int | None, logprobs: int | None,
                 echo: bool) -> SamplingParams:
        """Validate limits and build the engine's parameters (400 naming the field on any violation)."""
        context = self.engine.max_positions
        if max_tokens is not None and max_tokens > self.cfg.max_tokens_cap:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's cap of {self.cfg.max_tokens_cap}",
                           param="max_tokens", code="invalid_value")
        if req.n > self.engine.max_batch_size:
            raise APIError(400, f"n={req.n} exceeds this server's batch size of {self.engine.max_batch_size}",
                           param="n", code="invalid_value")
        if prompt_len >= context:
            raise APIError(400, f"prompt has {prompt_len} tokens; this model's context length is {context}",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default or context, context - prompt_len, self.cfg.max_tokens_cap)
        if prompt_len + max_tokens > context:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                           f"context length of {context}", param="max_tokens", code="context_length_exceeded")
        if self.engine.footprint(req.n, prompt_len + max_tokens) > self.engine.max_batch_tokens:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) x n ({req.n}) needs more "
                           f"KV cache than this server holds ({self.engine.max_batch_tokens} tokens)",
                           param="max_tokens", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=max(req.top_k, 0), stop=req.stop or [], seed=req.seed, n=req.n,
                              logprobs=logprobs, echo=echo, ignore_eos=req.ignore_eos)

    async def run(self, prompt_ids: list[int], params: SamplingParams,
                  stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Engine events, with overload and shutdown mapped to 429/503 and metrics recorded. `stream=False` (a
        non-streamed response): the first token's event, then the rest in one event at the end."""
        # max_tokens=0 (score the prompt only, as eval harnesses do with echo): generate one token and drop it.
        engine_params = params if params.max_tokens else SamplingParams(**{**params.__dict__, "max_tokens": 1})
        start, first = time.perf_counter(), None
        generated = 0
        try:
            async for out in self.engine.generate(prompt_ids, engine_params, stream, self.cfg.stream_interval_tokens,
                                                  self.cfg.stream_max_delay_ms / 1000):
                if out.error:
                    raise APIError(503, out.error, type="server_error", code="engine_error",
                                   headers={"Retry-After": str(self.cfg.retry_after_s)})
                if first is None:
                    first = time.perf_counter()
                    if self.monitor is not None:  # every prompt's tokens; the log-probs of those scored
                        self.monitor.observe_prompt(prompt_ids, [t.logprob for t in (out.prompt_logprobs or [])[1:]])
                if not params.max_tokens:
                    for d in out.deltas:
                        d.text, d.tokens, d.finish_reason = "", [], "length"
                generated += sum(len(d.tokens) for d in out.deltas)
                yield out
        except EngineOverloaded as e:
            raise APIError(429, f"server overloaded: {e}; retry later", type="rate_limit_error",
                           code="overloaded", headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        except RequestTooLarge as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except EngineStopped as e:
            raise APIError(503, f"server unavailable: {e}", type="server_error", code="unavailable",
                           headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        if self.metrics is not None:
            end = time.perf_counter()
            self.metrics.observe_generation(end - start, (first or end) - start, generated)

    # ------------------------------------------------------------------ logprob shapes
    def completion_logprobs(self, tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
        texts = [self.token_text(t.token_id) for t in tokens]
        offsets, pos = [], offset
        for text in texts:
            offsets.append(pos)
            pos += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [None if t.logprob is None else {self.token_text(i): lp for i, lp in t.top}
                                 for t in tokens],
                "text_offset": offsets}

    def chat_logprobs(self, tokens: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}


def _schema_url(request: Request) -> str:
    """/openapi.json under the app's route prefix (Serve's `route_prefix` arrives as the ASGI root_path)."""
    return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _first_event(events: AsyncIterator[RequestOutput]) -> tuple[RequestOutput | None, AsyncIterator]:
    """Pull the first event before the response starts, so 429/503/400 still become proper status codes."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    return first, events


async def _chain(first: RequestOutput | None, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    if first is not None:
        yield first
    async for out in rest:
        yield out


def create_api(get_service: Callable[[], Service]) -> FastAPI:
    """The FastAPI app; `get_service` returns the replica's `Service` (looked up per request)."""
    app = FastAPI(title="llm-platform OpenAI-compatible API", version="1", openapi_url=None, docs_url=None,
                  redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        _count(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = validation_error(list(exc.errors()))
        _count(400)
        return JSONResponse(err.body(), status_code=400)

    # FastAPI's own errors (a body it cannot parse, such as JSON nested too deep; an unknown route; a wrong method)
    # would be `{"detail": ...}`: the same OpenAI shape as every other error instead.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        _count(exc.status_code)
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, code=_HTTP_CODES.get(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def _count(status: int) -> None:
        try:
            metrics = get_service().metrics
        except Exception:
            return
        if metrics is not None:
            metrics.count_request(status)

    async def auth(request: Request) -> Service:
        service = get_service()
        service.check_key(request.headers.get("authorization"))
        return service

    # Unauthenticated (load balancers and probes call it), so it says healthy or not and nothing else: no model
    # id or queue depths for an anonymous caller (those are in /v1/monitoring, behind the key).
    @app.get("/health")
    async def health():
        service = get_service()
        if not service.engine.healthy():
            raise APIError(503, "unhealthy", type="server_error", code="unhealthy",
                           headers={"Retry-After": str(service.cfg.retry_after_s)})
        return {"status": "ok"}

    # The schema and its two viewers need the key whenever keys are set (FastAPI's own routes for them take no
    # dependencies, hence these). The pages load /openapi.json from the browser, which then needs the same header.
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(service: Service = Depends(auth)):
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request, service: Service = Depends(auth)):
        return get_swagger_ui_html(openapi_url=_schema_url(request), title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request, service: Service = Depends(auth)):
        return get_redoc_html(openapi_url=_schema_url(request), title=f"{app.title} - ReDoc")

    @app.get("/v1/models")
    async def models(service: Service = Depends(auth)):
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "llm-platform"}]}

    @app.get("/v1/monitoring")
    async def monitoring(service: Service = Depends(auth)):
        engine = service.engine
        report = {"model": service.model_id, "engine": {"healthy": engine.healthy(), "waiting": engine.num_waiting(),
                                                        "running": engine.num_running(), **engine.stats},
                  # How this replica process runs the app (what the serve config's replica settings became).
                  "replica": {"gil_switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),
                              "stream_interval_tokens": service.cfg.stream_interval_tokens,
                              "ingress": ingress.active()}}
        if service.monitor is not None:
            report["drift"] = service.monitor.report()
        return report

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, service: Service = Depends(auth)):
        service.check_model(body.model)
        prompts = body.prompts()
        limits.check_prompt_count(service.cfg, len(prompts))
        if body.stream and len(prompts) > 1:
            raise APIError(400, "stream supports a single prompt", param="prompt", code="invalid_value")
        encoded = [service.encode_prompt(p) for p in prompts]
        params = [service.sampling(body, len(ids), body.max_tokens, service.cfg.default_max_tokens, body.logprobs,
                                   body.echo) for ids in encoded]
        limits.check_generation_budget(service.cfg, body.n, [sp.max_tokens for sp in params])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": service.model_id}

        def prompt_part(ids: list[int], out: RequestOutput) -> tuple[str, dict | None]:
            text = service.tokenizer.decode(ids) if body.echo else ""
            lp = service.completion_logprobs(out.prompt_logprobs, 0) if body.echo and body.logprobs is not None \
                and out.prompt_logprobs else None
            return text, lp

        if body.stream:
            first, events = await _first_event(service.run(encoded[0], params[0]))

            async def stream():
                completion, offsets = 0, {}
                try:
                    async for out in _chain(first, events):
                        if out.prompt_logprobs is not None and body.echo:
                            text, lp = prompt_part(encoded[0], out)
                            for i in range(body.n):
                                offsets[i] = len(text)
                                yield _sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                                 "finish_reason": None}]})
                        for d in out.deltas:
                            completion += len(d.tokens)
                            lp = service.completion_logprobs(d.tokens, offsets.get(d.index, 0)) \
                                if body.logprobs is not None else None
                            offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
                            yield _sse({**head, "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
                                                             "finish_reason": d.finish_reason}]})
                except APIError as e:  # after the headers went out: report in-band, as OpenAI does
                    yield _sse(e.body())
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(len(encoded[0]), completion)})
                yield "data: [DONE]\n\n"

            _count(200)
            return StreamingResponse(stream(), media_type="text/event-stream")

        choices, completion = [], 0
        for p, (ids, sp) in enumerate(zip(encoded, params)):
            texts = {i: "" for i in range(body.n)}
            tokens: dict[int, list[TokenLogprob]] = {i: [] for i in range(body.n)}
            reasons: dict[int, str | None] = {i: None for i in range(body.n)}
            prefix, prompt_lp = "", None
            async for out in service.run(ids, sp, stream=False):
                if out.prompt_logprobs is not None:
                    prefix, prompt_lp = prompt_part(ids, out)
                for d in out.deltas:
                    texts[d.index] += d.text
                    tokens[d.index] += d.tokens
                    reasons[d.index] = d.finish_reason or reasons[d.index]
            for i in range(body.n):
                completion += len(tokens[i])
                lp = None
                if body.logprobs is not None:
                    lp = service.completion_logprobs(tokens[i], len(prefix))
                    if prompt_lp:
                        lp = {k: prompt_lp[k] + lp[k] for k in lp}
                choices.append({"index": p * body.n + i, "text": prefix + texts[i], "logprobs": lp,
                                "finish_reason": reasons[i]})
        _count(200)
        return {**head, "choices": choices, "usage": _usage(sum(map(len, encoded)), completion)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, service: Service = Depends(auth)):
        service.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        template = None if getattr(service.tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
        prompt = service.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                       add_generation_prompt=True)
        ids = service.encode_prompt(prompt, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = service.sampling(body, len(ids), body.max_completion_tokens or body.max_tokens, None, top, False)
        limits.check_generation_budget(service.cfg, body.n, [params.max_tokens])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": service.model_id}

        if body.stream:
            first, events = await _first_event(service.run(ids, params))

            async def stream():
                completion = 0
                chunk = {**head, "object": "chat.completion.chunk"}
                for i in range(body.n):
                    yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
                try:
                    async for out in _chain(first, events):
                        for d in out.deltas:
                            completion += len(d.tokens)
                            lp = service.chat_logprobs(d.tokens) if body.logprobs else None
                            delta = {"content": d.text} if d.text or not d.finish_reason else {}
                            yield _sse({**chunk, "choices": [{"index": d.index, "delta": delta, "logprobs": lp,
                                                              "finish_reason": d.finish_reason}]})
                except APIError as e:
                    yield _sse(e.body())
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(len(ids), completion)})
                yield "data: [DONE]\n\n"

            _count(200)
            return StreamingResponse(stream(), media_type="text/event-stream")

        texts = {i: "" for i in range(body.n)}
        tokens: dict[int, list[TokenLogprob]] = {i: [] for i in range(body.n)}
        reasons: dict[int, str | None] = {i: None for i in range(body.n)}
        async for out in service.run(ids, params, stream=False):
            for d in out.deltas:
                texts[d.index] += d.text
                tokens[d.index] += d.tokens
                reasons[d.index] = d.finish_reason or reasons[d.index]
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": service.chat_logprobs(tokens[i]) if body.logprobs else None,
                    "finish_reason": reasons[i]} for i in range(body.n)]
        _count(200)
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": _usage(len(ids), sum(len(t) for t in tokens.values()))}

    app.add_middleware(limits.BodySizeLimit, max_bytes_getter=lambda: get_service().cfg.max_request_bytes)
    return app
