"""Serving backends on the same model and prompts, in one run (#29): our endpoint with `serve.engine.backend=builtin`
and with `backend=vllm` (both on Ray Serve, serve config defaults otherwise), and vLLM's own OpenAI server
(`python -m vllm.entrypoints.openai.api_server`, "standalone") started beside them with the same engine settings.

    .venv-vllm/bin/python benchmarks/serve_backends.py [--requests 64] [--max-tokens 32] [--layers 4 --width 256]
    .venv-vllm/bin/python benchmarks/serve_backends.py --model /models/Llama-3.2-1B --dtype bfloat16 --device cuda

Runs in .venv-vllm (`make setup-vllm`). Without --model a Llama-3-layout checkpoint (its own tokenizer and chat
template) is built at --layers x --width (head_dim 64). Every request streams exactly --max-tokens tokens (greedy,
EOS ignored; tokens counted from the usage chunk), at concurrency 1, 8 and 32, one side at a time. Prints tokens/s,
latency p50/p99 and time to first token p50/p99 per side and concurrency; then vllm / builtin at c=32 (recorded; on
CPU either may win) and the last line `ratio=<ours with vllm / standalone vLLM, tokens/s at c=32>` (goal >= 0.9:
what our layer, Ray Serve's proxy included, costs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TMPDIR", "/tmp/llmp-ray")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def build_model(folder: Path, layers: int, width: int) -> Path:
    """A Llama-3-layout checkpoint (the tests' tokenizer and chat template, padded vocab) at layers x width."""
    from fixtures.checkpoints import llama3_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    path = llama3_checkpoint(folder, head_dim=64, max_positions=1024)
    config = LlamaConfig.from_pretrained(path)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, width, 4 * width
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = width // 64, max(1, width // 128), 64
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def wait_healthy(url: str, timeout_s: float, what: str) -> None:
    from fixtures.serving import wait_healthy as answered

    if not answered(url, timeout_s, poll_s=2):
        raise SystemExit(f"{what} did not become healthy in {timeout_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size / --max-num-seqs of every side")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                    help="serve.http.ingress of our endpoints (direct: no Ray proxy hop, behind Serve's HAProxy)")
    args = ap.parse_args()

    from conftest import free_port
    from fixtures.serving import sample_texts
    from serve_load import endpoint, merge, row

    folder = args.model or build_model(Path(tempfile.mkdtemp(prefix="llmp-bench-")) / "model", args.layers,
                                       args.width)
    prompts = sample_texts(args.requests, seed=11)
    eager = args.device == "cpu"  # no torch.compile / CUDA graphs on CPU: both vLLM sides alike
    gpus = 1 if args.device.startswith("cuda") else 0

    import ray
    from ray import serve

    from llm_platform.serve import ingress
    from llm_platform.serve.app import build_app

    ingress.prepare(args.ingress)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _temp_dir=os.environ["RAY_TMPDIR"])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"model": str(folder), "model_name": "bench", "http": {"ingress": args.ingress},
              "deployment": {"num_cpus_per_replica": 1, "num_gpus_per_replica": gpus, "max_ongoing_requests": 64},
              "engine": {"max_batch_size": args.batch, "dtype": args.dtype, "device": args.device}}
    sides: dict[str, str] = {}
    for backend in ("builtin", "vllm"):
        app = {**common, "engine": {**common["engine"], "backend": backend, "vllm": {"enforce_eager": eager}}}
        serve.run(build_app(app), name=backend, route_prefix=f"/{backend}", blocking=False)
        sides[f"ours, {backend}"] = f"http://127.0.0.1:{port}/{backend}"
    for url in sides.values():
        wait_healthy(url, 600, url)

    standalone_port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(standalone_port), "--dtype",
           args.dtype, "--max-num-seqs", str(args.batch)] + (["--enforce-eager"] if eager else [])
    server_log = Path(tempfile.mkdtemp(prefix="llmp-bench-")) / "vllm-server.log"
    server = subprocess.Popen(cmd, stdout=server_log.open("w"), stderr=subprocess.STDOUT)
    try:
        sides["standalone vLLM"] = f"http://127.0.0.1:{standalone_port}"
        wait_healthy(sides["standalone vLLM"], 600, f"vllm api_server (its log: {server_log})")
        print(f"model={folder} requests={args.requests} max_tokens={args.max_tokens} batch={args.batch} "
              f"ingress={args.ingress} "
              f"dtype={args.dtype} device={args.device} cpus={os.cpu_count()} "
              f"date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        runs: dict[str, dict] = {}
        for name, url in sides.items():
            for c in (1, 8, 32):
                runs[f"{name} c={c}"] = merge([asyncio.run(endpoint(url, prompts, args.max_tokens, c))])
    finally:
        server.terminate()
        server.wait(timeout=60)
        serve.shutdown()
        ray.shutdown()

    print(f"{'side':<30} {'tokens':>7} {'tokens/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'ttft50':>8} {'ttft99':>8}")
    tps = {setting: row(setting, r) for setting, r in runs.items()}
    vllm_vs_builtin = tps["ours, vllm c=32"] / tps["ours, builtin c=32"]
    ours_vs_standalone = tps["ours, vllm c=32"] / tps["standalone vLLM c=32"]
    print(f"vllm / builtin at c=32: {vllm_vs_builtin:.2f}")
    print(f"ours with vllm / standalone vLLM at c=32: {ours_vs_standalone:.2f}")
    print(f"ratio={ours_vs_standalone:.3f}")


if __name__ == "__main__":
    main()
