"""Training throughput: a plain PyTorch loop vs `llm-platform train` (Ray Train, one worker) on the same model and
data, in one run; then 2 workers (FSDP2) vs 1.

    python benchmarks/train_throughput.py [--steps 40] [--hidden 128] [--layers 4]

Both sides train the same GPT-2 on the same dataset (the data stage's sample corpus, built or reused under
`--root`) with the same micro-batch. The plain loop is timed after `--warmup` steps; ours is the mean
`perf/tokens_per_s` its rank 0 logged after the first interval (so Ray's start-up and the first Ray Data read are
excluded on both sides, but our per-step work, logging and collective reports are included). Last line:
`ratio=<ours / plain>` (goal: at least 0.9). On a shared or small machine, run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch


def dataset_uri(root: str, seq_len: int) -> str:
    from llm_platform.config.data import DataConfig, SampleCorpusConfig
    from llm_platform.config.tokenizer import TokenizerConfig
    from llm_platform.data.pipeline import build_dataset, resolve_dataset

    data = DataConfig(name="bench", seq_len=seq_len, sample=SampleCorpusConfig(num_documents=2000))
    tok = TokenizerConfig(vocab_size=1024)
    return resolve_dataset(data, tok, root) or build_dataset(data, tok, root).uri


def plain_loop(uri: str, model_cfg, steps: int, warmup: int, micro_batch: int) -> float:
    """Tokens/s of a single-process loop over the same rows (read once into memory, like a tuned baseline)."""
    import pyarrow.parquet as pq

    from llm_platform import storage
    from llm_platform.data.dataset import open_dataset
    from llm_platform.models.build import build_model
    from llm_platform.train.optim import build_optimizer

    info = open_dataset(uri)
    rows = []
    for f in info.files["train"]:
        with storage.open_read(f) as fh:
            rows += pq.read_table(fh).column("input_ids").to_pylist()
    data = torch.tensor(rows, dtype=torch.long)
    special = {n: info.special_token_id(n) for n in ("eos", "pad", "mask")}
    model = build_model(model_cfg, info.vocab_size, special, seed=0)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        i = (step * micro_batch) % (len(data) - micro_batch)
        batch = data[i:i + micro_batch]  # (B, T)
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * micro_batch * data.size(1) / (time.perf_counter() - start)


def ours(uri: str, root: str, model_cfg, steps: int, micro_batch: int, workers: int) -> float:
    from llm_platform.config.train import CheckpointConfig, ParallelismConfig, ScalingConfig, TrainConfig
    from llm_platform.train.launcher import launch

    interval = max(1, steps // 8)
    tc = TrainConfig(max_steps=steps, micro_batch_size=micro_batch, log_interval_steps=interval,
                     eval_interval_steps=steps, eval_batches=1, export=False, max_failures=0,
                     checkpoint=CheckpointConfig(interval_steps=steps),
                     parallelism=ParallelismConfig(strategy="none" if workers == 1 else "fsdp"))
    name = f"bench-{workers}w-{int(time.time())}"
    launch(model_cfg, tc, ScalingConfig(num_workers=workers, cpus_per_worker=1), uri, root, run_name=name)
    lines = [json.loads(x) for x in open(os.path.join(root, "runs", name, "metrics.jsonl")) if x.strip()]
    rates = [x["perf/tokens_per_s"] for x in lines if "perf/tokens_per_s" in x][1:]  # drop the first interval
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "llmp-bench-train"))
    parser.add_argument("--skip-two-workers", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    torch.set_num_threads(1)  # each Ray worker gets one CPU; give the plain loop the same
    from llm_platform import cluster
    from llm_platform.config.cluster import ClusterConfig
    from llm_platform.config.model import ModelConfig

    cluster.connect(ClusterConfig(num_cpus=4, log_to_driver=False))
    uri = dataset_uri(args.root, args.seq_len)
    model_cfg = ModelConfig(name="bench", num_layers=args.layers, hidden_size=args.hidden, num_heads=4,
                            max_position_embeddings=args.seq_len)
    plain = plain_loop(uri, model_cfg, args.steps, args.warmup, args.micro_batch)
    one = ours(uri, args.root, model_cfg, args.steps, args.micro_batch, workers=1)
    rows = [("plain PyTorch, 1 process", plain), ("llm-platform train, 1 worker", one)]
    if not args.skip_two_workers:
        two = ours(uri, args.root, model_cfg, args.steps, args.micro_batch, workers=2)
        rows.append(("llm-platform train, 2 workers (FSDP2)", two))
    print(f"{'run':<40} {'tokens/s':>12}")
    for name, rate in rows:
        print(f"{name:<40} {rate:>12,.0f}")
    if not args.skip_two_workers:
        print(f"2 workers / 1 worker: {two / one:.2f}")
    shutil.rmtree(os.path.join(args.root, "runs"), ignore_errors=True)
    print(f"ratio={one / plain:.3f}")


if __name__ == "__main__":
    main()
