"""The per-worker training loop, top to bottom: `setup` (train/worker.py), then per step the LR, `train_step`
(train/step.py) and the periodic work as plain `if step % every == 0` blocks: log, validate, checkpoint and report.

Ray appears only in `report`; `setup` holds the other seams (`get_context`, `get_checkpoint`).

Data order (train/reader.py). An epoch's order is fixed by the seed and the run's data partitions P, not by the
number of workers: global micro-batches of `micro_batch_size * num_workers` consecutive positions, each rank taking
its slice, and each rank reading only the partitions its slices come from (1/world of the data when P is the global
micro-batch). So step k sees the same rows whatever the number of workers, a run matches a single-process loop over
the same order, and the data position in a checkpoint (`DataPosition`) is global micro-batches consumed in the epoch,
with P kept beside it. Resuming seeks to it without reading what comes before.

Reports to Ray Train. One per step at most, on validation steps (with the `val/...` figures of that validation) and
checkpoint steps (with the checkpoint). A checkpoint-only report carries no `val/...` keys: validation figures are
reported where they were measured, never repeated. Reports are collectives, so every rank runs the same blocks.
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Any

from llm_platform.config.choices import OnNonfinite
from llm_platform.train import checkpoint as ckpt
from llm_platform.train.budget import Spend, has_limits, over_budget
from llm_platform.train.metrics import device_memory
from llm_platform.train.step import StepFigures, all_reduce_sum, learning_rate, train_step, validate
from llm_platform.train.worker import Worker, WorkerConfig, rank_reader, setup, take_val_batches

log = logging.getLogger("llm_platform.train")


def train_loop_per_worker(config: WorkerConfig) -> dict[str, Any]:
    """Ray Train's per-worker function.

    Returns `{"spend": {...}}` (what the run spent, train/budget.py), with `{"nonfinite_step", "loss"}` when a
    non-finite loss stopped the run (`on_nonfinite_loss=stop`), or `{"budget_step", "reason"}` when `train.budget` did
    (after a checkpoint at that step). Ray Train hands rank 0's to the launcher.
    """
    w = setup(config)
    tc = config.train
    reader = rank_reader(config, "train", w.rank, w.world, w.state.data.data_partitions)
    batches = reader.batches(w.state.data)  # `reader.position` follows what it yields
    tokens_per_step = tc.grad_accum_steps * tc.micro_batch_size * config.seq_len * w.world
    step, tokens = w.state.step, w.state.tokens
    val_batches: list[dict] | None = None
    while step < tc.max_steps:
        lr = learning_rate(tc, step)
        figures = train_step(w, batches, step, lr)
        # Every rank sees the same all-reduced loss, so all take the same branch.
        if not math.isfinite(figures.loss):
            if tc.on_nonfinite_loss == OnNonfinite.stop:
                return stop_on_nonfinite(w, step + 1, figures, lr)
            log.warning("step %d: the loss is %s; step skipped (train.on_nonfinite_loss=skip)", step + 1,
                        figures.loss)
        step, tokens = step + 1, tokens + tokens_per_step
        w.throughput.add(tokens_per_step)
        last = step == tc.max_steps

        if step % tc.log_interval_steps == 0 or last:
            log_step(w, step, figures, lr, tokens=tokens, epoch=reader.position.epoch)

        validated = step % tc.eval_interval_steps == 0 or last
        val: dict[str, float] = {}
        if validated:
            if val_batches is None:  # the same rows at every validation: read them once
                val_batches = take_val_batches(config, w.rank, w.world, w.state.data.data_partitions)
            val = validate(w, val_batches)
            if w.logger and val:
                w.logger.log(step, val)

        spent = w.meter.spend()
        stop_reason = None if last else budget_stop(w, spent)
        save = step % tc.checkpoint.interval_steps == 0 or last or stop_reason is not None
        if validated or save:
            # `budget/can_stop`: a checkpoint with steps left; a sweep over budget stops its trials at such a report
            # (tune/budget.py), and lets one whose next checkpoint is its last finish.
            metrics = {"step": step, "train/loss": figures.loss, "train/tokens": tokens, **val, **spent.metrics(),
                       "budget/can_stop": int(save and not last)}
            state = ckpt.TrainState(step=step, tokens=tokens, data=reader.position, spend=spent) if save else None
            report(w, metrics, state)

        if stop_reason is not None:
            return stop_on_budget(w, step, stop_reason, spent)
    if w.logger:
        w.logger.close()
    return {"spend": w.meter.spend().to_json()}


def log_step(w: Worker, step: int, figures: StepFigures, lr: float, *, tokens: int, epoch: int) -> None:
    """The step's training line in the record (rank 0). Every rank measures: `measure` restarts the throughput
    interval."""
    metrics = {"train/loss": figures.loss, "train/lr": lr, "train/grad_norm": figures.grad_norm, **figures.extra,
               "train/tokens": tokens, "train/epoch": epoch, **w.throughput.measure(), **device_memory(),
               **w.meter.spend().metrics()}
    if w.logger:
        w.logger.log(step, metrics)


def budget_stop(w: Worker, spent: Spend) -> str | None:
    """Why the run stops at this step for `train.budget`, or None to go on.

    Every rank must stop at the same step (their clocks differ a little), so the decision is all-reduced: a
    collective, made by every rank whenever the budget has limits.
    """
    budget = w.config.train.budget
    if not has_limits(budget):
        return None
    reason = over_budget(spent, budget)
    if all_reduce_sum(float(reason is not None), w.device) == 0:
        return None
    return reason or f"another worker's clock reached train.budget at ${spent.cost_usd:.4g}"


def report(w: Worker, metrics: dict[str, Any], state: ckpt.TrainState | None) -> None:
    """One Ray Train report (a collective), with a checkpoint of `state` when given."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
    else:
        with tempfile.TemporaryDirectory(prefix="llmp-ckpt-") as directory:
            ckpt.save(w.model, w.optimizer, state, directory, rank=w.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_{state.step:08d}")
    w.throughput.measure()  # restart the interval: validation and saving are not training throughput


def stop_on_nonfinite(w: Worker, step: int, figures: StepFigures, lr: float) -> dict[str, Any]:
    """`train.on_nonfinite_loss=stop`: record the step and end the run without a report. Rank 0's return value
    reaches the launcher as `Result.return_value`, which raises TrainingError; a report would only reach Ray with a
    checkpoint."""
    log.error("step %d: the loss is %s; stopping (train.on_nonfinite_loss=stop)", step, figures.loss)
    if w.logger:
        w.logger.log(step, {"train/loss": figures.loss, "train/lr": lr})
        w.logger.close(status="FAILED")
    return {"nonfinite_step": step, "loss": figures.loss, "spend": w.meter.spend().to_json()}


def stop_on_budget(w: Worker, step: int, reason: str, spent: Spend) -> dict[str, Any]:
    """`train.budget` reached: the step's checkpoint is saved (a run with a raised budget resumes from it)."""
    log.warning("step %d: stopping, %s; checkpoint saved", step, reason)
    if w.logger:
        w.logger.log(step, spent.metrics())
        w.logger.close(status="KILLED")
    return {"budget_step": step, "reason": reason, "spend": spent.to_json()}
