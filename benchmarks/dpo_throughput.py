"""DPO throughput: `train.objective=dpo` (Ray Train, one worker) vs trl's `DPOTrainer` on the same checkpoint, the
same preference pairs and the same batch, in one run.

    python benchmarks/dpo_throughput.py [--steps 20] [--hidden 256] [--layers 4] [--seq-len 256] [--pairs 8]

The checkpoint is the tests' Llama-3-layout model (its tokenizer and chat template) resized to `--hidden` x
`--layers` so the matmuls dominate; the pairs are conversations whose answers run 40-160 tokens. Ours: the data stage
builds the pairs (experiment=dpo, the model's tokenizer), and `launch` trains with a frozen reference computed on the
fly; pairs/s is `--pairs` / the mean `perf/step_time_s` rank 0 logged after its first interval (Ray's start-up and
the first read excluded). trl: `DPOTrainer` (its reference model computed on the fly too, `precompute_ref_logps`
off, same beta, lr, batch and max length), timed from its step callbacks after `--warmup` steps, once before ours and
once after (their mean is the baseline, so drifting machine load favours neither side). Both in fp32 on one torch
thread. Last line: `ratio=<ours / trl pairs per second>` (goal: at least 0.95, issue #25). Run it alone; trl comes
with `pip install 'llm-platform[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the checkpoint builders of the tests
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_throughput import build_checkpoint  # noqa: E402  (the resized Llama-3-layout checkpoint)

os.environ.setdefault("RAY_TMPDIR", "/tmp/llmp-ray-bench")
WORDS = "the sky sea grass sun snow coal leaf cloud road lemon red blue green yellow white black is and of".split()


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs: a question, a long chosen answer and a long rejected one (40-160 words each)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)) + "."

    return [{"prompt": [{"role": "user", "content": f"Question {i}: {text(rng.randint(8, 24))}"}],
             "chosen": [{"role": "assistant", "content": text(rng.randint(40, 160))}],
             "rejected": [{"role": "assistant", "content": text(rng.randint(40, 160))}]} for i in range(n)]


def trl_rate(folder: Path, records: list[dict], args) -> float:
    """Pairs/s of trl's DPOTrainer after `args.warmup` steps."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    out = tempfile.mkdtemp(prefix="bench-trl-")
    config = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
                       learning_rate=5e-6, beta=0.1, max_length=args.seq_len, logging_steps=10_000, save_strategy="no",
                       report_to=[], use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="constant",
                       precompute_ref_log_probs=False, bf16=False, seed=0)
    trainer = DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=tok, callbacks=[Clock()])
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return args.steps * args.pairs / (times[-1] - times[args.warmup - 1])


def our_rate(folder: Path, records: list[dict], args, root: str) -> tuple[float, int]:
    """Pairs/s of `train.objective=dpo` on one Ray Train worker, and the pairs the data stage kept."""
    import ray

    from llm_platform import cluster
    from llm_platform.config import compose
    from llm_platform.config.cluster import ClusterConfig
    from llm_platform.data.pipeline import build_dataset
    from llm_platform.train.launcher import launch

    path = Path(root) / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = compose("train", ["experiment=dpo", f"model.pretrained={folder}", f"data.sources=[{path}]",
                            f"storage.root={root}", f"data.seq_len={args.seq_len}", "data.val_fraction=0",
                            f"train.micro_batch_size={args.pairs}", f"train.max_steps={args.warmup + args.steps}",
                            f"train.log_interval_steps={args.warmup}", "train.eval_interval_steps=100000",
                            "train.checkpoint.interval_steps=100000", "train.optimizer.lr=5e-6",
                            "train.optimizer.warmup_steps=0", "train.shuffle_buffer_rows=0", "train.export=false",
                            "train.parallelism.strategy=none", "train.parallelism.mixed_precision=fp32",
                            "scaling.num_workers=1"])
    cluster.connect(ClusterConfig(num_cpus=4, log_to_driver=False))
    try:
        data = build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
        name = f"bench-dpo-{int(time.time())}"
        launch(cfg.model, cfg.train, cfg.scaling, data.uri, root, run_name=name)
    finally:
        ray.shutdown()
    lines = [json.loads(x) for x in open(os.path.join(root, "runs", name, "metrics.jsonl")) if x.strip()]
    steps = [x["perf/step_time_s"] for x in lines if "perf/step_time_s" in x][1:]  # drop the first interval
    return args.pairs / (sum(steps) / len(steps)), int(data.manifest["splits"]["train"]["num_records"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (one micro-batch)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="bench-dpo-")
    try:
        folder = build_checkpoint(Path(root) / "ckpt", args.hidden, args.layers)
        records = pairs(args.pairs * (args.warmup + args.steps + 4))
        before = trl_rate(folder, records, args)
        ours, kept = our_rate(folder, records, args, root)
        after = trl_rate(folder, records, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = (before + after) / 2
    print(f"\nDPO, Llama-3 layout {args.hidden}x{args.layers}, {args.pairs} pairs/step, max {args.seq_len} tokens, "
          f"{args.steps} timed steps, 1 thread, {kept} pairs kept by our data stage")
    print(f"{'trainer':<34}{'pairs/s':>10}")
    print(f"{'trl DPOTrainer (before ours)':<34}{before:>10.2f}")
    print(f"{'llm-platform train.objective=dpo':<34}{ours:>10.2f}")
    print(f"{'trl DPOTrainer (after ours)':<34}{after:>10.2f}")
    print(f"ratio={ours / baseline:.3f}")


if __name__ == "__main__":
    main()
