"""What `cluster.worker_env()` forwards into Ray's runtime env: allowlisted settings, never a secret (Ray writes
runtime envs to its logs and shows them in the dashboard). No Ray started."""

from __future__ import annotations

import pytest

from llm_platform import cluster

SECRETS = {"WANDB_API_KEY": "w", "MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_PASSWORD": "p",
           "MLFLOW_TRACKING_USERNAME": "u", "OPENAI_API_KEY": "o", "LLM_PLATFORM_API_KEYS": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "HF_TOKEN": "h"}


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "WANDB_")) or name in SECRETS:
            monkeypatch.delenv(name)
    return monkeypatch


def test_worker_env_forwards_tracker_settings_but_no_secret(clean_env):
    for name, value in SECRETS.items():
        clean_env.setenv(name, value)
    settings = {"MLFLOW_TRACKING_URI": "https://mlflow.example.com", "MLFLOW_EXPERIMENT_NAME": "exp",
                "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_PROJECT": "p", "WANDB_ENTITY": "team",
                "WANDB_MODE": "offline", "WANDB_BASE_URL": "https://wandb.example.com"}
    for name, value in settings.items():
        clean_env.setenv(name, value)
    clean_env.setenv("WANDB_SOMETHING_NEW", "x")  # not on the allowlist: a prefix alone is not enough
    env = cluster.worker_env()
    assert {k: env[k] for k in settings} == settings
    assert not set(SECRETS) & set(env)
    assert "WANDB_SOMETHING_NEW" not in env


def test_worker_env_drops_a_tracking_uri_with_a_password(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "https://alice:hunter2@mlflow.example.com")
    assert "MLFLOW_TRACKING_URI" not in cluster.worker_env()


def test_no_forwarded_name_looks_like_a_secret():
    for name in cluster._FORWARDED_ENV + cluster._FORWARDED_TRACKER_ENV:
        assert not cluster.is_secret(name), name


def test_secret_names():
    for name in ("WANDB_API_KEY", "OPENAI_API_KEY", "LLM_PLATFORM_API_KEYS", "X_API_KEYS", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD",
                 "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN", "aws_profile".upper()):
        assert cluster.is_secret(name), name
    for name in ("TOKENIZERS_PARALLELISM", "AWS_REGION", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE"):
        assert not cluster.is_secret(name), name
