"""The per-worker training loop, top to bottom: build -> parallelize -> resume -> (step, log, eval, checkpoint)*.

Ray appears only in `get_context`, `get_checkpoint` and `report`; everything else is plain torch and the helpers
beside this module.

Data order (train/reader.py). An epoch's order is fixed by the seed and the run's data partitions P, not by the
number of workers: global micro-batches of `micro_batch_size * num_workers` consecutive positions, each rank taking
its slice, and each rank reading only the partitions its slices come from (1/world of the data when P is the global
micro-batch). So step k sees the same rows whatever the number of workers, a run matches a single-process loop over
the same order, and the data position in a checkpoint is one number: global micro-batches consumed in the epoch
(with P kept beside it). Resuming seeks to it without reading what comes before.

Loss. Each step's loss is the mean over every target token of every micro-batch on every worker: the token count is
all-reduced before the backward passes, each worker backpropagates `sum * world / count`, and FSDP/DDP's gradient
average over workers turns that into the global token mean.
"""

from __future__ import annotations

import itertools

import contextlib
import logging
import math
import tempfile
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from llm_platform import storage
from llm_platform.config import from_dict
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import TrainConfig
from llm_platform.models.build import build_model
from llm_platform.models.flops import peak_flops
from llm_platform.train import checkpoint as ckpt
from llm_platform.train.metrics import MetricsLogger, Throughput, device_memory
from llm_platform.train.objectives import count_targets, loss_sum, prepare_batch
from llm_platform.train.optim import build_optimizer, lr_factor
from llm_platform.train.parallelize import needs_autocast, parallelize, resolve_dtype
from llm_platform.train.reader import RankReader, SplitFiles

log = logging.getLogger("llm_platform.train")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function. `config` is plain data built by `launcher.worker_config`.

    Returns None, or `{"nonfinite_step", "loss"}` when a non-finite loss stopped the run (`on_nonfinite_loss=stop`).
    """
    import ray.train
    import ray.train.torch

    storage.configure(config["storage"])
    mcfg, tc = from_dict(ModelConfig, config["model"]), from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    special, vocab = config["special"], config["vocab_size"]
    seq_len = config["seq_len"]

    # ---- model, parallelism, optimizer: every rank builds the same seeded weights, then shards them. Pretrained
    # weights load in the compute dtype; what trains is kept in fp32 (build_model).
    dtype = resolve_dtype(tc.mixed_precision, device)
    model = build_model(mcfg, vocab, special, pretrained_dir=config.get("pretrained_dir"), seed=tc.seed,
                        dtype=dtype, base_vocab_size=config.get("base_vocab_size"))
    model = parallelize(model, parallelism=tc.parallelism, device=device, compute_dtype=dtype,
                        activation_checkpointing=tc.activation_checkpointing, compile=tc.compile,
                        cpu_offload=tc.cpu_offload, world_size=world)
    optimizer = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2))
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- resume: this run's latest checkpoint (a restart, or a run name reused), else `train.resume_from`.
    rows_per_batch = tc.micro_batch_size * world  # one global micro-batch: the unit of the data position
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "rows_per_batch": rows_per_batch,
             "data_partitions": tc.data_partitions or rows_per_batch}
    checkpoint = ray.train.get_checkpoint() or explicit_checkpoint(tc.resume_from)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = ckpt.load(model, optimizer, directory)
        state["batches_in_epoch"] = ckpt.data_position(state, rows_per_batch)
        state["rows_per_batch"] = rows_per_batch
        # The epoch order is the checkpoint's (older checkpoints: one partition per row of a global micro-batch).
        state["data_partitions"] = int(state.get("data_partitions") or tc.data_partitions or rows_per_batch)
        log.info("rank %d resumed at step %d (epoch %d, batch %d) from %s", rank, state["step"], state["epoch"],
                 state["batches_in_epoch"], checkpoint.path)

    logger = None
    if rank == 0:
        trackers = None
        if tc.mlflow_tracking_uri or tc.wandb_project:
            from llm_platform.train.tracking import Trackers, flatten

            trackers = Trackers(config["train"], run_uri=config["run_uri"],
                                run_name=config["run_uri"].rstrip("/").rsplit("/", 1)[-1],
                                params=flatten({"model": config["model"], "train": config["train"]}))
        logger = MetricsLogger(config["run_uri"], resume_step=state["step"], total_steps=tc.max_steps,
                               trackers=trackers)
    peak = config.get("peak_flops") or (peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda"
                                         else None)
    throughput = Throughput(config["flops_per_token"], peak, world)
    autocast = (torch.autocast(device.type, dtype=dtype) if needs_autocast(tc.parallelism, dtype)
                else contextlib.nullcontext())
    batches = rank_reader(config, "train", tc, rank, world, state["data_partitions"]).batches(state)
    last_val: dict[str, float] = {}
    val_batches: list[dict] | None = None
    step = state["step"]

    while step < tc.max_steps:
        # ---- a step: all micro-batches first, so the loss can be normalised by the global target count.
        torch.manual_seed(tc.seed * 1_000_003 + step * 1009 + rank)  # dropout: replayable on resume
        micro = []
        for i in range(tc.grad_accum_steps):
            gen = torch.Generator().manual_seed(tc.seed * 7919 + step * 131 + i * 17 + rank)
            micro.append(prepare_batch(tc.objective, next(batches), special=special, vocab_size=vocab,
                                       mlm_probability=tc.mlm_probability, generator=gen))
        num_targets = all_reduce_sum(sum(count_targets(t) for _, t in micro), device)
        local_loss = torch.zeros((), device=device)
        for i, (inputs, targets) in enumerate(micro):
            last = i == tc.grad_accum_steps - 1
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            targets = targets.to(device, non_blocking=True)
            with gradient_sync(model, tc.parallelism, last), autocast:
                logits = model(**inputs).logits  # (B, T, V)
                loss = loss_sum(logits, targets)
            if tc.nonfinite_injection_step == step + 1:  # tests only (see TrainConfig): NaN loss and gradients
                loss = loss * float("nan")
            (loss * world / max(num_targets, 1.0)).backward()
            local_loss += loss.detach()
        train_loss = all_reduce_sum(local_loss, device) / max(num_targets, 1.0)

        lr = tc.lr * lr_factor(step, max_steps=tc.max_steps, warmup_steps=tc.warmup_steps, schedule=tc.schedule,
                               min_lr_ratio=tc.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # ---- a non-finite loss stops the run or skips the step. Every rank sees the same all-reduced value, so
        # all take the same branch. Stopping returns (no report): rank 0's return value reaches the launcher as
        # `Result.return_value`, which raises TrainingError; a report would only reach Ray with a checkpoint.
        if not math.isfinite(train_loss):
            optimizer.zero_grad(set_to_none=True)  # NaN gradients must not leak into the next step
            if tc.on_nonfinite_loss != "skip":
                log.error("step %d: the loss is %s; stopping (train.on_nonfinite_loss=stop)", step + 1, train_loss)
                if logger:
                    logger.log(step + 1, {"train/loss": train_loss, "train/lr": lr})
                    logger.close(status="FAILED")
                return {"nonfinite_step": step + 1, "loss": train_loss}
            log.warning("step %d: the loss is %s; step skipped (train.on_nonfinite_loss=skip)", step + 1, train_loss)
        else:
            grad_norm = clip_grad_norm(params, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        state["tokens"] += tc.grad_accum_steps * tc.micro_batch_size * seq_len * world
        throughput.add(tc.grad_accum_steps * tc.micro_batch_size * seq_len * world)
        state["step"] = step

        # ---- log (rank 0), validate, checkpoint; `report` is collective, so every rank takes the same branches.
        if step % tc.log_interval_steps == 0 or step == tc.max_steps:
            train_metrics = {"train/loss": train_loss, "train/lr": optimizer.param_groups[0]["lr"],
                             "train/grad_norm": grad_norm if math.isfinite(train_loss) else float("nan"),
                             "train/tokens": state["tokens"], "train/epoch": state["epoch"],
                             **throughput.measure(), **device_memory()}
            if logger:
                logger.log(step, train_metrics)
        evaluate_now = step % tc.eval_interval_steps == 0 or step == tc.max_steps
        save_now = step % tc.checkpoint_interval_steps == 0 or step == tc.max_steps
        if evaluate_now:
            if val_batches is None:  # the same rows at every validation: read them once
                val_batches = take_val_batches(config, tc, rank, world, state["data_partitions"])
            last_val = validate(model, val_batches, tc, special, vocab, device, autocast)
            if logger and last_val:
                logger.log(step, last_val)
        if evaluate_now or save_now:
            report = {"step": step, "train/loss": train_loss, "train/tokens": state["tokens"], **last_val}
            if save_now:
                with tempfile.TemporaryDirectory(prefix="llmp-ckpt-") as directory:
                    ckpt.save(model, optimizer, dict(state), directory, rank=rank)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                     checkpoint_dir_name=f"checkpoint_{step:08d}")
            else:
                ray.train.report(report)
            throughput.measure()  # restart the interval: validation and saving are not training throughput
    if logger:
        logger.close()
    return None


def explicit_checkpoint(uri: str | None):
    """`train.resume_from` as a Ray Train Checkpoint on its own filesystem (local or s3://), or None."""
    if not uri:
        return None
    import ray.train

    fs, path = storage.pyarrow_filesystem(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def rank_reader(config: dict[str, Any], split: str, tc: TrainConfig, rank: int, world: int, partitions: int,
                shuffle: bool | None = None) -> RankReader:
    """This rank's reader of a split (train/reader.py): its share of each epoch, in the run's order."""
    files = SplitFiles(config["files"][split], config["columns"])
    on = bool(tc.shuffle_buffer_rows) if shuffle is None else shuffle
    return RankReader(files, partitions=partitions, micro_batch_size=tc.micro_batch_size, rank=rank, world=world,
                      seed=tc.seed, shuffle=on, window_rows=tc.shuffle_buffer_rows or 1)


def take_val_batches(config: dict[str, Any], tc: TrainConfig, rank: int, world: int,
                     partitions: int) -> list[dict[str, np.ndarray]]:
    """This rank's rows of the first `eval_batches` global micro-batches of the val split, unshuffled (empty
    without a val split or with fewer rows than one global micro-batch)."""
    if not config["files"].get("val"):
        return []
    reader = rank_reader(config, "val", tc, rank, world, partitions, shuffle=False)
    count = min(tc.eval_batches, reader.batches_per_epoch())
    state = {"epoch": 0, "batches_in_epoch": 0}
    return list(itertools.islice(reader.batches(state), count))  # exactly `count`: no read beyond


def validate(model, batches: list[dict], tc: TrainConfig, special: dict[str, int], vocab: int,
             device: torch.device, autocast) -> dict[str, float]:
    """`val/loss` and `val/perplexity` over this rank's val batches, summed over all ranks (a collective)."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0.0
    gen = torch.Generator().manual_seed(tc.seed)  # MLM: the same masks at every validation
    for batch in batches:
        inputs, targets = prepare_batch(tc.objective, batch, special=special, vocab_size=vocab,
                                        mlm_probability=tc.mlm_probability, generator=gen)
        with autocast:
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        total += loss_sum(logits, targets.to(device)).double()
        count += count_targets(targets)
    model.train()
    loss_total = all_reduce_sum(total, device)
    tokens = all_reduce_sum(count, device)
    if not tokens:
        return {}
    loss = loss_total / tokens
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}


def all_reduce_sum(value, device: torch.device) -> float:
    """Sum a number over all workers (a no-op without a process group)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().to(device).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return float(tensor)


def gradient_sync(model, parallelism: str, sync: bool):
    """Skip the gradient reduction on all but the last micro-batch of a step (FSDP2 / DDP)."""
    if parallelism == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if parallelism == "ddp" and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip to `max_norm` (0 disables clipping) and return the global norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return float(norm)
