"""Experiment trackers fed by rank 0: MLflow (a real file store) and W&B (offline mode), no Ray."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os

import pytest

from llm_platform.config.train import TrainConfig
from llm_platform.errors import ConfigError
from llm_platform.train import tracking
from llm_platform.train.metrics import MetricsLogger
from llm_platform.train.tracking import Trackers, flatten

PARAMS = flatten({"model": {"name": "tiny", "num_layers": 2}, "train": {"lr": 3e-3, "betas": [0.9, 0.95],
                                                                        "resume_from": None}})


def test_flatten_gives_dotted_scalar_params():
    assert PARAMS == {"model.name": "tiny", "model.num_layers": 2, "train.lr": 3e-3, "train.betas": "[0.9, 0.95]",
                      "train.resume_from": "None"}


def test_a_tracker_without_its_package_is_refused_naming_the_key(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "wandb")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.mlflow_tracking_uri=.*mlflow"):
        tracking.check(TrainConfig(mlflow_tracking_uri="http://mlflow:5000"))
    with pytest.raises(ConfigError, match=r"train.wandb_project='llm'.*pip install wandb"):
        tracking.check(TrainConfig(wandb_project="llm"))
    tracking.check(TrainConfig())  # none configured: nothing needed


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database or a server otherwise
    return f"file://{tmp_path / 'mlruns'}"


def test_mlflow_gets_params_and_every_logged_step_and_a_resumed_run_continues_it(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    train = {"mlflow_tracking_uri": mlflow_uri, "mlflow_experiment": "exp"}
    run_uri = str(tmp_path / "runs" / "tiny")
    logger = MetricsLogger(run_uri, total_steps=4, trackers=Trackers(train, run_uri=run_uri, run_name="tiny",
                                                                      params=PARAMS))
    logger.log(1, {"train/loss": 5.0, "train/lr": 1e-3})
    logger.log(2, {"train/loss": 4.0, "val/loss": 4.5, "train/loss_scale": float("nan")})  # NaN: not sent

    # A restart of the same run (same URI) continues the same MLflow run.
    again = Trackers(train, run_uri=run_uri, run_name="tiny", params=PARAMS)
    again.log(3, {"train/loss": 3.5})
    again.close()
    logger.close()

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.num_layers"] == "2"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        [(1, 5.0), (2, 4.0), (3, 3.5)]
    assert "train/loss_scale" not in run.data.metrics and run.data.metrics["val/loss"] == 4.5
    # The platform's own sinks are unchanged by the trackers.
    assert len(open(os.path.join(run_uri, "metrics.jsonl")).read().splitlines()) == 2


def test_an_unreachable_tracker_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    from conftest import free_port

    train = {"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"}
    with caplog.at_level(logging.ERROR, logger="llm_platform.train"):
        trackers = Trackers(train, run_uri=str(tmp_path), run_name="tiny", params=PARAMS)
        trackers.log(1, {"train/loss": 1.0})
        trackers.close()
    assert trackers.sinks == []
    assert "mlflow tracking is off for this run" in caplog.text


def test_wandb_offline_gets_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_uri = "s3://bucket/runs/tiny"
    trackers = Trackers({"wandb_project": "llm"}, run_uri=run_uri, run_name="tiny", params=PARAMS)
    ((name, run),) = trackers.sinks
    trackers.log(1, {"train/loss": 5.0})
    trackers.log(2, {"train/loss": 4.0})
    trackers.log(2, {"val/perplexity": 60.0})  # the loop logs validation as its own line at the same step
    trackers.log(3, {"train/loss": 3.0})  # W&B commits a step's row when the next step arrives
    assert name == "wandb" and run.name == "tiny" and run.project == "llm"
    # The id comes from the run URI, so a restarted run resumes the same W&B run.
    assert run.id == hashlib.sha1(run_uri.encode()).hexdigest()[:16]
    assert run.config["train.lr"] == 3e-3
    assert run.summary["train/loss"] == 4.0 and run.summary["val/perplexity"] == 60.0
    trackers.close()
    (log_file,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run.id}" / f"run-{run.id}.wandb"))
    assert os.path.getsize(log_file) > 0
