"""Serving auth fails closed: where keys come from, which sources are errors, and when a replica must refuse to
serve without one. No Ray, no model."""

from __future__ import annotations

import pytest

from llm_platform.config.serve import AuthConfig
from llm_platform.errors import ConfigError
from llm_platform.serve import auth

ENV = "LLMP_TEST_AUTH_KEYS"


def test_keys_from_env_and_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k3\n\n  k4  \n")
    cfg = AuthConfig(api_key_env=ENV, api_key_file=str(keys))
    assert auth.load_api_keys(cfg, {ENV: " k1, ,k2 "}) == ["k1", "k2", "k3", "k4"]
    assert auth.load_api_keys(AuthConfig(api_key_env=ENV), {}) == []  # neither set: no keys (loopback only)


def test_a_set_source_without_a_key_is_an_error(tmp_path):
    for blank in ("", " ", " , ,"):
        with pytest.raises(ConfigError, match=f"{ENV} is set but holds no API key"):
            auth.load_api_keys(AuthConfig(api_key_env=ENV), {ENV: blank})
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match=f"serve.auth.api_key_file={empty} holds no API key"):
        auth.load_api_keys(AuthConfig(api_key_env=ENV, api_key_file=str(empty)), {})
    with pytest.raises(ConfigError, match=r"serve.auth.api_key_file=.*missing: cannot read it"):
        auth.load_api_keys(AuthConfig(api_key_env=ENV, api_key_file=str(tmp_path / "missing")), {})


def test_loopback():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert auth.is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.1", "my-host", "example.com", ""):
        assert not auth.is_loopback(host), host


def test_exposed_without_a_key_is_refused_unless_allowed_explicitly():
    cfg = AuthConfig(api_key_env=ENV)
    with pytest.raises(ConfigError) as e:
        auth.check_exposure(cfg, [], ["0.0.0.0", "127.0.0.1"])
    assert ENV in str(e.value) and "serve.auth.api_key_file" in str(e.value)
    assert "serve.auth.allow_unauthenticated=true" in str(e.value)
    auth.check_exposure(cfg, ["k"], ["0.0.0.0"])  # a key: fine
    auth.check_exposure(AuthConfig(allow_unauthenticated=True), [], ["0.0.0.0"])
    auth.check_exposure(AuthConfig(), [], ["127.0.0.1", "127.0.0.1"])  # loopback: keys optional
    # `serve.http.host` on loopback but the cluster's Serve listening everywhere (a RayService): refused.
    with pytest.raises(ConfigError, match="serving on 0.0.0.0"):
        auth.check_exposure(AuthConfig(), [], ["127.0.0.1", "0.0.0.0"])
    # Where Serve listens could not be found out: counted as reachable.
    with pytest.raises(ConfigError, match="serving on unknown"):
        auth.check_exposure(AuthConfig(), [], ["127.0.0.1", None])


def test_bearer_check():
    assert auth.authorized(["a", "b"], "Bearer b") and auth.authorized(["a"], "bearer  a ")
    for header in (None, "", "b", "Bearer", "Bearer c", "Basic a"):
        assert not auth.authorized(["a", "b"], header), header


def test_build_app_checks_the_request_limits():
    from llm_platform.serve.app import build_app

    for key in ("max_prompts_per_request", "max_generated_tokens_per_request"):
        with pytest.raises(ConfigError, match=f"serve.limits.{key}=0: must be >= 1"):
            build_app({"model": "m", "limits": {key: 0}})


def test_the_cluster_preset_needs_a_key(tmp_path):
    from llm_platform.config import compose

    cfg = compose("serve", ["serve=cluster"]).serve
    assert not cfg.auth.allow_unauthenticated
    with pytest.raises(ConfigError, match="serving on 0.0.0.0"):
        auth.check_exposure(cfg.auth, auth.load_api_keys(cfg.auth, {}), [cfg.http.host])
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    with_keys = compose("serve", ["serve=cluster", f"serve.auth.api_key_file={keys}"]).serve
    auth.check_exposure(with_keys.auth, auth.load_api_keys(with_keys.auth, {}), [with_keys.http.host])
