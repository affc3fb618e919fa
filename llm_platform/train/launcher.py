"""Launch a training run with Ray Train V2 (`TorchTrainer`), then export and record it.

    checks (no workers yet) -> TorchTrainer.fit (train/loop.py on every worker) -> HF export -> lineage.json

Run folder `runs/<run_name>/` (under the storage root): Ray Train writes `checkpoint_<step>/` there (it is the
run's `storage_path/name`), rank 0 writes `metrics.jsonl` and `tensorboard/`, the driver writes `export/` and, last,
`lineage.json`. A run that reuses a name resumes from its latest checkpoint; a finished run with the same config is
returned as is; `train.checkpoint.resume_from` seeds a new run with another run's checkpoint. A non-finite loss (with
`train.on_nonfinite_loss=stop`) raises `TrainingError` naming the step.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import subprocess
from dataclasses import dataclass

from llm_platform import layout, names, storage
from llm_platform.config import as_dict
from llm_platform.config.model import ModelConfig
from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.data.dataset import DatasetInfo, open_dataset
from llm_platform.errors import ConfigError, StageError
from llm_platform.models.build import build_model, hf_config, read_pretrained_config, resolve_family
from llm_platform.models.flops import flops_per_token, model_size, peak_flops
from llm_platform.train import checkpoint as ckpt
from llm_platform.train import objectives, tracking
from llm_platform.train.budget import check_budget
from llm_platform.train.loop import WorkerConfig
from llm_platform.train.metrics import FollowMetrics

log = logging.getLogger("llm_platform.train")


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


def launch(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, dataset_uri: str, storage_root: str, *,
           run_name: str | None = None, callbacks: list | None = None, extra_lineage: dict | None = None,
           connect=None, prices: PricesConfig | None = None) -> TrainResult:
    """Train `model` on the dataset at `dataset_uri` and return the run's outputs.

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
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from llm_platform.train.parallelize import process_group_backend

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

    worker_config = build_worker_config(model, train, scaling, dataset, run_uri, pretrained_dir,
                                        prices or PricesConfig())
    fs, runs_path = storage.pyarrow_filesystem(layout.runs(storage_root))
    from llm_platform import cluster

    trainer = TorchTrainer(
        # The typed WorkerConfig travels pickled with the function; no `train_loop_config` dict to rebuild.
        functools.partial(_train_fn(), worker_config),
        # CPU offload on GPUs: the offloaded gradients' norm is all-reduced on the host, so gloo joins NCCL.
        torch_config=TorchConfig(backend=process_group_backend(train.parallelism.cpu_offload, scaling.use_gpu)),
        scaling_config=ray_scaling(scaling),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=runs_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.checkpoint.keep_latest),
            callbacks=list(callbacks or []),
            # Train V2's RunConfig (what ray.train exports at runtime); mypy sees the V1 one from ray.air.
            worker_runtime_env={"env_vars": cluster.worker_env()},  # type: ignore[call-arg]
        ),
        # No Ray Data here: each worker reads its own share of the split files (train/reader.py).
        # No `resume_from_checkpoint`: Ray Train V2 refuses it. `train.checkpoint.resume_from` reaches the workers in
        # their WorkerConfig and the loop loads it when the run has no checkpoint of its own (loop.py).
    )
    log.info("training %s (%s, %s) on %d %s worker(s) -> %s", model.name, train.objective,
             train.parallelism.strategy, scaling.num_workers, "GPU" if scaling.use_gpu else "CPU", run_uri)
    with FollowMetrics(run_uri, train.max_steps):
        result = trainer.fit()
    # Rank 0's return value (Train V2's Result; see RunConfig above): what the run spent, and why it stopped early.
    stopped = result.return_value or {}  # type: ignore[attr-defined]
    raise_if_stopped(stopped, run_uri, train)
    metrics = {**last_logged(run_uri), **dict(result.metrics or {})}
    checkpoint_uri = storage.join(run_uri, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    lineage = {
        "kind": "run",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "code_version": code_version(),
        "dataset": {"uri": dataset.uri, "fingerprint": dataset.fingerprint, "manifest_sha256": dataset.manifest_sha256,
                    "tokenizer_sha256": dataset.tokenizer_sha256},
        "run": {"name": run_name, "uri": run_uri, "config": config_record, "metrics": metrics,
                "checkpoint": checkpoint_uri},
        "cost": cost_record(stopped.get("spend"), worker_config.prices, train),
        "sweep": None,
        "base_model": model.pretrained,
        **(extra_lineage or {}),
    }
    export_uri = None
    if train.export and result.checkpoint:
        export_uri = storage.join(run_uri, "export")
        with result.checkpoint.as_directory() as directory:
            export(model, worker_config, dataset, directory, export_uri, lineage)
    storage.write_json(storage.join(run_uri, ckpt.LINEAGE), lineage)  # the run's record, last
    if train.register_as and export_uri:
        from llm_platform.registry import register

        version = register(storage_root, train.register_as, export_uri, lineage)
        log.info("registered %s version %s", train.register_as, getattr(version, "version", version))
    return TrainResult(run_uri=run_uri, export_uri=export_uri, checkpoint_uri=checkpoint_uri, metrics=metrics,
                       lineage=lineage)


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
    reused). The budget is left out: raising it to let a stopped run finish changes nothing it trains."""
    train_record = as_dict(train)
    train_record.pop("budget", None)
    return {"model": as_dict(model), "train": train_record, "scaling": as_dict(scaling)}


def preflight(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, dataset_uri: str,
              storage_root: str) -> tuple[DatasetInfo, str | None]:
    """Open the dataset and the pretrained model and run every config check; no worker is started.

    Entry points call it before connecting to Ray so that a bad config fails in a second with the key named.
    """
    dataset = open_dataset(dataset_uri)
    pretrained_dir = materialize_pretrained(model, storage_root)
    check(model, train, scaling, dataset, pretrained_dir)
    check_resume_from(train, scaling)
    check_budget(train.budget)
    tracking.check(train)
    return dataset, pretrained_dir


def check_resume_from(train: TrainConfig, scaling: ScalingConfig) -> None:
    """Refuse a `train.checkpoint.resume_from` that is not a training checkpoint, is already at `train.max_steps`, or
    whose data position this run's batch shape cannot continue."""
    uri = train.checkpoint.resume_from
    if not uri:
        return
    state_uri = storage.join(uri, ckpt.TRAIN_STATE)
    if not storage.exists(state_uri):
        raise ConfigError(f"train.checkpoint.resume_from={uri!r} is not a training checkpoint ({ckpt.TRAIN_STATE} "
                          f"is missing): give a runs/<run>/checkpoint_<step> folder")
    state = storage.read_json(state_uri)
    if int(state["step"]) >= train.max_steps:
        raise ConfigError(f"train.checkpoint.resume_from={uri!r} is at step {state['step']}, not below "
                          f"train.max_steps={train.max_steps}: nothing to train (raise train.max_steps)")
    try:
        ckpt.data_position(state, train.micro_batch_size * scaling.num_workers)
    except ValueError as e:
        raise ConfigError(f"train.checkpoint.resume_from={uri!r}: {e}") from None


def _train_fn():
    from llm_platform.train.loop import train_loop_per_worker

    return train_loop_per_worker


def check_config(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig) -> None:
    """The checks that need neither the dataset, the checkpoint nor the cluster: `llm-platform run` makes them
    before its data stage. (A value outside a key's choices never gets here: the schema's Enums refuse it.)"""
    counts = {f"train.{key}": getattr(train, key) for key in ("max_steps", "micro_batch_size", "grad_accum_steps",
                                                               "log_interval_steps", "eval_interval_steps")}
    counts["train.checkpoint.interval_steps"] = train.checkpoint.interval_steps
    counts["train.checkpoint.keep_latest"] = train.checkpoint.keep_latest
    for key, value in counts.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if train.parallelism.strategy == "none" and scaling.num_workers != 1:
        raise ConfigError(f"train.parallelism.strategy=none needs scaling.num_workers=1 (got {scaling.num_workers})")
    if model.lora.enabled and model.lora.export == "adapter" and train.register_as:
        raise ConfigError("model.lora.export=adapter writes a peft adapter, which the registry (and serving) cannot "
                          "load: unset train.register_as or export merged")
    if train.parallelism.cpu_offload and train.parallelism.strategy != "fsdp":
        raise ConfigError("train.parallelism.cpu_offload=true needs train.parallelism.strategy=fsdp")


def check(model: ModelConfig, train: TrainConfig, scaling: ScalingConfig, dataset: DatasetInfo,
          pretrained_dir: str | None) -> None:
    """Refuse a config that cannot work, before any worker starts, naming the key."""
    check_config(model, train, scaling)
    pretrained = read_pretrained_config(pretrained_dir) if pretrained_dir else None
    family = resolve_family(model, pretrained)
    where = f"model.pretrained={model.pretrained!r}" if pretrained else f"model.family={model.family!r}"
    if train.objective not in family.objectives:
        raise ConfigError(f"train.objective={train.objective!r} does not fit {where} (a {family.name} model; it "
                          f"trains {', '.join(family.objectives)})")
    kinds = objectives.get(train.objective).dataset_kinds
    if dataset.kind not in kinds:
        wanted = " or ".join(map(repr, kinds))
        raise ConfigError(f"train.objective={train.objective!r} needs a {wanted} dataset; {dataset.uri} is "
                          f"{dataset.kind!r} (set data.kind or train.dataset)")
    if train.objective == "mlm" and dataset.special_token_id("mask") is None:
        raise ConfigError(f"train.objective=mlm needs a mask token; the tokenizer of {dataset.uri} has none")
    positions = model.max_position_embeddings
    if pretrained is not None and pretrained_dir:  # (pretrained is read from pretrained_dir)
        positions = pretrained.get("max_position_embeddings") or pretrained.get("n_positions") or positions
        check_tokenizer(model, dataset, pretrained_dir, int(pretrained.get("vocab_size", 0)))
    if family.name != "t5" and dataset.seq_len > positions:
        raise ConfigError(f"data.seq_len={dataset.seq_len} is beyond model.max_position_embeddings={positions}")
    if model.vocab_size is not None and model.vocab_size != dataset.vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} does not match the dataset tokenizer's vocab size "
                          f"{dataset.vocab_size} (leave model.vocab_size unset to follow the tokenizer)")
    rows = train.micro_batch_size * scaling.num_workers
    train_records = int(dataset.manifest["splits"]["train"]["num_records"])
    if train_records < rows:
        raise ConfigError(f"the train split of {dataset.uri} has {train_records} records, fewer than "
                          f"train.micro_batch_size * scaling.num_workers = {rows}")
    if scaling.check_resources:
        check_placement(scaling)


def check_placement(scaling: ScalingConfig) -> None:
    """Refuse more workers than the connected Ray cluster can place now (skipped without a running Ray)."""
    import ray

    if not ray.is_initialized():
        return
    need_cpu = scaling.num_workers * scaling.cpus_per_worker
    total = ray.cluster_resources()
    if scaling.use_gpu and total.get("GPU", 0) < scaling.num_workers:
        raise ConfigError(f"scaling.num_workers={scaling.num_workers} GPU workers do not fit: the cluster has "
                          f"{int(total.get('GPU', 0))} GPUs "
                          "(set scaling.check_resources=false on an autoscaling cluster)")
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(f"scaling.num_workers={scaling.num_workers} x "
                          f"scaling.cpus_per_worker={scaling.cpus_per_worker} "
                          f"needs {need_cpu:g} CPUs; the cluster has {total.get('CPU', 0):g} "
                          f"(set scaling.check_resources=false on an autoscaling cluster)")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if scaling.placement_strategy == "STRICT_SPREAD" and len(nodes) < scaling.num_workers:
        raise ConfigError(f"scaling.placement_strategy=STRICT_SPREAD needs {scaling.num_workers} nodes; the cluster "
                          f"has {len(nodes)}")


def check_tokenizer(model: ModelConfig, dataset: DatasetInfo, pretrained_dir: str, model_vocab: int) -> None:
    """Refuse a dataset tokenized with another tokenizer than the checkpoint's own (compared by the hash of
    tokenizer.json, not by vocab size: two tokenizers of one size give the same ids different meanings).

    A dataset built from the model's tokenizer plus `tokenizer.special_tokens` records the base hash; its added
    ids get new embedding rows. A checkpoint without tokenizer.json can only be compared by size.
    """
    own = os.path.join(pretrained_dir, "tokenizer.json")
    if not os.path.exists(own):
        log.warning("model.pretrained=%r has no tokenizer.json: only the vocab sizes of model and dataset %s can be "
                    "compared", model.pretrained, dataset.uri)
        if model_vocab < dataset.vocab_size:
            raise ConfigError(f"model.pretrained={model.pretrained!r} has vocab_size={model_vocab}, but the dataset "
                              f"tokenizer has {dataset.vocab_size}: tokenizer and model do not match")
        return
    own_sha = storage.file_sha256(own)
    used = dataset.base_tokenizer_sha256 or dataset.tokenizer_sha256
    if used != own_sha:
        tok_cfg = (dataset.manifest.get("config") or {}).get("tokenizer") or {}
        built_with = (f"tokenizer.kind=pretrained from {dataset.manifest['tokenizer'].get('source')}"
                      if dataset.base_tokenizer_sha256 else f"tokenizer.kind={tok_cfg.get('kind', '?')} (trained on "
                      f"the corpus)")
        raise ConfigError(f"the dataset {dataset.uri} was tokenized with {built_with}, tokenizer.json sha256 "
                          f"{used[:12]}, but model.pretrained={model.pretrained!r} has its own tokenizer, sha256 "
                          f"{own_sha[:12]}: the ids would mean other tokens. Rebuild the data with the model's "
                          f"tokenizer (tokenizer=model, as experiment=finetune does) or set train.dataset to such a "
                          f"dataset")
    if dataset.base_vocab_size is None and model_vocab < dataset.vocab_size:
        raise ConfigError(f"model.pretrained={model.pretrained!r} has vocab_size={model_vocab}, smaller than its own "
                          f"tokenizer's {dataset.vocab_size}")


def materialize_pretrained(model: ModelConfig, storage_root: str) -> str | None:
    """A local folder with the pretrained model (registry reference, s3://, path or Hub id), or None from scratch."""
    if not model.pretrained:
        return None
    from llm_platform.models import pretrained

    return pretrained.materialize(model.pretrained, storage_root)


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
        flops_per_token=flops_per_token(size, dataset.seq_len), compute_dtype=compute_dtype_name(train, scaling),
        pretrained_dir=pretrained_dir, base_vocab_size=dataset.base_vocab_size if pretrained_dir else None,
        peak_flops_per_s=peak_flops(scaling.gpu_type) if scaling.use_gpu else None, prices=prices,
        cpus_per_worker=scaling.cpus_per_worker)


def compute_dtype_name(train: TrainConfig, scaling: ScalingConfig) -> str:
    """The training's compute dtype as a name (`auto` is bf16 on GPU workers, fp32 on CPU ones)."""
    if train.parallelism.mixed_precision == "auto":
        return "bfloat16" if scaling.use_gpu else "float32"
    return "bfloat16" if train.parallelism.mixed_precision == "bf16" else "float32"


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
    if json.loads(json.dumps(run.get("config"), default=str)) != json.loads(json.dumps(config_record, default=str)):
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

