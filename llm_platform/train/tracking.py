"""Experiment trackers (MLflow, Weights & Biases) fed by rank 0's metrics, next to metrics.jsonl and TensorBoard.

Ray Train V2 takes only `ray.train.UserCallback`s in `RunConfig(callbacks=...)`; Ray's `MLflowLoggerCallback` and
`WandbLoggerCallback` are Tune logger callbacks and are refused there. Ray's guide for Train V2 is to call the
tracking library from the training function on rank 0, which is what this does: `MetricsLogger` (rank 0) forwards
every logged step here.

One tracker run per platform run: the run name is the platform's, and a run that resumes (a restart, or the name
reused) continues the same tracker run (MLflow: found by the `llm_platform.run_uri` tag; W&B: a run id derived from
the run URI, `resume="allow"`). The run's config (model and train groups, flattened) is logged as parameters.
Neither library is a dependency: `check` refuses the config before any worker starts when the one it names is not
installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from typing import Any

from llm_platform.config.train import TrainConfig
from llm_platform.errors import ConfigError

log = logging.getLogger("llm_platform.train")
RUN_TAG = "llm_platform.run_uri"


def check(train: TrainConfig) -> None:
    """Refuse a tracker whose library is missing, naming the key and the package."""
    for key, module, package in (("mlflow_tracking_uri", "mlflow", "mlflow (or mlflow-skinny)"),
                                 ("wandb_project", "wandb", "wandb")):
        if getattr(train, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.{key}={getattr(train, key)!r} needs the {package} package, which is not "
                              f"installed: pip install {package.split()[0]} (or unset train.{key})")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"optimizer": {"lr": 0.1}}}` -> `{"train.optimizer.lr": 0.1}`; lists and None as strings (both
    trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Trackers:
    """The configured trackers of one run on rank 0. `log` and `close` never raise: a tracker that fails is logged
    and dropped, so an unreachable tracking server never kills a training run."""

    def __init__(self, train: dict[str, Any], *, run_uri: str, run_name: str, params: dict[str, Any]):
        self.sinks: list[tuple[str, Any]] = []
        if train.get("mlflow_tracking_uri"):
            self._start("mlflow", self._mlflow, train, run_uri, run_name, params)
        if train.get("wandb_project"):
            self._start("wandb", self._wandb, train, run_uri, run_name, params)

    def _start(self, name, opener, train, run_uri, run_name, params) -> None:
        try:
            self.sinks.append((name, opener(train, run_uri, run_name, params)))
        except Exception as e:  # noqa: BLE001 - tracking is best effort, training goes on
            log.error("%s tracking is off for this run: %s: %s", name, type(e).__name__, e)

    @staticmethod
    def _mlflow(train, run_uri, run_name, params):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=train["mlflow_tracking_uri"])
        experiment = train.get("mlflow_experiment") or "llm-platform"
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_uri}'", max_results=1)
        if runs:
            run_id = runs[0].info.run_id
            log.info("mlflow: continuing run %s in experiment %r", run_id, experiment)
        else:
            run_id = client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_uri}).info.run_id
            from mlflow.entities import Param

            items = sorted(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
            log.info("mlflow: run %s in experiment %r at %s", run_id, experiment, train["mlflow_tracking_uri"])
        return {"client": client, "run_id": run_id}

    @staticmethod
    def _wandb(train, run_uri, run_name, params):
        import wandb

        run_id = hashlib.sha1(run_uri.encode()).hexdigest()[:16]
        return wandb.init(project=train["wandb_project"], name=run_name, id=run_id, resume="allow", config=params,
                          reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}
        for name, sink in list(self.sinks):
            try:
                if name == "mlflow":
                    from mlflow.entities import Metric

                    now = int(time.time() * 1000)
                    # MLflow metric names allow letters, digits, `_ - . / space`: ours (train/loss) are valid.
                    sink["client"].log_batch(sink["run_id"],
                                             metrics=[Metric(k, v, now, step) for k, v in sorted(numbers.items())])
                else:
                    sink.log(numbers, step=step)
            except Exception as e:  # noqa: BLE001
                log.error("%s tracking failed at step %d and is off for the rest of the run: %s", name, step, e)
                self.sinks.remove((name, sink))

    def close(self, status: str = "FINISHED") -> None:
        for name, sink in self.sinks:
            try:
                if name == "mlflow":
                    sink["client"].set_terminated(sink["run_id"], status=status)
                else:
                    sink.finish(exit_code=0 if status == "FINISHED" else 1)
            except Exception as e:  # noqa: BLE001
                log.error("%s tracking could not close its run: %s", name, e)
        self.sinks = []
