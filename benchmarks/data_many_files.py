"""Data stage cost per byte, not per file: the same bytes as many small files and as a few large ones.

One generated corpus (documents with unique prefixes, so dedup keeps them all) is written to a loopback S3 (moto's
server, in its own process) twice: as `--many` small JSONL files and as `--few` large ones, the same documents in the
same order. The data stage runs on each from `s3://` with the same config on a fresh local Ray, and the outputs are
compared (the same documents in the same order must give the same shards).

    python benchmarks/data_many_files.py [--mb 20] [--many 2000] [--few 20]

Last line: ratio=<wall seconds with many files / wall seconds with few files> (goal <= 1.5, issue #24).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_throughput import loopback_s3  # noqa: E402  (the loopback S3 the data benchmarks share)

os.environ.setdefault("RAY_TMPDIR", "/tmp/llmp-ray-bench")
os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})


def corpus(megabytes: float) -> list[bytes]:
    """JSONL lines of unique documents, `megabytes` in all."""
    import json

    from llm_platform.data import sample

    lines: list[bytes] = []
    size, seed = 0, 0
    while size < megabytes * 1_000_000:
        for i, d in enumerate(sample.generate(5_000, seed=seed)):
            line = (json.dumps({"text": f"Story {seed}-{i}. {d['text']}"}) + "\n").encode()
            lines.append(line)
            size += len(line)
            if size >= megabytes * 1_000_000:
                break
        seed += 1
    return lines


def upload(s3, bucket: str, prefix: str, lines: list[bytes], files: int) -> None:
    """`lines` cut into `files` files of about equal size, in order, uploaded with a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    per = -(-len(lines) // files)
    bodies = [b"".join(lines[i:i + per]) for i in range(0, len(lines), per)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=f"{prefix}/doc-{kv[0]:05d}.jsonl", Body=kv[1]),
                      enumerate(bodies)))


def run_stage(root: str, sources: str) -> tuple[dict, float]:
    import ray

    from llm_platform import cluster
    from llm_platform.config import compose
    from llm_platform.data.pipeline import build_dataset

    cfg = compose("data", [f"storage.root={root}", f"data.sources=[{sources}]", "data.name=bench",
                           "data.seq_len=512", "tokenizer.vocab_size=4096", "data.num_shards=4"])
    cluster.connect(cfg.cluster)  # a fresh local Ray for each layout, started before the clock (same for both)
    start = time.perf_counter()
    result = build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    wall = time.perf_counter() - start
    ray.shutdown()
    return result.manifest, wall


def shard_bytes(root: str, manifest: dict) -> list[bytes]:
    from llm_platform import storage
    from llm_platform.storage import layout

    out = layout.dataset(root, manifest["name"], manifest["fingerprint"])
    return [storage.read_bytes(storage.join(out, f)) for s in ("train", "val") for f in manifest["splits"][s]["files"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20, help="corpus size in MB")
    parser.add_argument("--many", type=int, default=2000, help="files in the many-files layout")
    parser.add_argument("--few", type=int, default=20, help="files in the few-files layout")
    args = parser.parse_args()
    import boto3

    server, endpoint = loopback_s3()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    lines = corpus(args.mb)
    size = sum(map(len, lines))
    upload(s3, "bench", "few", lines, args.few)
    upload(s3, "bench", "many", lines, args.many)

    runs = {}
    for label, files in (("few", args.few), ("many", args.many)):
        runs[label] = (files, *run_stage(f"s3://bench/store-{label}", f"s3://bench/{label}/*.jsonl"))
    same = shard_bytes("s3://bench/store-few", runs["few"][1]) == shard_bytes("s3://bench/store-many", runs["many"][1])
    server.terminate()

    print(f"\ncorpus: {len(lines):,} documents, {size / 1e6:.1f} MB of JSONL on loopback S3; "
          f"machine: {len(os.sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d %H:%M')}")
    header = f"{'layout':<8}{'files':>7}{'KB/file':>9}{'wall s':>9}{'MB/s':>7}{'docs kept':>11}  phases (s)"
    print(header)
    print("-" * (len(header) + 40))
    for label, (files, m, wall) in runs.items():
        t = m["timings_s"]
        phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in t.items() if k.endswith("_s") and "tasks" not in k)
        print(f"{label:<8}{files:>7,}{size / files / 1e3:>9.1f}{wall:>9.1f}{size / 1e6 / wall:>7.2f}"
              f"{m['counts']['documents_kept']:>11,}  {phases}")
    print(f"same shards from both layouts: {same}")
    print(f"ratio={runs['many'][2] / runs['few'][2]:.2f}")


if __name__ == "__main__":
    main()
