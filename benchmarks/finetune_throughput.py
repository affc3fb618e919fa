"""LoRA fine-tuning throughput: `llm-platform train` (Ray Train, one worker) vs a plain transformers + peft loop on
the same checkpoint and the same chat rows, in one run.

    python benchmarks/finetune_throughput.py [--steps 20] [--hidden 384] [--layers 4] [--seq-len 256]

The checkpoint is a Llama-3-layout model built here (tests/fixtures/checkpoints.py: its tokenizer and chat template,
untied embeddings, GQA) at `--hidden` x `--layers`, sized so the matmuls dominate; the data are chats built by the
data stage with the model's own tokenizer (experiment=finetune-lora). The plain loop loads the checkpoint with
`AutoModelForCausalLM`, wraps it with peft's `get_peft_model` (same rank, alpha, targets), and steps AdamW over the
rows read once into memory; it is timed after `--warmup` steps, once before ours and once after (their mean is the
baseline, so drifting machine load favours neither side). Ours is the mean `perf/tokens_per_s` rank 0 logged
after its first interval (Ray's start-up and the first read excluded on both sides). Both count every row token
(padding included) and run one torch thread. Last line: `ratio=<ours / plain>` (goal: at least 0.95). On a shared
or small machine, run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the checkpoint builders of the tests


def build_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    """The tests' Llama-3-layout checkpoint, resized: same tokenizer and template, `hidden` x `layers`."""
    from fixtures.checkpoints import llama3_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    llama3_checkpoint(folder)
    small = LlamaConfig.from_pretrained(folder)
    config = LlamaConfig(**{**small.to_dict(), "hidden_size": hidden, "intermediate_size": 64 * (8 * hidden // 192),
                            "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
                            "num_key_value_heads": max(1, hidden // 256), "dtype": "float32"})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def plain_loop(folder: Path, rows: dict, lora: dict, steps: int, warmup: int, micro_batch: int) -> float:
    """Tokens/s of transformers + peft in one process over the same rows (in memory: a tuned baseline)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    data = {k: torch.as_tensor(v) for k, v in rows.items()}
    n = data["input_ids"].size(0)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        i = (step * micro_batch) % (n - micro_batch)
        batch = {k: v[i:i + micro_batch] for k, v in data.items()}  # (B, T) each
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * micro_batch * data["input_ids"].size(1) / (time.perf_counter() - start)


def ours(cfg, uri: str, root: str, steps: int) -> float:
    from llm_platform.train.launcher import launch

    name = f"bench-lora-{int(time.time())}"
    launch(cfg.model, cfg.train, cfg.scaling, uri, root, run_name=name)
    lines = [json.loads(x) for x in open(os.path.join(root, "runs", name, "metrics.jsonl")) if x.strip()]
    rates = [x["perf/tokens_per_s"] for x in lines if "perf/tokens_per_s" in x][1:]  # drop the first interval
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "llmp-bench-finetune"))
    args = parser.parse_args()

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    torch.set_num_threads(1)  # the Ray worker gets one CPU; give the plain loop the same
    from fixtures.checkpoints import write_chats
    from fixtures.training import read_rows

    from llm_platform import cluster
    from llm_platform.config import compose
    from llm_platform.config.cluster import ClusterConfig
    from llm_platform.data.pipeline import build_dataset

    shutil.rmtree(args.root, ignore_errors=True)
    root = Path(args.root)
    base = build_checkpoint(root / "base", args.hidden, args.layers)
    chats = root / "chats.jsonl"
    write_chats(chats, n=1024, bad=False)
    interval = max(1, args.steps // 5)
    cfg = compose("train", [
        "experiment=finetune-lora", f"model.pretrained={base}", f"data.sources=[{chats}]", f"storage.root={root}",
        f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}",
        f"train.log_interval_steps={interval}", f"train.eval_interval_steps={args.steps}",
        f"train.checkpoint.interval_steps={args.steps}", "train.eval_batches=1", "train.export=false",
        "train.parallelism.strategy=none", "train.max_failures=0", "scaling.num_workers=1",
        f"model.lora.rank={args.rank}", f"model.lora.alpha={2 * args.rank}",
        # Rows of one example each, as the plain loop feeds them: this compares the training step, not the layout
        # (benchmarks/sft_packing.py measures what packing adds).
        "data.pack_supervised=false"])
    cluster.connect(ClusterConfig(num_cpus=4, log_to_driver=False))
    uri = build_dataset(cfg.data, cfg.tokenizer, str(root), progress=False).uri
    rows = read_rows(uri, "train")
    lora = {"rank": args.rank, "alpha": 2 * args.rank}
    # The plain loop runs before and after ours and counts as their mean, so a machine whose load drifts during
    # the run does not favour either side.
    before = plain_loop(base, rows, lora, args.steps, args.warmup, args.micro_batch)
    one = ours(cfg, uri, str(root), args.steps)
    after = plain_loop(base, rows, lora, args.steps, args.warmup, args.micro_batch)
    plain = (before + after) / 2
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(base).parameters())
    print(f"model: Llama-3 layout, {args.layers} x {args.hidden}, {params / 1e6:.1f} M parameters, LoRA r={args.rank} "
          f"on q_proj/v_proj; micro-batch {args.micro_batch} x {args.seq_len} tokens, {args.steps} steps")
    print(f"{'run':<40} {'tokens/s':>12}")
    for name, rate in (("transformers + peft, before", before), ("llm-platform train, 1 worker", one),
                       ("transformers + peft, after", after), ("transformers + peft, mean", plain)):
        print(f"{name:<40} {rate:>12,.0f}")
    shutil.rmtree(args.root, ignore_errors=True)
    print(f"ratio={one / plain:.3f}")


if __name__ == "__main__":
    main()
