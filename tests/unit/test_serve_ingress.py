"""serve.http.ingress: which mode a process's environment runs Serve with, and the errors that name the key."""

from __future__ import annotations

import pytest

from llm_platform.config.choices import Ingress
from llm_platform.errors import ConfigError
from llm_platform.serve import ingress

FLAGS = ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY")


@pytest.fixture
def clean_env(monkeypatch):
    for k in FLAGS:  # setenv first: monkeypatch then restores the variable's absence after the test
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    return monkeypatch


def test_active_mode_needs_both_flags(clean_env):
    assert ingress.active() is Ingress.proxy
    assert ingress.active({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}) is Ingress.proxy  # direct alone: no balancer
    assert ingress.active({k: "1" for k in FLAGS}) is Ingress.direct
    assert ingress.active({k: "0" for k in FLAGS}) is Ingress.proxy


def test_prepare_sets_the_flags_for_a_local_ray_only_when_direct(clean_env):
    import os

    ingress.prepare(Ingress.proxy)
    assert not any(k in os.environ for k in FLAGS)
    ingress.prepare(Ingress.direct)
    assert ingress.active() is Ingress.direct


def test_replica_refuses_a_mode_the_cluster_does_not_run(clean_env):
    with pytest.raises(ConfigError) as e:
        ingress.check(Ingress.direct)
    message = str(e.value)
    assert "serve.http.ingress=direct" in message and all(k in message for k in FLAGS) and "proxy" in message
    ingress.check(Ingress.proxy)
    for k in FLAGS:
        clean_env.setenv(k, "1")
    ingress.check(Ingress.direct)
    with pytest.raises(ConfigError, match="serve.http.ingress=proxy.*direct ingress"):
        ingress.check(Ingress.proxy)


def test_unknown_mode_is_rejected_naming_the_key(clean_env):
    # The schema's Ingress refuses it where a RayService's args become the typed config (config.merge).
    from llm_platform.serve.app import build_app

    with pytest.raises(ConfigError, match="serve.http.ingress='haproxy': must be one of proxy, direct"):
        build_app({"model": "/nowhere", "http": {"ingress": "haproxy"}})
