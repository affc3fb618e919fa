"""Serving throughput: plain in-process HF `generate`, one request at a time, vs the Ray Serve endpoint at
concurrency 1, 8 and 32, on the same model and prompts, in one run.

    python benchmarks/serve_load.py [--model FOLDER] [--requests 64] [--max-tokens 32] [--rounds 3]
    python benchmarks/serve_load.py --variant every_token:engine.stream_interval_tokens=1   # compare a config change
    python benchmarks/serve_load.py --ingress direct   # replicas serve HTTP behind HAProxy (serve.http.ingress)
    python benchmarks/serve_load.py --shape gpt2-124m --requests 32 --rounds 1   # a model-bound step (goal >= 8)
    python benchmarks/serve_load.py --shape gpt2-124m --requests 32 --rounds 1 --dtype bfloat16   # both sides bf16

Without --model, a small GPT-2 (4 layers, width 128) with a ByteLevel BPE tokenizer is built in a temp folder.
Every request generates exactly --max-tokens tokens (greedy, EOS ignored) on both sides, so tokens/s compare.
The endpoint ("ours") runs the serve config's defaults; each --variant is deployed beside it with some keys changed,
and every round measures the in-process baseline and every endpoint, so slow minutes of a noisy machine fall on
both sides of a round's ratio. The c=1 overhead is also measured paired: each of 32 prompts in-process and then at
once from the endpoint (streamed, and again not streamed), the median of the differences (the figure #5's goal is
read from; the difference of two p50s a minute apart carries the machine's drift). Prints tokens/s, p50/p99 latency
and time to first token per setting, the per-round ratios and c=1 overheads; the last line is
`ratio=<median over rounds of endpoint tokens/s at concurrency 32 / sequential in-process tokens/s>`.
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


SHAPES = {"small": (4, 128, 4), "gpt2-124m": (12, 768, 12)}
"""(layers, width, heads): `small` (a decode step of about 1 ms on a CPU core: it measures the serving overhead)
and GPT-2 124M's shape (random init; a step the model dominates, so it measures batching)."""


def build_model(folder: Path, shape: str = "small") -> Path:
    """A GPT-2 of `shape` with the test tokenizer (ByteLevel BPE, 1,000 tokens: the 124M shape keeps its layers and
    width, not its 50,257-token vocabulary)."""
    from fixtures.serving import build_tiny_model

    path = build_tiny_model(folder, vocab_size=1000, n_positions=256)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(path)
    config.n_layer, config.n_embd, config.n_head = SHAPES[shape]
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return path


def load(folder: Path, dtype: str = "float32"):
    import torch

    from llm_platform.serve.engine import load_model

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return load_model(folder, dtype=dtype)


def hf_generate(model, tok, prompt: str, max_tokens: int, stopping_criteria=()) -> tuple[float, float, int]:
    """One in-process HF `generate` of exactly max_tokens tokens (greedy): (start time, seconds, new tokens)."""
    import torch

    ids = torch.tensor([tok(prompt).input_ids])
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                         stopping_criteria=list(stopping_criteria))
    return t0, time.perf_counter() - t0, out.shape[1] - ids.shape[1]


def paired_overhead(model, tok, url: str, prompts: list[str], max_tokens: int) -> dict[str, list[float]]:
    """c=1 overhead as paired differences: each prompt in-process, then at once the same prompt from the endpoint,
    streamed and not; seconds (endpoint - in-process) per pair and kind. Requests a few hundred ms apart see the
    same machine speed, where two sequential runs of a minute each do not (this machine's speed drifts by up to 2x
    within minutes)."""
    import httpx

    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    diffs: dict[str, list[float]] = {"streamed": [], "not streamed": []}
    with httpx.Client(timeout=300) as client:
        for i, prompt in enumerate([prompts[0]] + prompts):
            for kind in diffs:
                _, base, _ = hf_generate(model, tok, prompt, max_tokens)
                t0 = time.perf_counter()
                with client.stream("POST", f"{url}/v1/completions",
                                   json={**body, "prompt": prompt, "stream": kind == "streamed"}) as resp:
                    resp.raise_for_status()
                    for _ in resp.iter_lines():
                        pass
                if i:  # the first pair warms the connection up
                    diffs[kind].append(time.perf_counter() - t0 - base)
    return diffs


def in_process(model, tok, prompts: list[str], max_tokens: int) -> dict:
    """HF generate, one request at a time; TTFT from a stopping criterion that notes when the first token exists."""
    import torch
    from transformers import StoppingCriteria

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
        first = FirstToken()
        t0, seconds, new = hf_generate(model, tok, prompt, max_tokens, [first])
        latencies.append(seconds)
        ttfts.append(first.at - t0)
        tokens += new
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "latencies": latencies, "ttfts": ttfts}


async def endpoint(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Streamed completions at a fixed concurrency; tokens from the final usage chunk."""
    import httpx

    latencies, ttfts, counts = [], [], []
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts[:min(len(prompts), 2 * concurrency, 16)]:  # warm-up: connections open, replica busy
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
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])  # warm-up round
        latencies.clear(), ttfts.clear(), counts.clear()
        for p in prompts:
            queue.put_nowait(p)
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    return {"tokens": sum(counts), "wall_s": wall, "latencies": latencies, "ttfts": ttfts}


def merge(runs: list[dict]) -> dict:
    """Rounds of one setting as one: tokens and wall time summed, latencies pooled."""
    return {"tokens": sum(r["tokens"] for r in runs), "wall_s": sum(r["wall_s"] for r in runs),
            "latencies": [x for r in runs for x in r["latencies"]], "ttfts": [x for r in runs for x in r["ttfts"]]}


def row(name: str, r: dict) -> float:
    tps = r["tokens"] / r["wall_s"]
    ms = lambda v: f"{1000 * v:8.1f}"  # noqa: E731
    print(f"{name:<30} {r['tokens']:>7} {tps:>10.1f} {ms(statistics.median(r['latencies']))} "
          f"{ms(pct(r['latencies'], 0.99))} {ms(statistics.median(r['ttfts']))} {ms(pct(r['ttfts'], 0.99))}")
    return tps


def parse_variant(text: str) -> tuple[str, dict]:
    """`name:engine.key=value,...` -> (name, serve overrides as nested dicts, as `build_app` takes them); keys are
    the serve config's, dotted below `serve.`; values are read as YAML scalars."""
    import yaml

    name, _, pairs = text.partition(":")
    overrides: dict = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        *nodes, leaf = key.strip().split(".")
        node = overrides
        for part in nodes:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return name, overrides


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied, nested dicts (config nodes) merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF-format folder (default: build a GPT-2 of --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small",
                    help="the built GPT-2's layers and width: small (overhead-bound) or gpt2-124m (model-bound)")
    ap.add_argument("--requests", type=int, default=64, help="requests per setting and round")
    ap.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--batch", type=int, default=32, help="engine max_batch_size")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights' dtype on both sides (serve.engine.dtype and the in-process model)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (in-process, each endpoint at c=1, 8, 32); the ratio is the median of the "
                         "rounds' ratios, so a slow minute on a noisy machine hits both sides of one ratio")
    ap.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                    help="serve.http.ingress of every endpoint (a property of the Ray instance this script starts)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="also deploy the app with these serve config overrides at /NAME and measure it in the "
                         "same rounds (e.g. every_token:engine.stream_interval_tokens=1)")
    args = ap.parse_args()

    from conftest import free_port
    from fixtures.serving import sample_texts

    folder = args.model or build_model(Path(tempfile.mkdtemp(prefix="llmp-bench-")) / "model", args.shape)
    prompts = sample_texts(args.requests, seed=11)

    import ray
    from ray import serve

    from llm_platform import cluster
    from llm_platform.config.cluster import ClusterConfig
    from llm_platform.serve import ingress
    from llm_platform.serve.app import build_app

    variants = [("ours", {})] + [parse_variant(v) for v in args.variant]
    ingress.prepare(args.ingress)
    cluster.connect(ClusterConfig(num_cpus=2 + 2 * len(variants), log_to_driver=False))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, overrides in variants:
        base = {"model": str(folder), "model_name": "bench", "http": {"ingress": args.ingress},
                "deployment": {"num_cpus_per_replica": 1, "max_ongoing_requests": 64},
                "engine": {"max_batch_size": args.batch, "dtype": args.dtype}}
        serve.run(build_app(merged(base, overrides)),
                  name=name, route_prefix=f"/{name}", blocking=False)
    url = f"http://127.0.0.1:{port}"

    print(f"model={folder} requests={args.requests} max_tokens={args.max_tokens} rounds={args.rounds} "
          f"ingress={args.ingress} dtype={args.dtype} cpus={os.cpu_count()} "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    for name, overrides in variants:
        print(f"  endpoint {name}: serve config defaults{' + ' + str(overrides) if overrides else ''}")
    settings = ["in-process sequential"] + [f"{n} c={c}" for n, _ in variants for c in (1, 8, 32)]
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    pairs: dict[str, list[dict[str, list[float]]]] = {n: [] for n, _ in variants}
    model, tok = load(folder, args.dtype)
    for _ in range(args.rounds):
        runs["in-process sequential"].append(in_process(model, tok, prompts, args.max_tokens))
        for name, _ in variants:
            pairs[name].append(paired_overhead(model, tok, f"{url}/{name}", prompts[:32], args.max_tokens))
            for c in (1, 8, 32):
                runs[f"{name} c={c}"].append(asyncio.run(endpoint(f"{url}/{name}", prompts, args.max_tokens, c)))
    serve.shutdown()
    ray.shutdown()

    print(f"{'setting (all rounds)':<30} {'tokens':>7} {'tokens/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'ttft50':>8} {'ttft99':>8}")
    for setting in settings:
        row(setting, merge(runs[setting]))
    tps = {s: [r["tokens"] / r["wall_s"] for r in rs] for s, rs in runs.items()}
    base_p50 = [statistics.median(r["latencies"]) for r in runs["in-process sequential"]]
    print("per round: " + "; ".join(f"in-process {b:.0f} tok/s" for b in tps["in-process sequential"]))
    median_ratio = {}
    for name, _ in variants:
        ratios = [e / b for e, b in zip(tps[f"{name} c=32"], tps["in-process sequential"])]
        overhead = [statistics.median(r["latencies"]) - b for r, b in zip(runs[f"{name} c=1"], base_p50)]
        paired = [statistics.median(d["streamed"]) for d in pairs[name]]
        plain = [statistics.median(d["not streamed"]) for d in pairs[name]]
        median_ratio[name] = statistics.median(ratios)

        def ms(xs):
            return ", ".join(f"{1000 * x:.1f}" for x in xs)

        def pooled(kind, name=name):
            return 1000 * statistics.median(x for d in pairs[name] for x in d[kind])

        print(f"{name}: c=32 / in-process per round {', '.join(f'{x:.2f}' for x in ratios)} -> median "
              f"{median_ratio[name]:.2f}")
        print(f"  c=1 overhead, p50 - in-process p50 per round: {ms(overhead)} ms -> median "
              f"{1000 * statistics.median(overhead):.1f} ms")
        print(f"  c=1 overhead, paired, streamed: per round {ms(paired)} ms -> {pooled('streamed'):.1f} ms over "
              f"all pairs")
        print(f"  c=1 overhead, paired, not streamed: per round {ms(plain)} ms -> {pooled('not streamed'):.1f} ms")
    print(f"ratio={median_ratio['ours']:.2f}")


if __name__ == "__main__":
    main()
