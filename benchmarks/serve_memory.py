"""A serving replica's peak memory under load vs what its config allows: the weights plus the KV-cache budget.

    python benchmarks/serve_memory.py [--layers 12 --hidden 768 --vocab 50257] [--concurrency 32]
                                      [--prompt-tokens 1024] [--max-tokens 16] [--rows 8]

The model is GPT-2-shaped (random init, default the 124M shape) and served by `serve/engine.py` in-process (no Ray,
no HTTP: the engine is what holds the memory). `--concurrency` requests of `--prompt-tokens` random tokens arrive at
once; the KV budget (`serve.engine.max_batch_tokens`) is set to `--rows` full requests, so the engine must queue the
rest. Each configuration runs in a fresh process that reports its resident-set growth from before the model was built
to its peak while serving (VmHWM, reset once the model is built; it sees every allocation: weights, KV cache,
activations, logits, and what the allocator keeps of freed blocks), or with
`--device cuda` the peak of the accelerator memory it allocated:

- `ours`: the engine as shipped (last-position logits, prompt log-probs a chunk at a time for 1 in 4 prompts,
  admission against the budget);
- `before`: the same engine forced to the old path: full-sequence logits of every prompt and a float32 log-softmax
  over them for the drift monitor (`split_model` disabled, every prompt scored, no chunking).

The allowed memory is weights + budget x KV bytes per token. Last line: `ratio=<ours peak / allowed>` (goal: at most
1.2). Activations of a prefill (bounded by `serve.engine.max_prefill_tokens`) come on top of the allowance, so the goal
leaves them 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vm_hwm_mb() -> float:
    """The resident-set high-water mark (VmHWM) since the last reset, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process."""
    import asyncio

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from llm_platform.serve import model_runner
    from llm_platform.serve.engine import Engine
    from llm_platform.serve.sampling import SamplingParams

    start_rss = rss_mb()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.hidden // 64, vocab_size=args.vocab,
                        n_positions=max(2048, args.prompt_tokens + args.max_tokens))
    model = GPT2LMHeadModel(config).eval().to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        eos_token="t0", pad_token="t0")
    if args.mode == "before":
        model_runner.split_model = lambda m: (None, None)
        model_runner.LOGIT_CHUNK = 1 << 30
    budget = args.rows * (args.prompt_tokens + args.max_tokens)
    engine = Engine(model, tokenizer, max_batch_size=args.concurrency, max_waiting=4 * args.concurrency,
                    max_prefill_tokens=4096, max_batch_tokens=budget,
                    score_prompts_every=1 if args.mode == "before" else 4)
    if args.mode == "before":  # the old engine admitted by batch size only
        engine.scheduler.max_batch_tokens = sys.maxsize
    kv_mb = budget * engine.kv_bytes_per_token / 2**20
    if not cuda:
        # The peak counts from here: building the model with random weights held about 150 MB of init temporaries
        # for a moment, which is loading, not serving. (Linux: "5" resets the resident-set high-water mark.)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    engine.start()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, args.vocab, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.concurrency)]

    async def one(ids):
        out_tokens = 0
        async for out in engine.generate(ids, SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                                             ignore_eos=True), stream=False):
            out_tokens += sum(len(d.tokens) for d in out.deltas)
        return out_tokens

    async def all_():
        return await asyncio.gather(*[one(p) for p in prompts])

    t0 = time.perf_counter()
    generated = sum(asyncio.run(all_()))
    seconds = time.perf_counter() - t0
    engine.shutdown(drain_timeout_s=5)
    if cuda:  # accelerator memory: everything the replica allocated there, weights included
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = vm_hwm_mb() - start_rss
    return {"mode": args.mode, "weights_mb": weights_mb, "kv_budget_mb": kv_mb, "budget_tokens": budget,
            "peak_mb": peak_mb, "seconds": seconds, "generated": generated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8, help="the KV budget in full requests")
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS growth) or cuda (peak allocated memory)")
    parser.add_argument("--mode", choices=["ours", "before"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in ("before", "ours"):
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    allowed = rows[1]["weights_mb"] + rows[1]["kv_budget_mb"]
    print(f"GPT-2 shape {args.layers} x {args.hidden}, vocab {args.vocab}; {args.concurrency} requests of "
          f"{args.prompt_tokens} prompt tokens + {args.max_tokens} generated; KV budget {rows[1]['budget_tokens']} "
          f"tokens ({args.rows} requests)")
    print(f"{'engine':<8} {'weights MB':>11} {'KV budget MB':>13} {'peak MB':>9} {'peak/allowed':>13} {'s':>7}")
    for r in rows:
        print(f"{r['mode']:<8} {r['weights_mb']:>11.0f} {r['kv_budget_mb']:>13.0f} {r['peak_mb']:>9.0f} "
              f"{r['peak_mb'] / allowed:>13.2f} {r['seconds']:>7.1f}")
    print(f"ratio={rows[1]['peak_mb'] / allowed:.3f}")


if __name__ == "__main__":
    main()
