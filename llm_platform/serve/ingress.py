"""How HTTP requests reach the replicas: through Serve's proxy (the default) or straight to them (`direct`).

`proxy`: Serve's Python HTTP proxy on `serve.http.port` hands each request to a replica as a Ray actor call, and each
streamed chunk back as a Ray object. It answers every failure in OpenAI's shape (serve/proxy.py), including a
request whose replica died under it (a retryable 503), but on a small machine the hop costs milliseconds a request
and more a streamed chunk (docs/benchmarks.md: about 28 ms on a 32-token streamed completion on 2 cores).

`direct`: Ray Serve's direct ingress behind its bundled HAProxy (`RAY_SERVE_ENABLE_DIRECT_INGRESS` and
`RAY_SERVE_ENABLE_HA_PROXY`). Each replica serves HTTP itself (the same middlewares, so our errors keep their
shape), and HAProxy on `serve.http.port` balances over the replicas and retries connections that fail before a request
is sent. No Ray hop is left on the request path. Trade-offs, as of Ray 2.60 where both flags are experimental:
requests in flight on a replica that dies get a dropped connection, not a 503 (the openai client retries those by
itself); HAProxy's own errors (no replica up at all) are a plain-text 500; and HAProxy exposes its Prometheus
exporter on `RAY_SERVE_HAPROXY_METRICS_PORT` (9101) on every interface. A replica being removed (a rolling update,
Ctrl-C on `llm-platform serve`) stays reachable for `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S` (30 s) so that
load balancers can take it out first.

Serve reads both flags once, when its controller and replicas start, from the environment of the Ray nodes: a
local Ray that `llm-platform serve` starts gets them from `prepare`; a cluster's nodes need them in their own
environment (the Docker image's `ENV`, or the KubeRay/ray-up config). Each replica checks that the cluster runs the
mode its config asks for, and refuses to start otherwise, naming the key and the variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from llm_platform.config.choices import Ingress
from llm_platform.errors import ConfigError

DIRECT_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# `serve.http.ingress` is an Ingress: the schema refuses any other value (at compose time, and in `build_app` via
# config.merge), so nothing here checks the mode's spelling again.


def active(env: Mapping[str, str] | None = None) -> Ingress:
    """The mode that Serve runs with in this process's environment (a replica's: its node's)."""
    environ: Mapping[str, str] = os.environ if env is None else env
    return Ingress.direct if all(environ.get(k) == v for k, v in DIRECT_ENV.items()) else Ingress.proxy


def prepare(mode: Ingress) -> None:
    """Before a local Ray starts in this process: give its Serve the flags that `mode` needs (a cluster's nodes
    keep their own environment; `check` in each replica tells the two apart)."""
    if mode == Ingress.direct:
        os.environ.update(DIRECT_ENV)


def check(mode: Ingress) -> None:
    """In a replica: refuse to serve when the cluster's Serve runs another ingress than the config asks for."""
    running = active()
    if running != mode:
        flags = " and ".join(f"{k}={v}" for k, v in DIRECT_ENV.items())
        how = (f"start the Ray nodes with {flags} in their environment" if mode == Ingress.direct else
               f"start the Ray nodes without {flags}")
        raise ConfigError(f"serve.http.ingress={mode} but this Ray cluster's Serve runs with {running} ingress (Serve "
                          f"reads its flags when the cluster starts): {how}, or set serve.http.ingress={running}")
