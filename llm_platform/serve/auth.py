"""API keys of the serving API, and the rule that fails closed: an endpoint that other hosts can reach never runs
without a key unless `serve.auth.allow_unauthenticated=true` says so. No Ray at import time.

Keys come from two sources, both optional: `serve.auth.api_key_env` (comma-separated, `LLM_PLATFORM_API_KEYS` by
default) and `serve.auth.api_key_file` (one per line, a mounted Kubernetes Secret). A source that is set but holds no
key is an error, never "no auth": an empty Secret or a blank variable is a deployment mistake, and silently serving
without keys is the worst way to find it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping

from llm_platform.config.serve import AuthConfig
from llm_platform.errors import ConfigError


def load_api_keys(cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys from `cfg.api_key_env` and `cfg.api_key_file`; [] when neither is set. A set source without a key, or
    a key file that cannot be read, is a ConfigError naming it."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    keys: list[str] = []
    raw = env.get(cfg.api_key_env)
    if raw is not None:
        keys = [k.strip() for k in raw.split(",") if k.strip()]
        if not keys:
            raise ConfigError(f"{cfg.api_key_env} is set but holds no API key (comma-separated keys expected): set "
                              f"keys or unset it (serve.auth.api_key_env names this variable)")
    if cfg.api_key_file:
        try:
            with open(cfg.api_key_file, encoding="utf-8") as f:
                from_file = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"serve.auth.api_key_file={cfg.api_key_file}: cannot read it ({e.strerror})") from None
        if not from_file:
            raise ConfigError(f"serve.auth.api_key_file={cfg.api_key_file} holds no API key (one key per line "
                              f"expected)")
        keys += from_file
    return keys


def is_loopback(host: str) -> bool:
    """True only for addresses other hosts cannot reach: 127.0.0.0/8, ::1 and `localhost`."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a hostname: it may resolve to any interface
        return False


def check_exposure(cfg: AuthConfig, keys: list[str], bind_hosts: list[str | None]) -> None:
    """Refuse to serve without a key when any of `bind_hosts` is reachable from other hosts (None: unknown, which
    counts as reachable), unless `cfg.allow_unauthenticated`."""
    exposed = [h or "unknown" for h in bind_hosts if h is None or not is_loopback(h)]
    if keys or cfg.allow_unauthenticated or not exposed:
        return
    raise ConfigError(
        f"serving on {', '.join(dict.fromkeys(exposed))} (reachable from other hosts) without an API key: set keys "
        f"in {cfg.api_key_env} (comma-separated; serve.auth.api_key_env) or in serve.auth.api_key_file (one per "
        f"line), or set serve.auth.allow_unauthenticated=true to serve without authentication on purpose")


def serve_http_host() -> str | None:
    """Where this Ray cluster's Serve listens for HTTP (the proxies, or each replica under direct ingress: both
    bind `http_options.host`); None when it cannot be found out.

    Asked from inside a replica: under KubeRay the RayService's `http_options` decide the address (0.0.0.0 by
    default), not `serve.http.host`. The client is private to Ray; without it the caller treats the host as unknown.
    """
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else str(client.http_config.host)
    except Exception:  # noqa: BLE001 - any failure means "unknown", which the caller treats as exposed
        return None


def authorized(keys: list[str], authorization: str | None) -> bool:
    """True when `Authorization: Bearer <token>` holds one of `keys` (constant-time compare, no early exit)."""
    given = authorization or ""
    given = given[7:].strip() if given[:7].lower() == "bearer " else ""
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok
