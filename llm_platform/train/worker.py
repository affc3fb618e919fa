"""What a training worker holds and how it gets it: `WorkerConfig` (pickled from the driver), `setup` (build,
parallelize, resume, the rank-0 metrics sink) and the readers of the train and val splits (train/reader.py).

Ray appears only in `setup` (`get_context`, `get_device`, `get_checkpoint`) and `explicit_checkpoint`;
`build_worker` below them is plain torch, so a test builds a worker without a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from typing import Any

import numpy as np
import torch

from llm_platform import storage
from llm_platform.config import as_dict
from llm_platform.config.choices import Objective
from llm_platform.config.model import ModelConfig
from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import TrainConfig
from llm_platform.models.build import build_model
from llm_platform.models.flops import peak_flops
from llm_platform.train import checkpoint as ckpt
from llm_platform.train import objectives
from llm_platform.train import preference as pref
from llm_platform.train.budget import CostMeter, Placement, price_placement
from llm_platform.train.metrics import MetricsLogger, Throughput, TrainGauges
from llm_platform.train.optim import build_optimizer
from llm_platform.train.parallelize import needs_autocast, parallelize
from llm_platform.train.reader import DataPosition, RankReader, SplitFiles

log = logging.getLogger("llm_platform.train")


@dataclasses.dataclass
class WorkerConfig:
    """What every worker receives: built on the driver (`launcher.build_worker_config`) and pickled to the workers."""

    model: ModelConfig
    train: TrainConfig
    storage: dict[str, Any]
    """The driver's `storage.settings()`."""
    run_uri: str
    """The run folder `runs/<run_name>/`."""
    special: dict[str, int | None]
    """Token ids `eos`, `pad`, `mask` of the dataset's tokenizer."""
    vocab_size: int
    """The dataset tokenizer's vocabulary size."""
    seq_len: int
    """Tokens per dataset row."""
    files: dict[str, list[str]]
    """Parquet files of the `train` and `val` splits."""
    flops_per_token: float
    """Training FLOPs per token of the model (for MFU)."""
    compute_dtype: str
    """bfloat16 or float32: `train.parallelism.mixed_precision` resolved once on the driver (train/precision.py)."""
    pretrained_dir: str | None = None
    """Local folder of the pretrained model fine-tuned, if any."""
    base_vocab_size: int | None = None
    """The pretrained tokenizer's size when the dataset added tokens to it."""
    peak_flops_per_s: float | None = None
    """Peak FLOP/s of one device for MFU; None looks the device up."""
    row_groups: dict[str, list[list[list[int]]] | None] = dataclasses.field(default_factory=dict)
    """Per split, each file's row groups from the manifest (None: read from the files' footers)."""
    prices: PricesConfig = dataclasses.field(default_factory=PricesConfig)
    """The price table the run's cost and `train.budget` are counted in (`plan.prices`)."""
    cpus_per_worker: float = 1.0
    """vCPUs each worker holds (what a CPU-only run is priced by)."""


@dataclasses.dataclass
class Worker:
    """One worker's training objects, built by `setup`."""

    config: WorkerConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objective: objectives.ObjectiveSpec
    autocast: Any
    """The forward pass's autocast context (a null context where parameters are already in the compute dtype)."""
    state: ckpt.TrainState
    """Where the run starts: step, tokens and data position (a checkpoint's, or zero)."""
    logger: MetricsLogger | None
    """Rank 0's metrics sink; None on other ranks."""
    throughput: Throughput
    meter: CostMeter
    """What the run has spent so far (train/budget.py)."""
    reference: torch.nn.Module | None = None
    """DPO's frozen reference model (None: not DPO, or LoRA, whose reference is the policy without adapters)."""


def setup(config: WorkerConfig) -> Worker:
    """This Ray Train worker's objects (`build_worker`), resumed from this run's latest checkpoint (a restart, or a
    run name reused), else `train.checkpoint.resume_from`, else step 0."""
    import ray.train
    import ray.train.torch

    storage.configure(config.storage)  # before reading `resume_from`, which may be on S3
    ctx = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint() or explicit_checkpoint(config.train.checkpoint.resume_from)
    return build_worker(config, rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                        device=ray.train.torch.get_device(), checkpoint=checkpoint)


def build_worker(config: WorkerConfig, *, rank: int, world: int, device: torch.device, checkpoint) -> Worker:
    """Build the model, parallelize it, build the optimizer, and load `checkpoint` (a Ray Train Checkpoint, or None
    for step 0) into them. Plain torch: what `setup` does once Ray has said who and where this worker is."""
    mcfg, tc = config.model, config.train
    dtype = getattr(torch, config.compute_dtype)
    model = build_parallel_model(config, device, dtype, world)
    opt = tc.optimizer
    optimizer = build_optimizer(model, lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.beta1, opt.beta2))
    state = resume(config, checkpoint, model, optimizer, rank, world)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    placement = price_placement(config.prices, device=device_name, world=world,
                                cpus_per_worker=config.cpus_per_worker, budget=tc.budget)
    peak = config.peak_flops_per_s or (peak_flops(device_name) if device_name else None)
    autocast = (torch.autocast(device.type, dtype=dtype) if needs_autocast(tc.parallelism.strategy, dtype)
                else contextlib.nullcontext())
    reference = None
    if tc.objective == Objective.dpo:
        reference = pref.build_reference(mcfg, tc, vocab_size=config.vocab_size, special=config.special,
                                         pretrained_dir=config.pretrained_dir, base_vocab_size=config.base_vocab_size,
                                         dtype=dtype, device=device, world=world)
    return Worker(config=config, rank=rank, world=world, device=device, model=model, optimizer=optimizer,
                  objective=objectives.get(tc.objective), autocast=autocast, state=state,
                  logger=rank0_logger(config, state, placement) if rank == 0 else None,
                  throughput=Throughput(config.flops_per_token, peak, world),
                  meter=CostMeter(placement, saved=state.spend), reference=reference)


def build_parallel_model(config: WorkerConfig, device: torch.device, dtype: torch.dtype,
                         world: int) -> torch.nn.Module:
    """Every rank builds the same seeded weights, then shards them. Pretrained weights load in the compute dtype;
    what trains is kept in fp32 (build_model)."""
    tc, par = config.train, config.train.parallelism
    model = build_model(config.model, config.vocab_size, config.special, pretrained_dir=config.pretrained_dir,
                        seed=tc.seed, dtype=dtype, base_vocab_size=config.base_vocab_size)
    return parallelize(model, parallelism=par.strategy, device=device, compute_dtype=dtype,
                       activation_checkpointing=par.activation_checkpointing, compile=par.compile,
                       cpu_offload=par.cpu_offload, world_size=world)


def resume(config: WorkerConfig, checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
           world: int) -> ckpt.TrainState:
    """Load `checkpoint` (or nothing, when None) into `model` and `optimizer`, and return where the run starts: the
    checkpoint's state, else step 0 at the epoch's start."""
    tc = config.train
    rows_per_batch = tc.micro_batch_size * world  # one global micro-batch: the unit of the data position
    partitions = tc.data_partitions or rows_per_batch
    if not checkpoint:
        return ckpt.TrainState(step=0, tokens=0, data=DataPosition(rows_per_batch=rows_per_batch,
                                                                   data_partitions=partitions))
    with checkpoint.as_directory() as directory:
        saved = ckpt.load(model, optimizer, directory)
    # The epoch order is the checkpoint's (older checkpoints: one partition per row of a global micro-batch).
    state = ckpt.TrainState.from_json(saved, rows_per_batch=rows_per_batch, data_partitions=partitions)
    log.info("rank %d resumed at step %d (epoch %d, batch %d) from %s", rank, state.step, state.data.epoch,
             state.data.batches_in_epoch, checkpoint.path)
    return state


def rank0_logger(config: WorkerConfig, state: ckpt.TrainState, placement: Placement) -> MetricsLogger:
    """Rank 0's metrics sink: metrics.jsonl and TensorBoard, the run's gauges, and MLflow / W&B when configured."""
    tc = config.train
    run_name = config.run_uri.rstrip("/").rsplit("/", 1)[-1]
    log.info("placement: %s; spent so far $%.4g", placement.describe(), state.spend.cost_usd)
    trackers = None
    if tc.mlflow_tracking_uri or tc.wandb_project:
        from llm_platform.train.tracking import Trackers, flatten

        train_dict = as_dict(tc)
        trackers = Trackers(train_dict, run_uri=config.run_uri, run_name=run_name,
                            params=flatten({"model": as_dict(config.model), "train": train_dict}))
    return MetricsLogger(config.run_uri, resume_step=state.step, total_steps=tc.max_steps, trackers=trackers,
                         gauges=TrainGauges(run_name, tc.budget.max_cost_usd))


def explicit_checkpoint(uri: str | None):
    """`train.checkpoint.resume_from` as a Ray Train Checkpoint on its own filesystem (local or s3://), or None."""
    if not uri:
        return None
    import ray.train

    fs, path = storage.pyarrow_filesystem(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def rank_reader(config: WorkerConfig, split: str, rank: int, world: int, partitions: int,
                shuffle: bool | None = None) -> RankReader:
    """This rank's reader of a split (train/reader.py): its share of each epoch, in the run's order."""
    tc = config.train
    files = SplitFiles(config.files[split], list(objectives.get(tc.objective).columns),
                       row_groups=config.row_groups.get(split))
    on = bool(tc.shuffle_buffer_rows) if shuffle is None else shuffle
    return RankReader(files, partitions=partitions, micro_batch_size=tc.micro_batch_size, rank=rank, world=world,
                      seed=tc.seed, shuffle=on, window_rows=tc.shuffle_buffer_rows or 1)


def take_val_batches(config: WorkerConfig, rank: int, world: int, partitions: int) -> list[dict[str, np.ndarray]]:
    """This rank's rows of the first `eval_batches` global micro-batches of the val split, unshuffled (empty
    without a val split or with fewer rows than one global micro-batch)."""
    if not config.files.get("val"):
        return []
    reader = rank_reader(config, "val", rank, world, partitions, shuffle=False)
    count = min(config.train.eval_batches, reader.batches_per_epoch())
    return list(itertools.islice(reader.batches(reader.position), count))  # exactly `count`: no read beyond
