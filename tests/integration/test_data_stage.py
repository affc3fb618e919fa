"""The data stage end to end on a local Ray, reading from and writing to a loopback S3 (moto server)."""

import gzip
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm_platform import storage
from llm_platform.config import compose
from llm_platform.data import phases, pipeline, sample
from llm_platform.data.dataset import open_dataset
from llm_platform.errors import DataError

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


def stage_config(root: str, sources: list[str], *extra: str):
    cfg = compose("data", ["debug=smoke", f"storage.root={root}", f"data.sources=[{','.join(sources)}]",
                           "data.name=t", "data.seq_len=32", *extra])
    return cfg.data, cfg.tokenizer


def unique_docs(n: int) -> list[str]:
    """Sample stories made distinct: the grammar is small, so two stories can be near-duplicates by chance; a
    preamble of random words per document keeps unrelated documents far below the dedup threshold."""
    import random

    rng = random.Random(5)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "ra", "no", "vi") for b in ("p", "t", "n", "s", "m")]
    docs = []
    for i, d in enumerate(sample.generate(n * 2, seed=11)):
        if "@" in d["text"] or len(d["text"].split()) < 20:
            continue
        docs.append(f"Tale {i}: {' '.join(rng.choice(words) for _ in range(12))}. {d['text']}")
    return docs[:n]


@pytest.fixture(scope="module")
def salted_corpus(s3_server, request):
    """A corpus on S3 salted with every kind of bad input; returns (bucket, sources, good docs, planted reasons)."""
    import uuid

    import boto3

    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    docs = unique_docs(160)
    good = "".join(json.dumps({"text": t}) + "\n" for t in docs[:120]).encode()
    s3.put_object(Bucket=bucket, Key="raw/good.jsonl.gz", Body=gzip.compress(good))
    bad_lines = [json.dumps({"text": docs[120]}).encode(), b"{broken json", json.dumps({"body": "x"}).encode(),
                 b'{"text": "bad \xff utf8 here"}', json.dumps({"text": "   "}).encode(),
                 json.dumps({"text": docs[121]}).encode(),
                 json.dumps({"text": docs[0]}).encode(),  # exact duplicate of good.jsonl line 1
                 # A near duplicate (Jaccard 0.96, certain to meet in an LSH band; one changed word mid-text gives
                 # 0.83, which at threshold 0.8 a 14x9 banding catches with p = 0.87 only).
                 json.dumps({"text": docs[1] + " The end."}).encode()]
    s3.put_object(Bucket=bucket, Key="raw/mixed.jsonl", Body=b"\n".join(bad_lines) + b"\n")
    s3.put_object(Bucket=bucket, Key="raw/broken.parquet", Body=b"PAR1 not really parquet")
    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs[122:160]}), buf)
    s3.put_object(Bucket=bucket, Key="raw/more.parquet", Body=buf.getvalue())
    sources = [f"s3://{bucket}/raw/*", f"s3://{bucket}/missing/*.jsonl"]
    planted = {"malformed_json": 1, "missing_field": 1, "invalid_utf8": 1, "empty": 1, "corrupt_file": 1,
               "missing_path": 1}
    return bucket, sources, docs[:160], planted


def test_s3_corpus_with_bad_input(ray_session, salted_corpus):
    bucket, sources, docs, planted = salted_corpus
    root = f"s3://{bucket}/store"
    data_cfg, tok_cfg = stage_config(root, sources)
    result = pipeline.build_dataset(data_cfg, tok_cfg, root, progress=False)
    m = result.manifest
    assert result.uri.startswith(f"s3://{bucket}/store/datasets/t/")
    assert storage.exists(storage.join(result.uri, "manifest.json"))
    assert not storage.exists(storage.join(result.uri, "_work"))

    for reason, n in planted.items():
        assert m["counts"]["dropped"].get(reason) == n, (reason, m["counts"]["dropped"])
    assert m["counts"]["exact_duplicates"] == 1
    assert m["counts"]["near_duplicates"] == 1
    # Nothing valid is lost: every good document is kept.
    assert m["counts"]["documents_kept"] == len(docs)
    named = {(s["source"].rsplit("/", 1)[-1], s["line"], s["reason"].split(":")[0]) for s in m["skipped"]}
    assert ("mixed.jsonl", 2, "malformed_json") in named and ("mixed.jsonl", 4, "invalid_utf8") in named
    assert any(s[0] == "broken.parquet" and s[2] == "corrupt_file" for s in named)

    ds = open_dataset(result.uri)
    total_records = 0
    for split, meta in m["splits"].items():
        assert meta["tokens_in"] == meta["num_tokens"] + meta["remainder_tokens"]  # exact conservation
        assert len(meta["row_groups"]) == len(ds.files[split])
        for uri, runs in zip(ds.files[split], meta["row_groups"]):
            footer = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri))).metadata
            assert [n for n, c in runs for _ in range(c)] == \
                [footer.row_group(g).num_rows for g in range(footer.num_row_groups)]
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
            lengths = {len(x) for x in table["input_ids"].to_pylist()}
            assert lengths == {32}
            total_records += table.num_rows
    assert total_records == m["splits"]["train"]["num_records"] + m["splits"]["val"]["num_records"]
    assert m["splits"]["val"]["documents"] > 0
    # The packed stream decodes back to the documents, EOS-separated, in order within a shard.
    tok = ds.load_tokenizer()
    first = pq.read_table(io.BytesIO(storage.read_bytes(ds.files["train"][0])))["input_ids"].to_pylist()
    text = tok.decode([t for block in first for t in block])
    assert sum(doc in text for doc in docs) >= 10
    freqs = np.asarray(m["stats"]["token_frequencies"])
    assert freqs.shape == (ds.vocab_size,) and abs(freqs.sum() - 1) < 1e-6

    again = pipeline.build_dataset(data_cfg, tok_cfg, root, progress=False)
    assert again.reused and again.uri == result.uri and again.manifest == m
    assert pipeline.resolve_dataset(data_cfg, tok_cfg, root) == result.uri
    assert "records read" in result.summary()


def test_interrupted_run_resumes_and_matches_a_clean_run(ray_session, tmp_path, monkeypatch, salted_corpus):
    bucket, sources, _, _ = salted_corpus
    root_a, root_b = str(tmp_path / "a"), str(tmp_path / "b")
    data_cfg, tok_cfg = stage_config(root_a, sources[:1])
    clean_run = pipeline.build_dataset(data_cfg, tok_cfg, root_b, progress=False)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before packing")

    monkeypatch.setattr(phases, "pack", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.build_dataset(data_cfg, tok_cfg, root_a, progress=False)
    assert pipeline.resolve_dataset(data_cfg, tok_cfg, root_a) is None  # nothing looks complete
    monkeypatch.undo()

    resumed = pipeline.build_dataset(data_cfg, tok_cfg, root_a, progress=False)
    assert resumed.manifest["resumed_phases"] == ["read_clean", "dedup", "tokenizer"]
    assert resumed.uri.rsplit("/", 1)[-1] == clean_run.uri.rsplit("/", 1)[-1]  # same fingerprint
    for split in ("train", "val"):
        assert resumed.manifest["splits"][split] == clean_run.manifest["splits"][split]
        for rel in resumed.manifest["splits"][split]["files"]:
            a = pq.read_table(storage.join(resumed.uri, rel))
            b = pq.read_table(storage.join(clean_run.uri, rel))
            assert a.equals(b), rel


def test_on_error_fail_stops_with_file_and_line(ray_session, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a fine document with enough words to pass"}) + "\n{bad\n")
    data_cfg, tok_cfg = stage_config(str(tmp_path / "s"), [str(corpus)], "data.on_error=fail")
    with pytest.raises(DataError, match=r"c\.jsonl:2: malformed_json"):
        pipeline.build_dataset(data_cfg, tok_cfg, str(tmp_path / "s"), progress=False)


def test_sft_records_mask_the_prompt(ray_session, tmp_path):
    corpus = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(60)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = str(tmp_path / "s")
    cfg = compose("data", ["debug=smoke", "data=sft", f"storage.root={root}", f"data.sources=[{corpus}]",
                           "data.seq_len=24", "data.val_fraction=0.1"])
    result = pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    ds = open_dataset(result.uri)
    table = pq.read_table(ds.files["train"][0])
    # Packed (data.pack_supervised, the default for sft): several records per row, each with its own positions.
    assert set(table.column_names) == {"input_ids", "labels", "attention_mask", "position_ids", "example_ids"}
    tok = ds.load_tokenizer()
    for ids, labels in zip(table["input_ids"].to_pylist()[:5], table["labels"].to_pylist()[:5]):
        answer = tok.decode([t for t in labels if t != -100])
        assert answer.startswith("It is") and answer.endswith("<|endoftext|>")
        assert tok.decode(ids).startswith("What is")


def test_a_local_ray_runs_a_task_per_core_plus_one(ray_session, tmp_path):
    """The session's Ray has 8 logical CPUs on this machine's cores: the stage's CPU-bound tasks run at most one per
    core plus one at once (more only start worker processes that then share the same cores). Each task holds its
    slot until as many tasks have started as the limit allows, so the tasks overlap as far as the pool lets them."""
    from llm_platform import cluster
    from llm_platform.data.executor import ray_tasks

    cores = cluster.machine_cores()
    assert cluster.cpu_task_slots() == cores
    folder = tmp_path / "started"
    folder.mkdir()

    def hold_until_started(i: int, folder: str, until: int) -> tuple[float, float]:
        """Mark this task's start, then wait until `until` tasks have started (60 s at most: a pool that never runs
        that many at once fails on its peak below, not by hanging); returns the task's (start, end)."""
        import os
        import time

        start = time.time()
        open(os.path.join(folder, str(i)), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(folder)) < until and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the condition: the tasks are worker processes with no event to share
        return start, time.time()

    spans = ray_tasks(hold_until_started, [(i,) for i in range(cores + 5)], num_cpus=1, folder=str(folder),
                      until=cores + 1).values
    assert len(spans) == cores + 5
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 2 <= peak <= cores + 1


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_many_small_compressed_files_on_s3_read_as_from_disk(s3_bucket, tmp_path, monkeypatch, compression):
    """Small files are fetched whole and ahead of the parser on S3 (the stored bytes, never inflated by the
    client): the same corpus from S3 and from disk, in units of many files, gives the same shards."""
    import zstandard

    monkeypatch.chdir(tmp_path)
    docs = unique_docs(90)
    pack = {"": bytes, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}[compression]
    (tmp_path / "corpus").mkdir()
    for i in range(30):
        body = pack("".join(json.dumps({"text": t}) + "\n" for t in docs[3 * i:3 * i + 3]).encode())
        storage.write_bytes(f"{s3_bucket}/corpus/f{i:02d}.jsonl{compression}", body)
        (tmp_path / "corpus" / f"f{i:02d}.jsonl{compression}").write_bytes(body)
    shards = []
    for root, source in ((f"{s3_bucket}/store", f"{s3_bucket}/corpus/*"), ("store", "corpus")):
        data_cfg, tok_cfg = stage_config(root, [source], "data.task_target_bytes=2000")
        m = pipeline.build_dataset(data_cfg, tok_cfg, root, executor=pipeline.in_process).manifest
        assert m["counts"]["records_in"] == 90 and m["counts"]["units"] > 1
        out = storage.join(root, "datasets", "t", m["fingerprint"])
        shards.append([storage.read_bytes(storage.join(out, f)) for f in m["splits"]["train"]["files"]])
    assert shards[0] == shards[1]


def test_a_large_jsonl_on_s3_read_in_byte_ranges(s3_bucket, tmp_path, monkeypatch):
    """A JSONL object larger than a task's share is read by several tasks, each its byte range through ranged
    reads on S3: the same shards and counts as the same file read whole from disk."""
    monkeypatch.chdir(tmp_path)
    docs = unique_docs(120)
    body = ("".join(json.dumps({"text": t}) + "\n" for t in docs) + "{broken\n").encode()
    storage.write_bytes(f"{s3_bucket}/corpus/big.jsonl", body)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "big.jsonl").write_bytes(body)
    results = []
    for root, source, target in ((f"{s3_bucket}/store", f"{s3_bucket}/corpus/big.jsonl", 4096),
                                 ("store", "corpus/big.jsonl", 1 << 30)):
        data_cfg, tok_cfg = stage_config(root, [source], f"data.task_target_bytes={target}")
        m = pipeline.build_dataset(data_cfg, tok_cfg, root, executor=pipeline.in_process).manifest
        out = storage.join(root, "datasets", "t", m["fingerprint"])
        results.append((m["counts"], [storage.read_bytes(storage.join(out, f)) for f in m["splits"]["train"]["files"]]))
    (counts_s3, shards_s3), (counts_disk, shards_disk) = results
    assert counts_s3.pop("units") == -(-len(body) // 4096) and counts_disk.pop("units") == 1
    assert counts_s3 == counts_disk and shards_s3 == shards_disk
    assert counts_s3["records_in"] == 121 and counts_s3["dropped"] == {"malformed_json": 1}
