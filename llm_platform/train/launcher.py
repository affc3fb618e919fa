"""Launch a training run with Ray Train V2 (`TorchTrainer`), then export and record it.

    checks (train/checks.py, no workers yet) -> TorchTrainer.fit (train/loop.py on every worker) -> HF export
    -> lineage.json (last)

Run folder `runs/<run_name>/` (under the storage root): Ray Train writes `checkpoint_<step>/` there (it is the
run's `storage_path/name`), rank 0 writes `metrics.jsonl` and `tensorboard/`, the driver writes `export/` and, last,
`lineage.json`. A run that reuses a name resumes from its latest checkpoint; a finished run with the same config is
returned as is; `train.checkpoint.resume_from` seeds a new run with another run's checkpoint. A non-finite loss (with
`train.on_nonfinite_loss=stop`) raises `TrainingError` naming the step.

`launch` registers nothing: a caller that wants the export in the registry calls `register_run` with the result
(`llm-platform train` under `train.register_as`; a sweep registers only its winner; `llm-platform run` in its register
stage).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from llm_platform import storage
from llm_platform.config import as_dict
from llm_platform.config.model import ModelConfig
from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.data.dataset import DatasetInfo
from llm_platform.errors import StageError
from llm_platform.models.build import build_model, hf_config, read_pretrained_config, resolve_family
from llm_platform.models.flops import flops_per_token, model_size, peak_flops
from llm_platform.storage import layout, names
from llm_platform.train import checkpoint as ckpt
from llm_platform.train.checks import preflight
from llm_platform.train.metrics import FollowMetrics
from llm_platform.train.precision import compute_dtype
from llm_platform.train.worker import WorkerConfig

log = logging.getLogger("llm_platform.train")
# Importers of the checks from here, from before they moved to train/checks.py.
UNTRAINED_KEYS = ("budget", "register_as")
"""`train` keys left out of a run's config record: they change nothing the run trains (`config_of`)."""


class TrainingError(StageError):
    """A run that started but cannot go on (a non-finite loss)."""


class BudgetReached(TrainingError):
    """`train.budget` stopped the run at a checkpoint; the same command with a raised limit resumes it."""


@dataclass
class TrainResult:
    """What a finished run produced (URIs in storage)."""

    run_uri: str
    export_uri: str | None
    checkpoint_uri: str | None
    metrics: dict
    lineage: dict
    reused: bool = False
    """The run had already finished with this config: nothing was trained."""


@dataclass
class RunSpec:
    """One run as the driver prepared it: its name and folder, dataset, the workers' config and its config record."""

    name: str
    uri: str
    dataset: DatasetInfo
    worker: WorkerConfig
    config_record: dict


def launch(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, dataset_uri: str, storage_root: str, *,
           run_name: str | None = None, callbacks: list | None = None, extra_lineage: dict | None = None,
           connect=None, prices: PricesConfig | None = None) -> TrainResult:
    """Train `model` on the dataset at `dataset_uri` and return the run's outputs (registering is `register_run`).

    Args:
        model, train, scaling: the config nodes.
        dataset_uri: a finished data-stage folder (with manifest.json).
        storage_root: the storage root; the run lives under `runs/<run_name>/`.
        run_name: overrides `train.run_name`; None derives `<model>-<objective>-<dataset fingerprint>`.
        callbacks: extra Ray Train `RunConfig` callbacks (e.g. Tune's `TuneReportCallback`).
        extra_lineage: merged into lineage.json (e.g. `{"sweep": {...}}`).
        connect: called before Ray is needed (not for a run already finished with this config); None: Ray is
            connected already.
        prices: the price table the run's cost and `train.budget` are counted in (`plan.prices`); None: the
            default table.

    Raises:
        BudgetReached: `train.budget` stopped the run at a checkpoint (the message says how to go on).
        TrainingError: a non-finite loss stopped it.
    """
    dataset, pretrained_dir = preflight(model, train, scaling, dataset_uri, storage_root)
    run_name = run_name or train.run_name or f"{model.name}-{train.objective}-{dataset.fingerprint[:8]}"
    names.check(run_name, "train.run_name")  # it becomes the folder runs/<run_name>/
    run_uri = layout.run(storage_root, run_name)
    config_record = config_of(model, train, scaling)
    done = finished_run(run_uri, config_record)
    if done:
        log.info("run %s already finished with this config; nothing to do", run_uri)
        return done
    if connect is not None:
        connect()
    worker = build_worker_config(model, train, scaling, dataset, run_uri, pretrained_dir, prices or PricesConfig())
    spec = RunSpec(name=run_name, uri=run_uri, dataset=dataset, worker=worker, config_record=config_record)
    log.info("training %s (%s, %s) on %d %s worker(s) -> %s", model.name, train.objective,
             train.parallelism.strategy, scaling.num_workers, "GPU" if scaling.use_gpu else "CPU", run_uri)
    result = fit(spec, train, scaling, storage_root, callbacks)
    # Rank 0's return value (Train V2's Result; see RunConfig in `fit`): what the run spent, why it stopped early.
    stopped = result.return_value or {}  # type: ignore[attr-defined]
    raise_if_stopped(stopped, run_uri, train)
    return finish_run(spec, model, train, result, stopped.get("spend"), extra_lineage)


def fit(spec: RunSpec, train: TrainConfig, scaling: ScalingConfig, storage_root: str, callbacks: list | None):
    """Run the workers (train/loop.py) under Ray Train's TorchTrainer; returns Ray Train's Result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from llm_platform import cluster
    from llm_platform.train.parallelize import process_group_backend

    fs, runs_path = storage.pyarrow_filesystem(layout.runs(storage_root))
    trainer = TorchTrainer(
        # The typed WorkerConfig travels pickled with the function; no `train_loop_config` dict to rebuild.
        functools.partial(_train_fn(), spec.worker),
        # CPU offload on GPUs: the offloaded gradients' norm is all-reduced on the host, so gloo joins NCCL.
        torch_config=TorchConfig(backend=process_group_backend(train.parallelism.cpu_offload, scaling.use_gpu)),
        scaling_config=ray_scaling(scaling),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=runs_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.checkpoint.keep_latest),
            callbacks=list(callbacks or []),
            # Train V2's RunConfig (what ray.train exports at runtime); mypy sees the V1 one from ray.air.
            worker_runtime_env={"env_vars": cluster.worker_env()},  # type: ignore[call-arg]
        ),
        # No Ray Data here: each worker reads its own share of the split files (train/reader.py).
        # No `resume_from_checkpoint`: Ray Train V2 refuses it. `train.checkpoint.resume_from` reaches the workers in
        # their WorkerConfig and the worker loads it when the run has no checkpoint of its own (worker.py).
    )
    with FollowMetrics(spec.uri, train.max_steps):
        return trainer.fit()


def finish_run(spec: RunSpec, model: ModelConfig, train: TrainConfig, result, spend: dict | None,
               extra_lineage: dict | None) -> TrainResult:
    """Export the final checkpoint (with `train.export`) and write lineage.json, the run's record, last."""
    metrics = {**last_logged(spec.uri), **dict(result.metrics or {})}
    checkpoint_uri = storage.join(spec.uri, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    dataset = spec.dataset
    lineage = {
        "kind": "run",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "code_version": code_version(),
        "dataset": {"uri": dataset.uri, "fingerprint": dataset.fingerprint, "manifest_sha256": dataset.manifest_sha256,
                    "tokenizer_sha256": dataset.tokenizer_sha256},
        "run": {"name": spec.name, "uri": spec.uri, "config": spec.config_record, "metrics": metrics,
                "checkpoint": checkpoint_uri},
        "cost": cost_record(spend, spec.worker.prices, train),
        "sweep": None,
        "base_model": model.pretrained,
        **(extra_lineage or {}),
    }
    export_uri = None
    if train.export and result.checkpoint:
        export_uri = storage.join(spec.uri, "export")
        with result.checkpoint.as_directory() as directory:
            export(model, spec.worker, dataset, directory, export_uri, lineage)
    storage.write_json(storage.join(spec.uri, ckpt.LINEAGE), lineage)  # the run's record, last
    return TrainResult(run_uri=spec.uri, export_uri=export_uri, checkpoint_uri=checkpoint_uri, metrics=metrics,
                       lineage=lineage)


def register_run(storage_root: str, name: str, result: TrainResult, *, make_latest: bool = True) -> Any:
    """Register a run's export as a new version of `name` (moving LATEST unless `make_latest=False`).

    A run registered under `name` before is not registered again: its version is returned as it is, so rerunning a
    command whose run is reused adds no version. Returns the registry's ModelVersion, or None for a run without an
    export (`train.export=false`).
    """
    from llm_platform import registry

    if not result.export_uri:
        log.warning("run %s has no export: nothing to register as %s", result.run_uri, name)
        return None
    for version in reversed(registry.list_versions(storage_root, name)):
        if (version.lineage.get("source_uri") == result.export_uri
                and version.lineage.get("created_at") == result.lineage.get("created_at")):
            log.info("run %s is registered already as %s %s", result.run_uri, name, version.version)
            return version
    version = registry.register(storage_root, name, result.export_uri, result.lineage, make_latest=make_latest)
    log.info("registered %s version %s", name, version.version)
    return version


def raise_if_stopped(stopped: dict, run_uri: str, train: TrainConfig) -> None:
    """Rank 0's return value as the error that says why the run stopped early and what to do, if it did."""
    if stopped.get("nonfinite_step"):
        raise TrainingError(f"run {run_uri}: the loss became non-finite ({stopped.get('loss')}) at step "
                            f"{stopped['nonfinite_step']} of train.max_steps={train.max_steps}; training stopped "
                            f"without an export. Lower train.optimizer.lr, raise train.optimizer.warmup_steps or "
                            f"train.optimizer.grad_clip, or set train.on_nonfinite_loss=skip")
    if stopped.get("budget_step"):
        step = stopped["budget_step"]
        raise BudgetReached(f"run {run_uri} stopped at step {step} of train.max_steps={train.max_steps}: "
                            f"{stopped['reason']}. Its checkpoint checkpoint_{step:08d} is kept; run the same "
                            f"command with the limit raised (or null) to resume from it")


def cost_record(spend: dict | None, prices: PricesConfig, train: TrainConfig) -> dict:
    """lineage.json's `cost`: what the run spent, at which prices, against which budget."""
    return {**(spend or {}), "prices_as_of": prices.as_of_date, "market": str(prices.market),
            "budget": {"max_cost_usd": train.budget.max_cost_usd, "max_gpu_hours": train.budget.max_gpu_hours}}


def config_of(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig) -> dict:
    """The config that decides what a run trains (lineage's `run.config`; a finished run with the same one is
    reused), without UNTRAINED_KEYS: raising the budget to let a stopped run finish, or registering the export under
    a name, changes nothing the run trains."""
    train_record = as_dict(train)
    for key in UNTRAINED_KEYS:
        train_record.pop(key, None)
    return {"model": as_dict(model), "train": train_record, "scaling": as_dict(scaling)}


def _train_fn():
    from llm_platform.train.loop import train_loop_per_worker

    return train_loop_per_worker


def build_worker_config(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, dataset: DatasetInfo,
                        run_uri: str, pretrained_dir: str | None, prices: PricesConfig) -> WorkerConfig:
    """What the workers receive: their config nodes, the dataset's files and token ids, the model's FLOPs per token."""
    special = {name: dataset.special_token_id(name) for name in ("eos", "pad", "mask")}
    if pretrained_dir:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained_dir)
        family = resolve_family(model, read_pretrained_config(pretrained_dir))
    else:
        config = hf_config(model, dataset.vocab_size, special)
        family = resolve_family(model)
    size = model_size(config, family.name)
    return WorkerConfig(
        model=model, train=train, storage=storage.settings(), run_uri=run_uri, special=special,
        vocab_size=dataset.vocab_size, seq_len=dataset.seq_len,
        files={split: list(dataset.files.get(split) or []) for split in ("train", "val")},
        row_groups={split: dataset.row_groups.get(split) for split in ("train", "val")},
        flops_per_token=flops_per_token(size, dataset.seq_len),
        compute_dtype=compute_dtype(train.parallelism.mixed_precision, on_gpu=scaling.use_gpu),
        pretrained_dir=pretrained_dir, base_vocab_size=dataset.base_vocab_size if pretrained_dir else None,
        peak_flops_per_s=peak_flops(scaling.gpu_type) if scaling.use_gpu else None, prices=prices,
        cpus_per_worker=scaling.cpus_per_worker)


def ray_scaling(scaling: ScalingConfig):
    import ray.train

    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                   resources_per_worker=resources, placement_strategy=scaling.placement_strategy,
                                   accelerator_type=scaling.gpu_type if scaling.use_gpu else None)


def export(model: ModelConfig, worker_config: WorkerConfig, dataset: DatasetInfo, checkpoint_dir: str, uri: str,
           lineage: dict) -> None:
    """Consolidate the final DCP checkpoint into a plain model on the driver and save it as an HF folder.

    The model is built as the workers built it (same dtypes, same added rows), so the checkpoint loads into it
    as saved. The tokenizer files are the dataset's, byte for byte (for an unaltered pretrained tokenizer: the
    checkpoint's own).
    """
    import torch

    plain = build_model(model, dataset.vocab_size, worker_config.special,
                        pretrained_dir=worker_config.pretrained_dir, seed=0,
                        dtype=getattr(torch, worker_config.compute_dtype),
                        base_vocab_size=worker_config.base_vocab_size)
    ckpt.load_model_weights(plain, checkpoint_dir)
    ckpt.export_hf(plain, dataset.tokenizer_uri, uri, lineage, base_dir=worker_config.pretrained_dir,
                   adapter=model.lora.enabled and model.lora.export == "adapter")
    log.info("exported %s", uri)


def finished_run(run_uri: str, config_record: dict) -> TrainResult | None:
    """The result of a run that already finished with the same config, if any."""
    record_uri = storage.join(run_uri, ckpt.LINEAGE)
    if not storage.exists(record_uri):
        return None
    lineage = storage.read_json(record_uri)
    run = lineage.get("run") or {}
    recorded = json.loads(json.dumps(run.get("config"), default=str))
    if isinstance(recorded, dict) and isinstance(recorded.get("train"), dict):
        # Records written while launch still registered runs carry `train.register_as` (now in UNTRAINED_KEYS).
        recorded["train"].pop("register_as", None)
    if recorded != json.loads(json.dumps(config_record, default=str)):
        return None
    export_uri = storage.join(run_uri, "export")
    return TrainResult(run_uri=run_uri, export_uri=export_uri if storage.exists(export_uri) else None,
                       checkpoint_uri=run.get("checkpoint"), metrics=run.get("metrics") or {}, lineage=lineage,
                       reused=True)


def last_logged(run_uri: str) -> dict:
    """The latest value of each metric in the run's metric records."""
    from llm_platform.train.metrics import read_metrics

    out: dict = {}
    for record in read_metrics(run_uri):
        out.update({k: v for k, v in record.items() if v is not None and k != "time"})
    return out


def code_version() -> str:
    """`git describe` of the checkout the package runs from, else the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-platform")
    except PackageNotFoundError:
        return "unknown"

