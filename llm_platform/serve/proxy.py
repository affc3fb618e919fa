"""OpenAI-shaped errors for the responses that Ray Serve's HTTP proxy writes itself.

Most errors come from our FastAPI routes, already in OpenAI's shape. A few never reach a replica and are written by
Serve's proxy as plain text: the back-pressure rejection when a deployment's queue is full (`max_queued_requests`),
"deployment unavailable", a request timeout, an unknown route, and a 500 when the replica handling a request dies
(`RayActorError`) or a task fails. This ASGI middleware runs inside the proxy and rewrites exactly those (a 4xx/5xx
whose body is not JSON) into `{"error": {"message", "type", "param", "code"}}`:

- 429 stays 429 (`rate_limit_error`, `overloaded`), 503 stays 503 (`unavailable`), both with `Retry-After`;
- 500 becomes 503 `replica_failed` with `Retry-After`: the app itself never answers a plain-text 500 (an exception
  the routes do not map is a JSON 500 with an error id, which passes through untouched), so a plain-text 500 from
  the proxy means the replica died or Serve failed under the request, which is a transient, retryable condition for
  the client and not a bug in its input;
- a request that the proxy ends without any response (what Serve 2.60 does when the replica handling it dies: uvicorn
  would then write a bare plain-text 500 outside every middleware) gets the same 503 `replica_failed`;
- 408 (a request that ran past `serve.http.request_timeout_s`, which Serve's proxy cancels) becomes 503
  `request_timeout` with `Retry-After`: the service could not answer in time, a transient condition like a gateway
  timeout;
- 404 keeps its code.

The body of every 5xx answer is generic (`... (id <error id>)`): Serve's text can carry the replica's exception
(tensor shapes, device memory statistics, paths). It is logged under the id in the proxy's log instead.

Serve loads it in every proxy from the environment variable that `llm_platform.cluster.PROXY_CALLBACK_ENV` names
(set before Ray starts: `cluster.connect` does it for a local Ray; the Docker image, which the KubeRay and ray-up
configs run, sets it for clusters).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from llm_platform.serve.health import error_id

log = logging.getLogger("ray.serve")

DEFAULT_RETRY_AFTER_S = 1

_SHAPES = {
    # status in -> (status out, type, code)
    400: (400, "invalid_request_error", "bad_request"),
    404: (404, "invalid_request_error", "not_found"),
    408: (503, "timeout", "request_timeout"),  # Serve's request_timeout_s ran out: retryable, like 504
    413: (413, "invalid_request_error", "request_too_large"),
    429: (429, "rate_limit_error", "overloaded"),
    499: (499, "invalid_request_error", "client_closed_request"),
    500: (503, "server_error", "replica_failed"),
    502: (503, "server_error", "replica_failed"),
    503: (503, "server_error", "unavailable"),
    504: (503, "server_error", "unavailable"),
}
_RETRYABLE = {429, 503}
# What a client reads instead of the proxy's own text, by code (5xx only).
_GENERIC = {"replica_failed": "the model replica failed while handling this request; retry",
            "request_timeout": "the request was not answered in time; retry",
            "unavailable": "the service is unavailable; retry"}


def openai_error(status: int, body: bytes) -> tuple[int, bytes, str, str]:
    """(status, JSON body, type, code) of the OpenAI-shaped replacement for a plain-text proxy error."""
    new_status, kind, code = _SHAPES.get(status, (status, "server_error" if status >= 500 else
                                                  "invalid_request_error", f"http_{status}"))
    text = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    if new_status >= 500:
        eid = error_id()
        log.error("proxy error %d answered as %d %s (error id %s); its body: %s", status, new_status, code, eid,
                  text[:4000])
        text = f"{_GENERIC.get(code, 'internal error')} (id {eid})"
    payload = {"error": {"message": text, "type": kind, "param": None, "code": code}}
    return new_status, json.dumps(payload).encode(), kind, code


class OpenAIErrorShape:
    """Pure ASGI middleware (streaming responses pass through untouched: only non-JSON error responses are held)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}
        started = False

        async def send_shaped(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                headers = message.get("headers") or []
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").decode("latin-1")
                if status >= 400 and "json" not in ctype:
                    held.update(start=message, body=b"")
                    return
                return await send(message)
            if message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                status = int(start["status"])
                new_status, body, _, code = openai_error(status, held["body"])
                headers = [(k, v) for k, v in (start.get("headers") or [])
                           if k.lower() not in (b"content-type", b"content-length")]
                if new_status in _RETRYABLE and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(DEFAULT_RETRY_AFTER_S).encode()))
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if new_status != status:
                    log.warning("proxy error %d on %s answered as %d %s", status, scope.get("path"), new_status,
                                code)
                await send({"type": "http.response.start", "status": new_status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            await self.app(scope, receive, send_shaped)
        except Exception:
            if started:
                raise
            log.exception("proxy failed before answering %s", scope.get("path"))
        if not started:
            # Serve's proxy ends a request whose replica died (RayActorError) without sending a response at all, and
            # uvicorn then writes its own plain-text 500 outside every middleware: answer it here instead.
            await self._send_error(send, scope, 500, b"the replica handling the request died")

    @staticmethod
    async def _send_error(send, scope, status: int, text: bytes) -> None:
        new_status, body, _, code = openai_error(status, text)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if new_status in _RETRYABLE:
            headers.append((b"retry-after", str(DEFAULT_RETRY_AFTER_S).encode()))
        log.warning("proxy ended %s without a response: answered %d %s", scope.get("path"), new_status, code)
        await send({"type": "http.response.start", "status": new_status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """What Serve's proxy calls (via `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the middleware list."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrorShape)]
