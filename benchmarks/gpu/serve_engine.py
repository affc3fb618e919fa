"""Serving throughput on one GPU: plain HF `generate`, one request at a time, vs the platform's continuous-batching
engine (llm_platform/serve/engine.py, what each Ray Serve replica runs) at concurrency 1, 8, 32 and 64, on the same
bf16 model and prompts, in one run.

    python benchmarks/gpu/serve_engine.py                          # llama-1b, 128-token prompts, 128 new tokens
    python benchmarks/gpu/serve_engine.py --device cpu --model llama-debug --max-tokens 8 --requests 8  # smoke

The model is a preset from conf/model with random weights and a 32k word-level tokenizer; prompts are random token
ids, so neither side tokenizes. Every request generates exactly --max-tokens tokens (greedy, EOS ignored) on both
sides. This is the engine without Ray Serve's HTTP hop (the CPU benchmark benchmarks/serve_load.py measures the
endpoint), timed with Python's default GIL switch interval and again with the 0.5 ms that replicas set. Prints
tokens/s, p50/p99 latency, time to first token and the engine's per-step times per setting; the last line is
`ratio=<engine tokens/s at concurrency 32 / sequential HF generate tokens/s>`, with the replicas' 0.5 ms and streamed
chunks of 4 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time

import torch


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def build(args, device: torch.device, dtype: torch.dtype):
    """The preset's model with random weights, in `dtype` on `device`, and a word-level tokenizer of exactly
    --vocab tokens (so every id the random model samples decodes; the engine streams text as a replica does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llm_platform.config import compose
    from llm_platform.models.build import build_model

    specials = ["<|endoftext|>", "<|pad|>", "<|mask|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(args.vocab - len(specials))])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|mask|>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=specials[0], eos_token=specials[0],
                                  pad_token=specials[1], mask_token=specials[2])
    cfg = compose("train", [f"model={args.model}"]).model
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.prompt_len + args.max_tokens + 8)
    special = {"eos": tok.eos_token_id, "pad": tok.pad_token_id, "mask": tok.mask_token_id}
    model = build_model(cfg, len(tok), special, seed=0).to(device=device, dtype=dtype).eval()
    return model, tok


def sequential(model, prompts: list[list[int]], max_tokens: int, pad: int, sync) -> dict:
    """HF generate, one request at a time; TTFT from a stopping criterion that notes when the first token exists."""
    from transformers import StoppingCriteria

    class FirstToken(StoppingCriteria):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.at is None:
                sync()
                self.at = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    latencies, ttfts, tokens = [], [], 0
    with torch.no_grad():
        warm = torch.tensor([prompts[0]], device=device)
        model.generate(warm, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        sync()
        start = time.perf_counter()
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            first = FirstToken()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=pad, stopping_criteria=[first])
            sync()
            latencies.append(time.perf_counter() - t0)
            ttfts.append(first.at - t0)
            tokens += out.shape[1] - ids.shape[1]
    return {"tokens": tokens, "wall_s": time.perf_counter() - start, "latencies": latencies, "ttfts": ttfts}


async def engine_run(engine, prompts: list[list[int]], max_tokens: int, concurrency: int, interval: int = 1) -> dict:
    """`len(prompts)` requests through the engine, `concurrency` in flight at a time, streamed (`interval` tokens a
    chunk after the first, as `serve.engine.stream_interval_tokens`)."""
    from llm_platform.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    todo = list(prompts)
    latencies, ttfts, counts = [], [], []

    async def worker():
        while todo:
            prompt = todo.pop()
            t0 = time.perf_counter()
            first, n = None, 0
            async for out in engine.generate(prompt, params, True, interval, 0.25):
                if out.error:
                    raise RuntimeError(out.error)
                n += sum(len(d.tokens) for d in out.deltas)
                first = first or time.perf_counter()
            latencies.append(time.perf_counter() - t0)
            ttfts.append(first - t0)
            counts.append(n)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"tokens": sum(counts), "wall_s": time.perf_counter() - start, "latencies": latencies, "ttfts": ttfts}


def timed_engine_class():
    """The engine with CPU-side timers around each decode step, its forward call and its sampling/delivery."""
    from llm_platform.serve.engine import Engine

    class TimedEngine(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.timing = collections.Counter()
            forward = self.runner.forward  # the model runner's forward pass, wrapped where the engine calls it

            def timed_forward(*a, **k):
                return self._timed("forward", lambda *x: forward(*x, **k), *a)

            self.runner.forward = timed_forward

        def _timed(self, key, fn, *args):
            if key != "decode" and not self.timing.get("in_decode"):  # prefill's forward and sampling: not timed
                return fn(*args)
            t0 = time.perf_counter()
            out = fn(*args)
            self.timing[key] += time.perf_counter() - t0
            self.timing[key + "_n"] += 1
            return out

        def _decode(self):
            self.timing["in_decode"] = 1
            try:
                return self._timed("decode", super()._decode)
            finally:
                self.timing["in_decode"] = 0

        def _step_tokens(self, *args):
            return self._timed("step_tokens", super()._step_tokens, *args)

    return TimedEngine


def row(name: str, r: dict) -> tuple[str, float]:
    tps = r["tokens"] / r["wall_s"]
    t = r.get("timing", {})
    steps = t.get("decode_n", 0)

    def per(k: str) -> str:
        return f"{1e3 * t[k] / t[k + '_n']:>7.2f}" if t.get(k + "_n") else f"{'':>7}"

    return (f"{name:<30} {len(r['latencies']):>8} {tps:>9.1f} {pct(r['latencies'], 0.5) * 1e3:>8.0f} "
            f"{pct(r['latencies'], 0.99) * 1e3:>8.0f} {statistics.median(r['ttfts']) * 1e3:>8.1f} "
            f"{steps:>6} {per('decode')} {per('forward')} {per('step_tokens')}"), tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b", help="a preset in conf/model")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64, help="requests at concurrency 32 (2x that at 64)")
    parser.add_argument("--sequential", type=int, default=8, help="requests of the sequential baseline and c=1")
    parser.add_argument("--vocab", type=int, default=32000, help="tokenizer and model vocab")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --device cpu for a smoke run)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if not on_gpu:
        torch.set_num_threads(1)

    model, tok = build(args, device, dtype)
    gen = torch.Generator().manual_seed(0)
    specials = max(tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) + 1
    prompts = [torch.randint(specials, len(tok), (args.prompt_len,), generator=gen).tolist()
               for _ in range(max(args.requests * 2, args.sequential))]

    # Warm-up on both sides at every shape that is timed (a fresh machine loads or JIT-compiles kernels on first use).
    sequential(model, prompts[:1], args.max_tokens, tok.pad_token_id, sync)
    base = sequential(model, prompts[:args.sequential], args.max_tokens, tok.pad_token_id, sync)
    engine = timed_engine_class()(model, tok, max_batch_size=64, max_waiting=1024, max_prefill_tokens=8192)
    engine.start()
    settings = [(1, args.sequential), (8, args.requests // 2), (32, args.requests), (64, args.requests * 2)]
    results = {}

    def measure(c: int, n: int, interval: int = 1) -> dict:
        asyncio.run(engine_run(engine, prompts[:c], min(args.max_tokens, 16), c, interval))
        engine.timing.clear()
        r = asyncio.run(engine_run(engine, prompts[:n], args.max_tokens, c, interval))
        r["timing"] = dict(engine.timing)
        return r

    try:
        for c, n in settings:
            results[f"engine c={c}"] = measure(c, n)
        # The engine thread and the callers' event loop share the GIL; CPython hands it over on request only after
        # the switch interval (5 ms). Shorter, the loop gets each token out sooner.
        default_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        for c, n in settings[:1] + settings[2:3]:
            results[f"engine c={c}, switch 0.5ms"] = measure(c, n)
        # What a replica runs: also streamed chunks of 4 tokens, held by the engine (one event-loop wake-up a chunk).
        for c, n in settings[:1] + settings[2:3]:
            results[f"engine c={c}, 0.5ms, chunks 4"] = measure(c, n, 4)
        sys.setswitchinterval(default_interval)
    finally:
        engine.shutdown(drain_timeout_s=5)

    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"device: {name}; model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params, "
          f"{dtype}), vocab {len(tok)}; {args.prompt_len}-token prompts, {args.max_tokens} new tokens per request")
    print("per decode step (engine thread, CPU-side ms): step = forward call + sampling/detokenizing/delivery + rest")
    print(f"{'setting':<30} {'requests':>8} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'TTFT ms':>8} "
          f"{'steps':>6} {'step':>7} {'fwd':>7} {'sample':>7}")
    line, base_tps = row("HF generate, 1 by 1", base)
    print(line)
    tps = {}
    for key, r in results.items():
        line, tps[key] = row(key, r)
        print(line)
    base_p50 = statistics.median(base["latencies"])
    c1_p50 = statistics.median(results["engine c=1"]["latencies"])
    print(f"c=1 overhead per request (p50): {(c1_p50 - base_p50) * 1e3:.1f} ms "
          f"({c1_p50 / args.max_tokens * 1e3:.2f} vs {base_p50 / args.max_tokens * 1e3:.2f} ms per token)")
    print(f"c=32 / HF generate: every token an event {tps['engine c=32, switch 0.5ms'] / base_tps:.2f}, chunks of 4 "
          f"(the replicas' default) {tps['engine c=32, 0.5ms, chunks 4'] / base_tps:.2f}")
    print(f"ratio={tps['engine c=32, 0.5ms, chunks 4'] / base_tps:.2f}")


if __name__ == "__main__":
    main()
