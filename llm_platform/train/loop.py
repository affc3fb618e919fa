"""The per-worker training loop, top to bottom: `setup` (build, parallelize, resume), then per step `train_step`
and the periodic hooks (log, validate, checkpoint), each registered with its interval.

Ray appears only in `get_context`, `get_checkpoint` and `report`; everything else is plain torch and the helpers
beside this module.

Data order (train/reader.py). An epoch's order is fixed by the seed and the run's data partitions P, not by the
number of workers: global micro-batches of `micro_batch_size * num_workers` consecutive positions, each rank taking
its slice, and each rank reading only the partitions its slices come from (1/world of the data when P is the global
micro-batch). So step k sees the same rows whatever the number of workers, a run matches a single-process loop over
the same order, and the data position in a checkpoint (`DataPosition`) is global micro-batches consumed in the epoch,
with P kept beside it. Resuming seeks to it without reading what comes before.

Loss. Each step's loss is the mean over every target token of every micro-batch on every worker: the token count is
all-reduced before the backward passes, each worker backpropagates `sum * world / count`, and FSDP/DDP's gradient
average over workers turns that into the global token mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from llm_platform import storage
from llm_platform.config import as_dict
from llm_platform.config.model import ModelConfig
from llm_platform.config.prices import PricesConfig
from llm_platform.config.train import TrainConfig
from llm_platform.models.build import build_model
from llm_platform.models.flops import peak_flops
from llm_platform.train import checkpoint as ckpt
from llm_platform.train import objectives
from llm_platform.train import preference as pref
from llm_platform.train.budget import CostMeter, has_limits, over_budget, price_placement
from llm_platform.train.metrics import MetricsLogger, Throughput, TrainGauges, device_memory
from llm_platform.train.objectives import count_targets, loss_sum
from llm_platform.train.optim import build_optimizer, lr_factor
from llm_platform.train.parallelize import needs_autocast, parallelize, resolve_dtype
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
    """bfloat16 or float32 (what `train.parallelism.mixed_precision` resolves to)."""
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


@dataclasses.dataclass
class StepResult:
    """One optimizer step's outcome, and what the hooks due at it want reported to Ray Train."""

    step: int
    """Steps done, this one included (1-based, as in metrics.jsonl)."""
    loss: float
    lr: float
    grad_norm: float
    """Global gradient norm before clipping; NaN for a skipped step."""
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    """The objective's own step figures (DPO: `train/rewards/accuracy`, ...), global means."""
    report: bool = False
    """A hook due at this step asks for a Ray Train report (one per step at most)."""
    save: bool = False
    """The report carries a checkpoint."""


@dataclasses.dataclass
class Hook:
    """A call every `interval_steps` optimizer steps and at the last one."""

    interval_steps: int
    call: Callable[[StepResult], None]

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.interval_steps == 0 or step == max_steps


def train_loop_per_worker(config: WorkerConfig) -> dict[str, Any]:
    """Ray Train's per-worker function.

    Returns `{"spend": {...}}` (what the run spent, train/budget.py), with `{"nonfinite_step", "loss"}` when a
    non-finite loss stopped the run (`on_nonfinite_loss=stop`), or `{"budget_step", "reason"}` when `train.budget` did
    (after a checkpoint at that step). Ray Train hands rank 0's to the launcher.
    """
    import ray.train

    w = setup(config)
    tc = config.train
    reader = rank_reader(config, "train", w.rank, w.world, w.state.data.data_partitions)
    batches = reader.batches(w.state.data)  # `reader.position` follows what it yields
    tokens_per_step = tc.grad_accum_steps * tc.micro_batch_size * config.seq_len * w.world
    step, tokens = w.state.step, w.state.tokens
    last_val: dict[str, float] = {}
    val_batches: list[dict] | None = None

    def log_train(result: StepResult) -> None:  # every rank: measure() restarts the throughput interval
        metrics = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
                   **result.extra, "train/tokens": tokens, "train/epoch": reader.position.epoch,
                   **w.throughput.measure(), **device_memory(), **w.meter.spend().metrics()}
        if w.logger:
            w.logger.log(result.step, metrics)

    def validate_now(result: StepResult) -> None:
        nonlocal val_batches, last_val
        if val_batches is None:  # the same rows at every validation: read them once
            val_batches = take_val_batches(config, w.rank, w.world, w.state.data.data_partitions)
        last_val = validate(w, val_batches)
        if w.logger and last_val:
            w.logger.log(result.step, last_val)
        result.report = True

    def checkpoint_now(result: StepResult) -> None:  # the checkpoint goes with the step's report
        result.report = result.save = True

    hooks = [Hook(tc.log_interval_steps, log_train), Hook(tc.eval_interval_steps, validate_now),
             Hook(tc.checkpoint.interval_steps, checkpoint_now)]

    while step < tc.max_steps:
        result = train_step(w, batches, step)
        # ---- a non-finite loss stops the run or skips the step. Every rank sees the same all-reduced value, so
        # all take the same branch. Stopping returns (no report): rank 0's return value reaches the launcher as
        # `Result.return_value`, which raises TrainingError; a report would only reach Ray with a checkpoint.
        if not math.isfinite(result.loss):
            if tc.on_nonfinite_loss != "skip":
                log.error("step %d: the loss is %s; stopping (train.on_nonfinite_loss=stop)", step + 1, result.loss)
                if w.logger:
                    w.logger.log(step + 1, {"train/loss": result.loss, "train/lr": result.lr})
                    w.logger.close(status="FAILED")
                return {"nonfinite_step": step + 1, "loss": result.loss, "spend": w.meter.spend().to_json()}
            log.warning("step %d: the loss is %s; step skipped (train.on_nonfinite_loss=skip)", step + 1,
                        result.loss)
        step, tokens = step + 1, tokens + tokens_per_step
        w.throughput.add(tokens_per_step)

        # ---- periodic hooks in their order (log, validate, checkpoint), then at most one Ray report. `report` is
        # collective, so every rank runs the same hooks.
        for hook in hooks:
            if hook.due(step, tc.max_steps):
                hook.call(result)
        # ---- the budget: every rank must stop at the same step (their clocks differ a little), so the decision is
        # all-reduced, and the stop saves a checkpoint for a run with a raised budget to resume from.
        spent = w.meter.spend()
        reason = over_budget(spent, tc.budget)
        stop = step < tc.max_steps and has_limits(tc.budget) and all_reduce_sum(float(reason is not None), w.device) > 0
        if stop:
            result.report = result.save = True
        if result.report:
            # `budget/can_stop`: a checkpoint with steps left; a sweep over budget stops its trials at such a report
            # (tune/budget.py), and lets one whose next checkpoint is its last finish.
            report = {"step": step, "train/loss": result.loss, "train/tokens": tokens, **last_val,
                      **spent.metrics(), "budget/can_stop": int(result.save and step < tc.max_steps)}
            if result.save:
                state = ckpt.TrainState(step=step, tokens=tokens, data=reader.position, spend=spent)
                with tempfile.TemporaryDirectory(prefix="llmp-ckpt-") as directory:
                    ckpt.save(w.model, w.optimizer, state, directory, rank=w.rank)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                     checkpoint_dir_name=f"checkpoint_{step:08d}")
            else:
                ray.train.report(report)
            w.throughput.measure()  # restart the interval: validation and saving are not training throughput
        if stop:
            why = reason or f"another worker's clock reached train.budget at ${spent.cost_usd:.4g}"
            log.warning("step %d: stopping, %s; checkpoint saved", step, why)
            if w.logger:
                w.logger.log(step, spent.metrics())
                w.logger.close(status="KILLED")
            return {"budget_step": step, "reason": why, "spend": spent.to_json()}
    if w.logger:
        w.logger.close()
    return {"spend": w.meter.spend().to_json()}


def setup(config: WorkerConfig) -> Worker:
    """Build the model, parallelize it, build the optimizer, and resume: this run's latest checkpoint (a restart, or
    a run name reused), else `train.checkpoint.resume_from`, else step 0."""
    import ray.train
    import ray.train.torch

    storage.configure(config.storage)
    mcfg, tc, par = config.model, config.train, config.train.parallelism
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    # Every rank builds the same seeded weights, then shards them. Pretrained weights load in the compute dtype;
    # what trains is kept in fp32 (build_model).
    dtype = resolve_dtype(par.mixed_precision, device)
    model = build_model(mcfg, config.vocab_size, config.special, pretrained_dir=config.pretrained_dir, seed=tc.seed,
                        dtype=dtype, base_vocab_size=config.base_vocab_size)
    model = parallelize(model, parallelism=par.strategy, device=device, compute_dtype=dtype,
                        activation_checkpointing=par.activation_checkpointing, compile=par.compile,
                        cpu_offload=par.cpu_offload, world_size=world)
    opt = tc.optimizer
    optimizer = build_optimizer(model, lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.beta1, opt.beta2))

    rows_per_batch = tc.micro_batch_size * world  # one global micro-batch: the unit of the data position
    partitions = tc.data_partitions or rows_per_batch
    state = ckpt.TrainState(step=0, tokens=0, data=DataPosition(rows_per_batch=rows_per_batch,
                                                                data_partitions=partitions))
    checkpoint = ray.train.get_checkpoint() or explicit_checkpoint(tc.checkpoint.resume_from)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saved = ckpt.load(model, optimizer, directory)
        # The epoch order is the checkpoint's (older checkpoints: one partition per row of a global micro-batch).
        state = ckpt.TrainState.from_json(saved, rows_per_batch=rows_per_batch, data_partitions=partitions)
        log.info("rank %d resumed at step %d (epoch %d, batch %d) from %s", rank, state.step, state.data.epoch,
                 state.data.batches_in_epoch, checkpoint.path)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    placement = price_placement(config.prices, device=device_name, world=world,
                                cpus_per_worker=config.cpus_per_worker, budget=tc.budget)
    meter = CostMeter(placement, saved=state.spend)
    logger = None
    if rank == 0:
        log.info("placement: %s; spent so far $%.4g", placement.describe(), state.spend.cost_usd)
        trackers = None
        if tc.mlflow_tracking_uri or tc.wandb_project:
            from llm_platform.train.tracking import Trackers, flatten

            train_dict = as_dict(tc)
            trackers = Trackers(train_dict, run_uri=config.run_uri,
                                run_name=config.run_uri.rstrip("/").rsplit("/", 1)[-1],
                                params=flatten({"model": as_dict(mcfg), "train": train_dict}))
        gauges = TrainGauges(config.run_uri.rstrip("/").rsplit("/", 1)[-1], tc.budget.max_cost_usd)
        logger = MetricsLogger(config.run_uri, resume_step=state.step, total_steps=tc.max_steps, trackers=trackers,
                               gauges=gauges)
    peak = config.peak_flops_per_s or (peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda"
                                       else None)
    autocast = (torch.autocast(device.type, dtype=dtype) if needs_autocast(par.strategy, dtype)
                else contextlib.nullcontext())
    return Worker(config=config, rank=rank, world=world, device=device, model=model, optimizer=optimizer,
                  objective=objectives.get(tc.objective), autocast=autocast, state=state, logger=logger,
                  throughput=Throughput(config.flops_per_token, peak, world), meter=meter,
                  reference=pref.build_reference(mcfg, tc, vocab_size=config.vocab_size, special=config.special,
                                                 pretrained_dir=config.pretrained_dir,
                                                 base_vocab_size=config.base_vocab_size, dtype=dtype, device=device,
                                                 world=world) if tc.objective == "dpo" else None)


def train_step(w: Worker, batches: Iterator[dict[str, np.ndarray]], step: int) -> StepResult:
    """Optimizer step `step + 1`: every micro-batch is read first, so the loss can be normalised by the global
    target count; then forward/backward each, and clip and step unless the loss is not finite."""
    tc, opt = w.config.train, w.config.train.optimizer
    torch.manual_seed(tc.seed * 1_000_003 + step * 1009 + w.rank)  # dropout: replayable on resume
    micro = []
    for i in range(tc.grad_accum_steps):
        gen = torch.Generator().manual_seed(tc.seed * 7919 + step * 131 + i * 17 + w.rank)
        micro.append(w.objective.prepare(next(batches), special=w.config.special, vocab_size=w.config.vocab_size,
                                         mlm_probability=tc.mlm_probability, generator=gen))
    num_targets = all_reduce_sum(sum(count_of(w, t) for _, t in micro), w.device)
    local_loss = torch.zeros((), device=w.device)
    sums: dict[str, torch.Tensor] = {}
    for i, (inputs, targets) in enumerate(micro):
        last = i == tc.grad_accum_steps - 1
        inputs = {k: v.to(w.device, non_blocking=True) for k, v in inputs.items()}
        targets = targets.to(w.device, non_blocking=True)
        with gradient_sync(w.model, tc.parallelism.strategy, last), w.autocast:
            loss = micro_loss(w, inputs, targets, sums)
        (loss * w.world / max(num_targets, 1.0)).backward()
        local_loss += loss.detach()
    train_loss = all_reduce_sum(local_loss, w.device) / max(num_targets, 1.0)
    extra = {f"train/{k}": v for k, v in global_means(w, sums, num_targets).items()}

    lr = opt.lr * lr_factor(step, max_steps=tc.max_steps, warmup_steps=opt.warmup_steps, schedule=opt.schedule,
                            min_lr_ratio=opt.min_lr_ratio)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    grad_norm = float("nan")
    if math.isfinite(train_loss):
        grad_norm = clip_grad_norm([p for p in w.model.parameters() if p.requires_grad], opt.grad_clip)
        w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)  # a skipped step's NaN gradients must not leak into the next one
    return StepResult(step=step + 1, loss=train_loss, lr=lr, grad_norm=grad_norm, extra=extra)


def count_of(w: Worker, targets: torch.Tensor) -> int:
    """What the step's loss is a mean over: target tokens, or for DPO pairs (chosen rows, then rejected ones)."""
    return targets.shape[0] // 2 if w.config.train.objective == "dpo" else count_targets(targets)


def micro_loss(w: Worker, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
               sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """One micro-batch's summed loss (over tokens, or DPO's pairs, whose figures are added to `sums`)."""
    if w.config.train.objective == "dpo":
        pairs = pref.pair_losses(w.model, w.reference, inputs, targets, w.config.train.preference)
        pref.add_sums(sums, pairs.sums())
        return pairs.loss.sum()
    return loss_sum(w.model(**inputs).logits, targets)  # logits (B, T, V)


def global_means(w: Worker, sums: dict[str, torch.Tensor], count: float) -> dict[str, float]:
    """The objective's figures (DPO's `pref.FIGURES`), each summed over all workers and divided by the global count:
    one all-reduce, made by every rank whatever it had to add (a collective)."""
    keys = pref.FIGURES if w.config.train.objective == "dpo" else ()
    if not keys:
        return {}
    zero = torch.zeros((), dtype=torch.float64)
    total = torch.stack([sums.get(k, zero) for k in keys]).to(w.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return {k: float(v) / max(count, 1.0) for k, v in zip(keys, total.tolist())}


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


def validate(w: Worker, batches: list[dict]) -> dict[str, float]:
    """`val/loss` and `val/perplexity` (DPO: `val/loss` and the reward figures, `val/rewards/accuracy`...) over this
    rank's val batches, summed over all ranks (a collective)."""
    tc = w.config.train
    w.model.eval()
    total = torch.zeros((), device=w.device, dtype=torch.float64)
    count = 0.0
    sums: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(tc.seed)  # MLM: the same masks at every validation
    with torch.no_grad():
        for batch in batches:
            inputs, targets = w.objective.prepare(batch, special=w.config.special, vocab_size=w.config.vocab_size,
                                                  mlm_probability=tc.mlm_probability, generator=gen)
            with w.autocast:
                summed = micro_loss(w, {k: v.to(w.device) for k, v in inputs.items()}, targets.to(w.device), sums)
            total += summed.double()
            count += count_of(w, targets)
    w.model.train()
    loss_total = all_reduce_sum(total, w.device)
    counted = all_reduce_sum(count, w.device)
    figures = {f"val/{k}": v for k, v in global_means(w, sums, counted).items()}
    if not counted:
        return {}
    loss = loss_total / counted
    if tc.objective == "dpo":  # a mean over pairs: no perplexity
        return {"val/loss": loss, **figures}
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
