"""Data stage throughput: raw `tokenizers` batch encoding on one core vs the whole stage, per CPU used.

A generated corpus (>= 100 MB of JSONL by default) is served from a loopback S3 (moto's server on 127.0.0.1); the
stage reads it from `s3://`, cleans, deduplicates, trains its BPE, tokenizes, packs, and writes shards back to S3.
Baseline: the same trained tokenizer's `encode_batch` over the same documents in this process, single-threaded.
The stage runs pinned to 1 core, then to all cores (CPU affinity inherited by every Ray process), to show scaling.

    python benchmarks/data_throughput.py [--mb 100]

Last line: ratio=<the stage's per-document CPU floor / the CPU the stage took (all cores)>: the share of the stage's
CPU that is its own per-document work (clean, dedup keys, encode), the rest being reads, exchanges, BPE training,
packing, writing and Ray. (The older figure, stage tokens/s per CPU / raw encode tokens/s on one core, is printed
above it.)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("RAY_TMPDIR", "/tmp/llmp-ray-bench")
os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(bucket: str, endpoint: str, megabytes: int) -> tuple[list[str], int]:
    import boto3

    from llm_platform.data import sample

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    texts, size, part, seed = [], 0, 0, 0
    while size < megabytes * 1_000_000:
        docs = sample.generate(25_000, seed=seed)
        # Unique prefixes keep dedup honest: the bench measures throughput, not how much the salt removes.
        docs = [{"text": f"Story {seed}-{i}. {d['text']}"} for i, d in enumerate(docs)]
        body = sample.to_jsonl(docs)
        s3.put_object(Bucket=bucket, Key=f"corpus/part-{part:03d}.jsonl", Body=body)
        texts += [d["text"] for d in docs]
        size += len(body)
        part, seed = part + 1, seed + 1
    return texts, size


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_s3(port: int) -> subprocess.Popen:
    """moto's S3 server in its own process (in this one its threads would share the stage driver's GIL)."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto server did not start on port {port}")


def loopback_s3() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, in its own process, with this process's storage pointed at it."""
    from llm_platform import storage

    port = free_port()
    server = start_s3(port)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    storage.configure({"endpoint_url": endpoint})
    return server, endpoint


def run_stage(root: str, sources: str, cores: set[int], name: str, s3_pid: int) -> tuple[dict, float, float]:
    import ray

    from llm_platform import cluster
    from llm_platform.config import compose
    from llm_platform.data.pipeline import build_dataset

    os.sched_setaffinity(0, cores)  # Ray's processes inherit the driver's affinity
    os.sched_setaffinity(s3_pid, cores)  # the S3 server shares the stage's cores, as it did in-process
    cfg = compose("data", [f"storage.root={root}", f"data.sources=[{sources}]", f"data.name={name}",
                           "data.seq_len=512", "tokenizer.vocab_size=4096", "data.num_shards=8"])
    cluster.connect(cfg.cluster)
    start, s3_cpu = time.perf_counter(), cpu_seconds(s3_pid)
    result = build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    wall, s3_cpu = time.perf_counter() - start, cpu_seconds(s3_pid) - s3_cpu
    ray.shutdown()
    return result.manifest, wall, s3_cpu


def cpu_floor(texts: list[str], tok, cfg) -> dict[str, float]:
    """Single-thread CPU seconds per document of the stage's per-document work, each step the stage's own function
    on the same documents, with no Ray, no I/O and no exchange: cleaning (normalization and quality filters, the
    text hash), the dedup keys (MinHash signature and LSH band keys), and the BPE encode. The stage cannot be
    cheaper per document than their sum: reading, parsing, the exchanges, BPE training, packing and writing only
    add to it."""
    import numpy as np

    from llm_platform.data.prepare import KeyParams, PrepareSpec, clean_records, dedup_keys
    from llm_platform.data.shards import encode_with
    from llm_platform.data.sources import ReadSpec

    n = len(texts)
    spec = PrepareSpec(read=ReadSpec.from_config(cfg.data), normalize=cfg.data.normalize,
                       scrub_pii=cfg.data.scrub_pii, filters=cfg.data.filters,
                       keys=KeyParams.from_config(cfg.data.dedup), partitions=1, work="", max_reported=0)
    records = [{"doc_id": i, "source": "s3://bench/corpus/part-000.jsonl", "line": i, "text": t, "prompt": "",
                "response": "", "messages": "", "drop_reason": ""} for i, t in enumerate(texts)]
    t0 = time.process_time()
    cleaned = [c for i in range(0, n, 2048) for c in clean_records(records[i:i + 2048], spec)]
    clean_s = time.process_time() - t0
    kept = [c for c in cleaned if not c["drop_reason"]]
    ids = np.asarray([c["doc_id"] for c in kept], np.int64)
    hashes = np.asarray([c["text_hash"] for c in kept], np.int64)
    t0 = time.process_time()
    for i in range(0, len(kept), 2048):  # the stage's read batches are this size
        dedup_keys(ids[i:i + 2048], hashes[i:i + 2048], [c["text"] for c in kept[i:i + 2048]], spec.keys)
    keys_s = time.process_time() - t0
    t0 = time.process_time()
    for i in range(0, n, cfg.data.tokenize_batch_size):  # the stage's encode, on the stage's batches
        encode_with(tok, texts[i:i + cfg.data.tokenize_batch_size])
    encode_s = time.process_time() - t0
    return {"clean": clean_s / n, "dedup keys": keys_s / n, "encode": encode_s / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MB")
    parser.add_argument("--skip-one-core", action="store_true",
                        help="run the stage on all cores only (quicker; no scaling figure)")
    args = parser.parse_args()
    from llm_platform import storage
    from llm_platform.data.dataset import load_tokenizer

    server, endpoint = loopback_s3()
    texts, size = make_corpus("bench", endpoint, args.mb)
    all_cores = os.sched_getaffinity(0)
    ncores = len(all_cores)

    runs = {}
    settings = [("1 core", {min(all_cores)})] * (not args.skip_one_core) + [(f"{ncores} cores", all_cores)]
    for label, cores in settings:
        runs[label] = (*run_stage(f"s3://bench/store-{len(cores)}", "s3://bench/corpus/*.jsonl", cores, "bench",
                                  server.pid), len(cores))
    os.sched_setaffinity(0, all_cores)

    manifest = runs[f"{ncores} cores"][0]
    dataset_uri = f"s3://bench/store-{ncores}/datasets/bench/{manifest['fingerprint']}"
    tok = load_tokenizer(storage.join(dataset_uri, "tokenizer")).backend_tokenizer
    kept = texts  # the raw baseline encodes every document once, like the stage's pack phase
    # One core for the baseline only (read by `tokenizers` at each call): the stage ran as a user runs it, its BPE
    # training and encoding free to use the cores it was given (the per-CPU figures divide by them).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    start = time.perf_counter()
    raw_tokens = 0
    for i in range(0, len(kept), 256):
        raw_tokens += sum(len(e.ids) for e in tok.encode_batch(kept[i:i + 256], add_special_tokens=False))
    raw_wall = time.perf_counter() - start
    raw_tps = raw_tokens / raw_wall

    print(f"\ncorpus: {len(texts):,} documents, {size / 1e6:.1f} MB of JSONL on loopback S3; "
          f"machine: {ncores} cores; {time.strftime('%Y-%m-%d')}")
    header = f"{'run':<28}{'wall s':>9}{'tokens':>14}{'tokens/s':>12}{'per CPU':>12}{'vs raw':>9}"
    print(header)
    print("-" * len(header))
    print(f"{'raw encode_batch, 1 core':<28}{raw_wall:>9.1f}{raw_tokens:>14,}{raw_tps:>12,.0f}{raw_tps:>12,.0f}"
          f"{1.0:>9.2f}")
    per_cpu = {}
    for label, (m, wall, s3_cpu, cpus) in runs.items():
        tokens = sum(s["tokens_in"] for s in m["splits"].values())
        tps = tokens / wall
        per_cpu[label] = tps / cpus
        print(f"{'stage, ' + label:<28}{wall:>9.1f}{tokens:>14,}{tps:>12,.0f}{tps / cpus:>12,.0f}"
              f"{tps / cpus / raw_tps:>9.2f}")
        pack_s = m["timings_s"]["tokenize_pack_s"]
        print(f"{'  tokenize+pack phase':<28}{pack_s:>9.1f}{tokens:>14,}{tokens / pack_s:>12,.0f}"
              f"{tokens / pack_s / cpus:>12,.0f}{tokens / pack_s / cpus / raw_tps:>9.2f}")
        print("  phases: " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
        print(f"  the S3 server (moto, standing in for S3) used {s3_cpu:.1f} CPU-s of the {wall * cpus:.0f} the "
              f"stage had ({100 * s3_cpu / (wall * cpus):.0f}%)")
    from llm_platform.config import compose

    floor = cpu_floor(kept[:40_000], tok, compose("data", []))
    total = sum(floor.values())
    print("\nCPU per document, one thread, the stage's own functions without Ray or I/O (40,000 documents):")
    for step, sec in floor.items():
        print(f"  {step:<12}{1e6 * sec:>8.1f} us  {100 * sec / total:>5.1f}%")
    print(f"  ceiling: encode / (clean + dedup keys + encode) = {floor['encode'] / total:.2f} (the most any "
          f"implementation of this stage's work could reach on this ratio)")
    floor_cpu_s = total * len(texts)  # what the stage's own per-document work costs for the whole corpus
    vs_floor = {label: floor_cpu_s / (wall * cpus) for label, (m, wall, s3_cpu, cpus) in runs.items()}
    for label, value in vs_floor.items():
        print(f"stage, {label}: floor CPU-s {floor_cpu_s:.0f} / stage CPU-s {runs[label][1] * runs[label][3]:.0f} "
              f"= {value:.3f} of the floor (goal >= 0.5)")
    if "1 core" in runs:
        speedup = runs["1 core"][1] / runs[f"{ncores} cores"][1]
        print(f"scaling 1 -> {ncores} cores: {speedup:.2f}x wall-time speedup")
    server.terminate()
    print(f"vs raw encode on one core: {per_cpu[f'{ncores} cores'] / raw_tps:.3f}")
    print(f"ratio={vs_floor[f'{ncores} cores']:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
