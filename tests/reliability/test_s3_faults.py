"""The data stage and checkpointing against an object store that fails (issues 2 and 8).

A fault-injecting proxy (`faulty_s3.py`) sits in front of the loopback S3 (moto). For a seeded share of requests it
answers 500 InternalError, 503 SlowDown / ServiceUnavailable, or resets the connection; or it plays a bucket policy
that refuses a bucket with 403 AccessDenied. Stages reach it the way a user points them at an S3 endpoint: the
`storage.endpoint_url` config key, applied with `storage.configure` as the entry points do. The session's Ray was
started with moto's endpoint in its environment, so these tests also show that the stages hand the driver's endpoint
to their Ray tasks instead of relying on what a worker process inherited.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import uuid
from urllib.parse import urlsplit

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faulty_s3 import FAULTS, FaultyS3

from llm_platform import storage
from llm_platform.config import compose
from llm_platform.data import pipeline, sample
from llm_platform.errors import DataError

pytestmark = pytest.mark.s3  # every test here talks to the loopback S3 through the proxy

FAULT_RATE = 0.1  # of requests; with 8 attempts per call, a call fails for good with odds of 0.1**8
# Requests that only the data stage's Ray tasks make, each failed once for sure (random faults may miss them).
DATA_TASK_FAULTS = {("GET", "/raw/b.jsonl.gz"): "reset",                # a read task reading the corpus (s3fs)
                    ("PUT", "/_work/clean/"): "internal_error",         # Ray Data writing clean parquet (pyarrow)
                    ("PUT", "/train/part-"): "slow_down",               # a pack task writing a shard (s3fs)
                    ("PUT", "/_work/shards/"): "service_unavailable"}   # a pack task's resume marker (s3fs)
# The same for training: Ray Train's checkpoint upload from the worker (pyarrow), rank 0's metrics (s3fs), and the
# driver's export (s3fs).
TRAIN_FAULTS = {("PUT", ".distcp"): "reset", ("PUT", "/metrics.jsonl"): "slow_down",
                ("PUT", "/model.safetensors"): "internal_error"}


@pytest.fixture
def proxies(s3_server):
    """`proxies(**kwargs)` starts a FaultyS3 in front of moto; afterwards every proxy stops and storage points at
    moto again (the session's default)."""
    started: list[FaultyS3] = []

    def start(**kwargs) -> FaultyS3:
        proxy = FaultyS3(urlsplit(s3_server).port, **kwargs).start()
        started.append(proxy)
        return proxy

    yield start
    storage.configure({"endpoint_url": s3_server})
    for proxy in started:
        proxy.stop()


def new_bucket(s3_server, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def upload_corpus(s3_server, bucket: str, num_documents: int = 160) -> list[str]:
    """Three corpus files (JSONL, gzip JSONL, parquet) of sample documents; returns their S3 keys."""
    import gzip

    texts = [d["text"] for d in sample.generate(num_documents, seed=21)]
    third = len(texts) // 3
    s3 = boto3.client("s3", endpoint_url=s3_server)
    jsonl = [("".join(json.dumps({"text": t}) + "\n" for t in part)).encode()
             for part in (texts[:third], texts[third:2 * third])]
    s3.put_object(Bucket=bucket, Key="raw/a.jsonl", Body=jsonl[0])
    s3.put_object(Bucket=bucket, Key="raw/b.jsonl.gz", Body=gzip.compress(jsonl[1]))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts[2 * third:]}), buf)
    s3.put_object(Bucket=bucket, Key="raw/c.parquet", Body=buf.getvalue())
    return ["raw/a.jsonl", "raw/b.jsonl.gz", "raw/c.parquet"]


def met(proxy: FaultyS3, wanted: dict[tuple[str, str], str]) -> dict[tuple[str, str], int]:
    """How many requests of each `fail_first` kind passed through the proxy and got their fault."""
    return {(method, part): sum(1 for m, path, fault in proxy.requests if m == method and part in path
                                and fault == kind) for (method, part), kind in wanted.items()}


def data_stage(root: str, sources: list[str], endpoint: str, *extra: str):
    """Compose the data stage's config as `llm-platform data` does and apply its storage node."""
    cfg = compose("data", ["debug=smoke", f"storage.root={root}", f"storage.endpoint_url={endpoint}",
                           f"data.sources=[{','.join(sources)}]", "data.name=faults", "data.seq_len=32",
                           "data.num_shards=2", *extra])
    storage.configure(cfg.storage)
    return cfg


def file_hashes(uri: str) -> dict[str, str]:
    """sha256 of every object under a folder URI, by relative path."""
    fs, path = storage.filesystem(uri)
    return {p[len(path) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(path)}


# Manifest fields that legitimately differ between two builds of the same dataset.
VOLATILE = ("created_at", "timings_s")


@pytest.mark.ray
@pytest.mark.slow
def test_data_stage_under_s3_faults_matches_a_clean_run(ray_session, s3_server, proxies, reliability_report):
    """Fault: 10% of requests get 500 InternalError, 503 SlowDown/ServiceUnavailable or a connection reset.
    Load: the whole data stage (3 corpus files read, clean parquet written by Ray Data, dedup, BPE, 2+1 packed
    shards, manifest) reading its corpus from and writing its dataset to S3 through the proxy.
    On top of the random faults, the first request of each kind that only the stage's Ray tasks make (corpus read,
    clean parquet write, shard write, shard marker) fails for sure.
    Must hold: the stage completes, its Ray tasks went through the proxy (not the endpoint their worker processes
    started with) and got those faults, and every output file (shards, tokenizer) is byte-identical to a clean
    run's against moto, with the same manifest apart from timestamps and timings."""
    bucket = new_bucket(s3_server, "faults-data")
    keys = upload_corpus(s3_server, bucket)
    sources = [f"s3://{bucket}/raw/*"]

    cfg = data_stage(f"s3://{bucket}/clean", sources, s3_server)
    clean = pipeline.build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root, progress=False)

    proxy = proxies(fault_rate=FAULT_RATE, seed=8, fail_first=DATA_TASK_FAULTS)
    cfg = data_stage(f"s3://{bucket}/faulty", sources, proxy.endpoint)
    faulty = pipeline.build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root, progress=False)

    assert sum(proxy.counts[f] for f in FAULTS) > len(DATA_TASK_FAULTS), proxy.counts  # random ones too
    assert all(met(proxy, DATA_TASK_FAULTS).values()), met(proxy, DATA_TASK_FAULTS)
    out = faulty.uri.split("://", 1)[1]
    seen = {(method, path) for method, path, _ in proxy.requests}
    assert {("GET", f"{bucket}/{key}") for key in keys} <= seen  # every corpus file was read through the proxy
    assert ("PUT", f"{out}/train/part-00000.parquet") in seen

    # Same inputs and config, so the same fingerprint under each root, and the same bytes.
    assert faulty.uri.rsplit("/", 1)[-1] == clean.uri.rsplit("/", 1)[-1]
    assert not faulty.reused and not faulty.manifest["resumed_phases"]
    storage.configure({"endpoint_url": s3_server})  # compare straight from moto
    ours, theirs = file_hashes(faulty.uri), file_hashes(clean.uri)
    assert not any(name.startswith("_work/") for name in ours)  # the scratch folder is gone
    assert {"tokenizer/tokenizer.json", "train/part-00000.parquet", "val/part-00000.parquet"} <= set(ours)
    ours.pop("manifest.json"), theirs.pop("manifest.json")
    assert ours == theirs
    m_faulty = {k: v for k, v in storage.read_json(storage.join(faulty.uri, "manifest.json")).items()
                if k not in VOLATILE}
    m_clean = {k: v for k, v in clean.manifest.items() if k not in VOLATILE}
    assert m_faulty == m_clean
    assert m_faulty["counts"]["documents_kept"] > 100 and m_faulty["splits"]["train"]["num_records"] > 0
    reliability_report("S3: data stage through a proxy failing 10% of requests (500/503/SlowDown/reset)",
                       requests=proxy.counts["requests"], faults=sum(proxy.counts[f] for f in FAULTS),
                       outputs_identical_to_clean=True)


def train_config(max_steps: int = 4):
    from llm_platform.config.model import ModelConfig
    from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ScalingConfig, TrainConfig

    model = ModelConfig(name="tiny", family="gpt2", num_layers=2, num_heads=4, hidden_size=32,
                        max_position_embeddings=64)
    # Checkpoints at steps 2 and 4 (the newest kept). No restarts allowed: the faults must be absorbed by retries,
    # not by Ray Train replacing a worker.
    train = TrainConfig(max_steps=max_steps, micro_batch_size=4, log_interval_steps=1, eval_interval_steps=2,
                        eval_batches=1, shuffle_buffer_rows=0, max_failures=0,
                        checkpoint=CheckpointConfig(interval_steps=2, keep_latest=1),
                        optimizer=OptimizerConfig(warmup_steps=1, lr=3e-3))
    return model, train, ScalingConfig(num_workers=1, cpus_per_worker=1)


def checkpoint_state(uri: str, scratch) -> dict:
    """Every tensor and value of a DCP checkpoint (model and optimizer), loaded without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    local = storage.download_dir(uri, str(scratch / "dcp"))
    dcp_to_torch_save(local, str(scratch / "state.pt"))
    return torch.load(str(scratch / "state.pt"), weights_only=False)


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def assert_same_state(a: dict, b: dict) -> None:
    import torch

    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fb[key]), key
        else:
            assert value == fb[key], key


@pytest.mark.ray
@pytest.mark.slow
def test_checkpoints_and_export_under_s3_faults_match_a_clean_run(ray_session, s3_server, proxies, tmp_path,
                                                                  reliability_report):
    """Fault: 10% of requests get 500 InternalError, 503 SlowDown/ServiceUnavailable or a connection reset.
    Load: a 4-step, 1-worker Ray Train run whose run folder is on S3 through the proxy: dataset reads (Ray Data),
    metrics.jsonl rewritten every step, DCP checkpoints at steps 2 and 4 uploaded by Ray Train (the older one
    deleted), the HF export and lineage.json. On top of the random faults, the first upload of each DCP shard file,
    of metrics.jsonl and of the exported weights fails for sure.
    Must hold: the run completes without a restart (max_failures=0), those uploads went through the proxy and got
    their faults, and the final checkpoint (model and optimizer tensors, train state), the exported safetensors and
    the logged losses are identical to a clean run with the same seed straight to moto."""
    import torch
    from fixtures.training import make_dataset
    from safetensors.torch import load_file

    from llm_platform.train.launcher import launch

    bucket = new_bucket(s3_server, "faults-train")
    dataset = make_dataset(f"s3://{bucket}/data", "pretrain", seq_len=32, num_documents=200)
    model, train, scaling = train_config()

    storage.configure({"endpoint_url": s3_server})
    clean = launch(model, train, scaling, dataset, f"s3://{bucket}/clean", run_name="tiny")

    proxy = proxies(fault_rate=FAULT_RATE, seed=9, fail_first=TRAIN_FAULTS)
    storage.configure({"endpoint_url": proxy.endpoint})
    faulty = launch(model, train, scaling, dataset, f"s3://{bucket}/faulty", run_name="tiny")
    storage.configure({"endpoint_url": s3_server})

    assert sum(proxy.counts[f] for f in FAULTS) > len(TRAIN_FAULTS), proxy.counts  # random ones too
    assert all(met(proxy, TRAIN_FAULTS).values()), met(proxy, TRAIN_FAULTS)
    seen = {(method, path) for method, path, _ in proxy.requests}
    run = f"{bucket}/faulty/runs/tiny"
    assert ("PUT", f"{run}/checkpoint_00000002/__0_0.distcp") in seen  # both checkpoints were uploaded through it
    assert ("PUT", f"{run}/checkpoint_00000004/__0_0.distcp") in seen

    for result in (faulty, clean):
        assert result.checkpoint_uri.endswith("/checkpoint_00000004")
    assert [n for n in storage.listdir(faulty.run_uri) if n.startswith("checkpoint_0")] == ["checkpoint_00000004"]
    assert storage.exists(storage.join(faulty.run_uri, "lineage.json"))  # the run's record, written last
    # The same position and step; what each run spent (wall-clock hours, train/budget.py) differs, of course.
    spend = ("cost_usd", "gpu_hours", "hours")
    states = [{k: v for k, v in storage.read_json(storage.join(r.checkpoint_uri, "train_state.json")).items()
               if k not in spend} for r in (faulty, clean)]
    assert states[0] == states[1] and states[0]["step"] == 4
    assert_same_state(checkpoint_state(faulty.checkpoint_uri, tmp_path / "faulty"),
                      checkpoint_state(clean.checkpoint_uri, tmp_path / "clean"))

    exports = {}
    for name, result in (("faulty", faulty), ("clean", clean)):
        local = storage.download_dir(result.export_uri, str(tmp_path / f"export-{name}"))
        exports[name] = load_file(f"{local}/model.safetensors")
    assert exports["faulty"].keys() == exports["clean"].keys()
    assert all(torch.equal(exports["faulty"][k], exports["clean"][k]) for k in exports["clean"])

    def losses(run_uri: str) -> list[tuple]:
        lines = [json.loads(line) for line in storage.read_text(storage.join(run_uri, "metrics.jsonl")).splitlines()]
        return [(line["step"], line.get("train/loss"), line.get("val/loss")) for line in lines]

    assert [step for step, loss, _ in losses(faulty.run_uri) if loss is not None] == [1, 2, 3, 4]
    assert losses(faulty.run_uri) == losses(clean.run_uri)
    reliability_report("S3: training run (reads, DCP checkpoints, export) through the same faulty proxy",
                       requests=proxy.counts["requests"], faults=sum(proxy.counts[f] for f in FAULTS),
                       restarts=0, checkpoint_and_export_identical_to_clean=True)


def test_corpus_in_a_refused_bucket_fails_naming_it(s3_server, proxies):
    """Fault: the corpus bucket's policy refuses these credentials (403 AccessDenied on every request to it), or
    refuses reading its objects while listing them is allowed.
    Load: the data stage pointed at that corpus, alone and next to a readable corpus with `data.on_error=skip`.
    Must hold: the stage stops before any Ray work with a one-line DataError that names the source and the bucket
    and says access was denied (no botocore internals), whatever `data.on_error` says, and writes nothing to the
    output location, so nothing there can look complete."""
    refused, allowed = new_bucket(s3_server, "refused"), new_bucket(s3_server, "allowed")
    upload_corpus(s3_server, refused, num_documents=30)
    upload_corpus(s3_server, allowed, num_documents=30)
    root = f"s3://{allowed}/store"

    cases = [
        (dict(deny_buckets={refused}), [f"s3://{refused}/raw/*"], f"s3://{refused}/raw/*"),
        (dict(deny_buckets={refused}), [f"s3://{allowed}/raw/*", f"s3://{refused}/raw/a.jsonl"],
         f"s3://{refused}/raw/a.jsonl"),
        (dict(deny_prefixes={f"{refused}/raw/"}), [f"s3://{refused}/raw/*"], f"s3://{refused}/raw/a.jsonl"),
    ]
    for policy, sources, named in cases:
        proxy = proxies(fault_rate=0.0, **policy)
        cfg = data_stage(root, sources, proxy.endpoint, "data.on_error=skip")
        with pytest.raises(DataError) as raised:
            pipeline.build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root, progress=False)
        message = str(raised.value)
        assert message.startswith(f"{named}: access denied"), message
        assert f"bucket '{refused}'" in message and "\n" not in message
        assert "botocore" not in message and "ClientError" not in message
        assert proxy.counts["access_denied"] > 0
        assert storage.listdir(root) == []  # nothing written, let alone a manifest


def test_pyarrow_filesystem_keeps_its_retries_when_shipped_to_a_worker(proxies):
    """Fault: every request fails with 500 InternalError or 503 SlowDown/ServiceUnavailable (no resets: curl
    silently re-sends a request whose reused connection was reset, which would blur the count).
    Load: one HEAD through a pickled copy of `storage.pyarrow_filesystem`'s filesystem, which is what Ray Data and
    Ray Train send to the tasks and workers that read and write parquet and checkpoints.
    Must hold: the copy makes exactly `storage.retries` attempts (pyarrow's own pickling drops the retry strategy,
    and its default gives up after 3)."""
    proxy = proxies(fault_rate=1.0, seed=3, faults=("internal_error", "slow_down", "service_unavailable"))
    retries = storage.settings()["retries"]
    storage.configure({"endpoint_url": proxy.endpoint, "retries": 4})
    try:
        fs, path = storage.pyarrow_filesystem("s3://any-bucket/some/key.parquet")
        shipped = pickle.loads(pickle.dumps(fs))
        with pytest.raises(OSError):
            shipped.get_file_info(path)
    finally:
        storage.configure({"retries": retries})
    assert proxy.counts["requests"] == 4, proxy.requests
