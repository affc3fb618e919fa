"""The checks a training run must pass before any worker starts: config values, the dataset, the pretrained model
and its tokenizer, a checkpoint to resume from, and what the connected cluster can place. Each error names the key.

Entry points call `preflight` before connecting to Ray, so that a bad config fails in a second; `llm-platform run`
calls `check_config` before its data stage, when there is no dataset yet.
"""

from __future__ import annotations

import logging
import os

from llm_platform import storage
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.data.dataset import DatasetInfo, open_dataset
from llm_platform.errors import ConfigError
from llm_platform.models.build import read_pretrained_config, resolve_family
from llm_platform.train import checkpoint as ckpt
from llm_platform.train import objectives, tracking
from llm_platform.train.budget import check_budget

log = logging.getLogger("llm_platform.train")


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
