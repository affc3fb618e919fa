"""Serving throughput: plain in-process HF `generate`, one request at a time, vs the Ray Serve endpoint at
concurrency 1, 8 and 32, on the same model and prompts, in one run.

    python benchmarks/serve_load.py [--model FOLDER] [--requests 64] [--max-tokens 32]

Without --model, a small GPT-2 (4 layers, width 128) with a ByteLevel BPE tokenizer is built in a temp folder.
Every request generates exactly --max-tokens tokens (greedy, EOS ignored) on both sides, so tokens/s compare.
Prints tokens/s, p50/p99 latency and time to first token per setting; the last line is
`ratio=<endpoint tokens/s at concurrency 32 / sequential in-process tokens/s>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TMPDIR", "/tmp/llmp-ray")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def build_model(folder: Path) -> Path:
    """A GPT-2 a bit larger than the test one, so the model, not Python, is a visible part of each step."""
    from serve_fixtures import build_tiny_model

    path = build_tiny_model(folder, vocab_size=1000, n_positions=256)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(path)
    config.n_layer, config.n_embd, config.n_head = 4, 128, 4
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return path


def in_process(folder: Path, prompts: list[str], max_tokens: int) -> dict:
    """HF generate, one request at a time; TTFT from a stopping criterion that notes when the first token exists."""
    import torch
    from transformers import StoppingCriteria

    from llm_platform.serve.engine import load_model

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, tok = load_model(folder)

    class FirstToken(StoppingCriteria):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores, **kwargs):
            self.at = self.at or time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    latencies, ttfts, tokens = [], [], 0
    model.generate(torch.tensor([tok(prompts[0]).input_ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([tok(prompt).input_ids])
        first = FirstToken()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=0, stopping_criteria=[first])
        latencies.append(time.perf_counter() - t0)
        ttfts.append(first.at - t0)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "latencies": latencies, "ttfts": ttfts}


async def endpoint(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Streamed completions at a fixed concurrency; tokens from the final usage chunk."""
    import httpx

    latencies, ttfts, counts = [], [], []
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def worker(client: httpx.AsyncClient):
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first = None
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and first is None:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        counts.append(chunk["usage"]["completion_tokens"])
            latencies.append(time.perf_counter() - t0)
            ttfts.append((first or time.perf_counter()) - t0)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*[worker(client) for _ in range(min(concurrency, 4))])  # warm-up round
        latencies.clear(), ttfts.clear(), counts.clear()
        for p in prompts:
            queue.put_nowait(p)
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    return {"tokens": sum(counts), "wall_s": wall, "latencies": latencies, "ttfts": ttfts}


def row(name: str, r: dict) -> tuple[str, float]:
    tps = r["tokens"] / r["wall_s"]
    ms = lambda v: f"{1000 * v:8.1f}"  # noqa: E731
    print(f"{name:<22} {r['tokens']:>7} {tps:>10.1f} {ms(statistics.median(r['latencies']))} "
          f"{ms(pct(r['latencies'], 0.99))} {ms(statistics.median(r['ttfts']))} {ms(pct(r['ttfts'], 0.99))}")
    return name, tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF-format folder (default: build a small GPT-2)")
    ap.add_argument("--requests", type=int, default=64, help="requests per setting")
    ap.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--batch", type=int, default=32, help="engine max_batch_size")
    ap.add_argument("--gil-switch-ms", type=float, default=None,
                    help="serve.gil_switch_interval_ms of the replica (default: the config's)")
    args = ap.parse_args()

    from conftest import free_port
    from serve_fixtures import sample_texts

    folder = args.model or build_model(Path(tempfile.mkdtemp(prefix="llmp-bench-")) / "model")
    prompts = sample_texts(args.requests, seed=11)

    import ray
    from ray import serve

    from llm_platform import cluster
    from llm_platform.config.cluster import ClusterConfig
    from llm_platform.serve.app import build_app

    cluster.connect(ClusterConfig(num_cpus=4, log_to_driver=False))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    extra = {} if args.gil_switch_ms is None else {"gil_switch_interval_ms": args.gil_switch_ms}
    serve.run(build_app({"model": str(folder), "model_name": "bench", "num_cpus_per_replica": 1,
                         "max_batch_size": args.batch, "max_ongoing_requests": 64, **extra}),
              name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"

    print(f"model={folder} requests={args.requests} max_tokens={args.max_tokens} cpus={os.cpu_count()} "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"{'setting':<22} {'tokens':>7} {'tokens/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'ttft50':>8} {'ttft99':>8}")
    base = in_process(folder, prompts, args.max_tokens)
    _, base_tps = row("in-process sequential", base)
    results = {}
    for c in (1, 8, 32):
        r = asyncio.run(endpoint(url, prompts, args.max_tokens, c))
        results[c] = row(f"endpoint c={c}", r)[1]
        if c == 1:
            overhead = statistics.median(r["latencies"]) - statistics.median(base["latencies"])
    print(f"p50 overhead at c=1 vs in-process: {1000 * overhead:.1f} ms")
    serve.shutdown()
    ray.shutdown()
    print(f"ratio={results[32] / base_tps:.2f}")


if __name__ == "__main__":
    main()
