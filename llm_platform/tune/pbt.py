"""Population Based Training over Ray Train runs: Tune checkpoints that point at the trials' training checkpoints.

In the driver-function pattern (`trial.run_trial` calls `launch`, whose TorchTrainer does the training) the weights
live in the trial's run folder, `runs/<run>/checkpoint_<step>/`, and Tune would see no checkpoint at all, so PBT
could never clone a trial. Here, in PBT mode only:

    Ray Train report (controller) --TrainReportQueue--> trial driver --tune.report(metrics, checkpoint=pointer)--> Tune

Each Tune checkpoint is a folder with one small JSON (`POINTER`): the URI of the run checkpoint that the report
carried, the run name, the trial and the step; no weights are copied. When PBT exploits, the losing trial restarts
with the winner's pointer (`tune.get_checkpoint()`) and its mutated config, and starts a *new* run
(`<sweep>-<trial>-from-<source trial>-<step>`) with `train.checkpoint.resume_from` = the pointed checkpoint. A trial
restarted from its own pointer (Tune retrying it, or synchronous PBT pausing it) does the same, so the run continues
exactly from the state Tune recorded.

Because PBT reads a checkpoint some time after it was reported, the runs must keep every checkpoint
(`train.checkpoint.keep_latest`) and every report must carry one (see `check`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from ray.train import UserCallback

from llm_platform import storage
from llm_platform.config.train import TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError
from llm_platform.tune import space as spaces

log = logging.getLogger("llm_platform.tune")
POINTER = "train_checkpoint.json"
MUTABLE_KEYS = ("train.optimizer.lr", "train.optimizer.min_lr_ratio", "train.optimizer.warmup_steps",
                "train.optimizer.schedule", "train.optimizer.weight_decay", "train.optimizer.beta1",
                "train.optimizer.beta2", "train.optimizer.grad_clip", "train.mlm_probability")
"""Keys PBT may change when a trial continues from a checkpoint: optimizer and schedule knobs. The other keys of
the space (the model's shape, batch sizes, steps) are sampled once and copied from the cloned trial with its weights."""


def check(tune_cfg: TuneConfig, train: TrainConfig, dims: list[spaces.Dimension], checkpoints_per_trial: int) -> None:
    """Refuse a PBT sweep that cannot clone trials, naming the key."""
    if tune_cfg.search != "random":
        raise ConfigError(f"tune.scheduler=pbt chooses the configs itself: it cannot run with "
                          f"tune.search={tune_cfg.search!r} (use tune.search=random)")
    if not mutations(dims):
        raise ConfigError(f"tune.scheduler=pbt mutates optimizer knobs while trials train: tune.space needs a range "
                          f"or list for one of {', '.join(MUTABLE_KEYS)}")
    if tune_cfg.perturbation_interval_reports < 1:
        raise ConfigError(f"tune.perturbation_interval_reports={tune_cfg.perturbation_interval_reports} must be at "
                          f"least 1")
    for d in dims:
        fixed_keys = ("train.eval_interval_steps", "train.checkpoint.interval_steps", "train.checkpoint.keep_latest")
        if d.key in fixed_keys and d.kind != "fixed":
            raise ConfigError(f"tune.scheduler=pbt: tune.space.{d.key} must be a fixed value (PBT compares trials "
                              f"report by report)")
    eval_steps, ckpt_steps = train.eval_interval_steps, train.checkpoint.interval_steps
    for d in dims:
        if d.key == "train.eval_interval_steps":
            eval_steps = d.args[0]
        if d.key == "train.checkpoint.interval_steps":
            ckpt_steps = d.args[0]
    if eval_steps % ckpt_steps:
        raise ConfigError(f"tune.scheduler=pbt clones a trial at any report, so every report needs a checkpoint: make "
                          f"train.eval_interval_steps={eval_steps} a multiple of train.checkpoint.interval_steps="
                          f"{ckpt_steps}")
    keep = next((d.args[0] for d in dims if d.key == "train.checkpoint.keep_latest"), train.checkpoint.keep_latest)
    if keep < checkpoints_per_trial:
        raise ConfigError(f"tune.scheduler=pbt resumes trials from other trials' run checkpoints, so a run must not "
                          f"delete them: train.checkpoint.keep_latest={keep} is below the {checkpoints_per_trial} "
                          f"checkpoints of a full trial")


def mutations(dims: list[spaces.Dimension]) -> dict[str, Any]:
    """PBT's `hyperparam_mutations`, nested like the param space: lists for choice/grid, Tune domains for ranges."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(*a), "choice": list, "grid": list}
    out: dict[str, Any] = {}
    for d in dims:
        if d.key in MUTABLE_KEYS and d.kind in make:
            spaces.set_dotted(out, d.key, make[d.kind](d.args))
    return out


def make_scheduler(tune_cfg: TuneConfig, dims: list[spaces.Dimension]):
    """PBT over training iterations (one per report) on `tune.metric`."""
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining(time_attr="training_iteration",
                                   perturbation_interval=tune_cfg.perturbation_interval_reports,
                                   hyperparam_mutations=mutations(dims), synch=tune_cfg.pbt_synch)


def read_pointer(checkpoint) -> dict[str, Any] | None:
    """The pointer JSON inside a Tune checkpoint (`tune.get_checkpoint()`, `Result.checkpoint`), or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = os.path.join(directory, POINTER)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)


def resumed_run_name(base_name: str, pointer: dict[str, Any]) -> str:
    """The run a trial trains when it (re)starts from a Tune checkpoint: unique per source trial and step."""
    return f"{base_name}-from-{pointer['trial_id']}-{int(pointer['step'])}"


class TrainReportQueue(UserCallback):
    """Runs in the Ray Train controller: each report's rank-0 metrics and its checkpoint folder name (or None) go to
    the trial driver through a Ray queue (the driver attaches the Tune checkpoint; the controller cannot)."""

    def __init__(self, queue):
        self.queue = queue
        self.last_val: dict[str, Any] = {}

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        from llm_platform.tune.trial import with_last_validation

        name = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint else None
        self.queue.put((with_last_validation(self.last_val, metrics[0]), name))


def train_reporting_pointers(train_fn: Callable[[list], Any], *, run_uri: str, run_name: str, trial_id: str) -> Any:
    """Run `train_fn(callbacks)` (a `launch` call) in a thread and turn its reports into Tune reports, each with a
    pointer checkpoint to the run's latest checkpoint. Returns what `train_fn` returns; re-raises its error."""
    import ray.tune
    from ray.util.queue import Queue

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["result"] = train_fn([TrainReportQueue(queue)])
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e
        finally:
            queue.put(None)  # the end

    # A daemon thread: when Tune stops or pauses the trial it ends this actor, and the run (owned by it) with it.
    thread = threading.Thread(target=train, name="llmp-trial-run", daemon=True)
    thread.start()
    latest: dict[str, Any] | None = None
    while True:
        item = queue.get()
        if item is None:
            break
        metrics, checkpoint_name = item
        if checkpoint_name:
            latest = {"checkpoint_uri": storage.join(run_uri, checkpoint_name), "run_name": run_name,
                      "trial_id": trial_id, "step": int(metrics["step"])}
        if latest is None:
            ray.tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix="llmp-pointer-") as directory:
            with open(os.path.join(directory, POINTER), "w") as f:
                json.dump(latest, f)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory))
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
