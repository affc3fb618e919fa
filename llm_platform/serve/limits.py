"""Request size limits of the serving API: the body (an ASGI middleware, before any parsing), the number of prompts
and the tokens one request may make the engine generate. OpenAI-shaped 400/413 errors; no Ray."""

from __future__ import annotations

import json

from llm_platform.config.serve import LimitsConfig
from llm_platform.serve.api import APIError


def check_prompt_count(cfg: LimitsConfig, count: int) -> None:
    """400 past `serve.limits.max_prompts_per_request`; called before any prompt is tokenized."""
    limit = cfg.max_prompts_per_request
    if count > limit:
        raise APIError(400, f"{count} prompts in one request exceed this server's limit of {limit} prompts per "
                       f"request", param="prompt", code="too_many_prompts")


def check_generation_budget(cfg: LimitsConfig, n: int, max_tokens: list[int]) -> None:
    """400 when prompts x n x max_tokens (`max_tokens` holds each prompt's, after defaults) exceed
    `serve.limits.max_generated_tokens_per_request`: without it one 3 KB request (300 prompts, n=16) asks for 4,800
    sequences and holds the engine for as long as they take."""
    limit, total = cfg.max_generated_tokens_per_request, n * sum(max_tokens)
    if total > limit:
        raise APIError(400, f"this request may generate {total} tokens ({len(max_tokens)} prompt(s) x n={n} x "
                       f"max_tokens); this server's limit is {limit} tokens per request: lower max_tokens or n, "
                       f"or send fewer prompts", param="max_tokens", code="request_too_large")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = length is not None and (not length.isdigit() or int(length) > limit)
        chunks, total = [], 0
        if not too_big and length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            more = True
            while more and total <= limit:  # buffer a chunked body up to the limit, then replay it
                message = await receive()
                chunks.append(message)
                total += len(message.get("body", b""))
                more = message.get("more_body", False)
            too_big = total > limit
        if too_big:
            body = json.dumps(APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
                              .body()).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        if chunks:
            pending = list(chunks)

            async def replay():
                return pending.pop(0) if pending else await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)
