"""What ASHA early stopping saves: the same search with ASHA and with FIFO (every trial to its full budget), in one run.

    python benchmarks/tune_savings.py [--trials 16] [--max-steps 40] [--eval-every 5] [--concurrency 2]

Both sweeps train exactly the same trial configs (a grid of learning rates spread log-uniformly over three
decades, in a seeded random order) of a tiny GPT-2 on a generated pretraining dataset, one Ray Train worker per
trial, on a local Ray. Prints, per sweep: trials finished and stopped, total training iterations (reports: one per
validation) and optimizer steps spent, the best final `val/loss` and wall time; the last line is
`ratio=<ASHA iterations / full-budget iterations>`. The goal: ratio <= 0.5 with a best loss within 2%.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TMPDIR", "/tmp/llmp-ray")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # ASHA's asynchronous rungs pass the first trials of each concurrent slot before it can compare them, so a small
    # search (8 trials on 2 slots: 4 finished) hides what it saves; 16 is a sweep worth early stopping.
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--reduction-factor", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from fixtures.training import make_dataset

    from llm_platform import cluster
    from llm_platform.config.cluster import ClusterConfig
    from llm_platform.config.model import ModelConfig
    from llm_platform.config.train import (
        CheckpointConfig,
        OptimizerConfig,
        ParallelismConfig,
        ScalingConfig,
        TrainConfig,
    )
    from llm_platform.config.tune import TuneConfig
    from llm_platform.tune.driver import run_sweep

    root = tempfile.mkdtemp(prefix="llmp-tune-bench-")
    dataset = make_dataset(root, "pretrain", seq_len=32, num_documents=800)
    cluster.connect(ClusterConfig(num_cpus=8, log_to_driver=False))
    model = ModelConfig(name="bench", family="gpt2", num_layers=2, num_heads=4, hidden_size=32,
                        max_position_embeddings=64)
    train = TrainConfig(max_steps=args.max_steps, micro_batch_size=4, log_interval_steps=args.eval_every,
                        eval_interval_steps=args.eval_every, eval_batches=2,
                        checkpoint=CheckpointConfig(interval_steps=args.max_steps, keep_latest=1),
                        optimizer=OptimizerConfig(warmup_steps=2), parallelism=ParallelismConfig(strategy="none"))
    scaling = ScalingConfig(num_workers=1, cpus_per_worker=1)
    # The same configs for both sweeps: a seeded shuffle of log-spaced learning rates (1e-5 .. 3e-2).
    lrs = [float(f"{1e-5 * (3e3 ** (i / max(args.trials - 1, 1))):.3g}") for i in range(args.trials)]
    random.Random(args.seed).shuffle(lrs)
    print(f"learning rates, in trial order: {lrs}")

    rows = []
    for scheduler in ("fifo", "asha"):
        cfg = TuneConfig(name=f"bench-{scheduler}", space={"train.optimizer.lr": {"grid": lrs}}, num_samples=1,
                         max_concurrent_trials=args.concurrency, scheduler=scheduler, grace_period=1,
                         reduction_factor=args.reduction_factor, verbose=0)
        start = time.perf_counter()
        result = run_sweep(cfg, model, train, scaling, dataset, root, register=False)
        wall = time.perf_counter() - start
        trials = result.trials
        rows.append({
            "search": "full budget (FIFO)" if scheduler == "fifo" else "ASHA",
            "finished": sum(t.status == "finished" for t in trials),
            "stopped": sum(t.status == "stopped" for t in trials),
            "iterations": sum(t.iterations for t in trials),
            "steps": sum(max((int(r.get("step", 0)) for r in t.reports), default=0) for t in trials),
            "best val/loss": result.winner.last("val/loss"),
            "best lr": result.winner.params["train.optimizer.lr"],
            "wall s": wall,
        })
    cols = list(rows[0])
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>18.4g}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    full, asha = rows
    gap = (asha["best val/loss"] - full["best val/loss"]) / full["best val/loss"]
    print(f"ASHA best val/loss is {gap:+.2%} from the full-budget search's")
    print(f"ratio={asha['iterations'] / full['iterations']:.3f}")


if __name__ == "__main__":
    main()
