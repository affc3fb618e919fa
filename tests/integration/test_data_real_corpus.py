"""The data stage through the session's Ray over a real corpus on S3: a few hundred files of fortunes and rendered
man pages (tests/fixtures/corpora.py), compared with a plain count of the files and with the plain reference
(tests/fixtures/data_reference.py)."""

import io
import os
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures import data_reference as ref
from fixtures.corpora import CorpusFile, debian_corpus, one_file_per_fortune, require_packages, upload

from llm_platform import storage
from llm_platform.config import compose
from llm_platform.data import pipeline
from llm_platform.data.dataset import open_dataset

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


def plain_count(f: CorpusFile) -> int:
    """Records in a file, counted by hand: JSONL lines that are not blank; paragraphs (runs of lines that are not
    blank) of a text file."""
    lines = f.data.decode("utf-8").split("\n")
    if ".jsonl" in f.path:
        return sum(1 for line in lines if line.strip())
    blank = [not line.strip() for line in lines]
    return sum(1 for i, b in enumerate(blank) if not b and (i == 0 or blank[i - 1]))


@pytest.fixture(scope="module")
def corpus_on_s3(s3_server):
    """The Debian corpus under s3://<new bucket>/corpora/debian: (that URI, its files)."""
    import uuid

    import boto3

    files = debian_corpus()
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    upload(files, s3_server, bucket, "corpora/debian")
    return f"s3://{bucket}/corpora/debian", files


def test_real_corpus_through_ray_on_s3(ray_session, corpus_on_s3):
    corpus, files = corpus_on_s3
    sizes = [len(f.stored) for f in files]
    assert len(files) >= 200 and max(sizes) > 500_000 and min(sizes) < 1000
    root = corpus.rsplit("/corpora/", 1)[0] + "/store"
    cfg = compose("data", ["debug=smoke", f"storage.root={root}", f"data.sources=[{corpus}]", "data.name=debian",
                           "data.text_unit=paragraph", "data.seq_len=128", "data.val_fraction=0.05",
                           "data.num_shards=2", "tokenizer.max_training_documents=3000"])
    result = pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    m = result.manifest

    # Every document accounted for, against a count of the files by hand.
    c = m["counts"]
    assert c["files"] == len(files) and c["dropped"].get("corrupt_file", 0) == 0
    assert c["records_in"] == sum(plain_count(f) for f in files)
    assert c["records_in"] == sum(c["dropped"].values()) + c["exact_duplicates"] + c["near_duplicates"] + \
        c["documents_kept"]
    assert c["exact_duplicates"] > 0  # man pages share paragraphs (REPORTING BUGS, COPYRIGHT...)

    # The same as the plain reference: counts, skipped records, tokenizer sample, every shard's blocks.
    limit = cfg.data.max_record_bytes
    sources = [ref.Source(f"{corpus}/{f.path}", len(f.stored),
                          ref.read_jsonl(f.data, limit) if ".jsonl" in f.path else
                          ref.read_text(f.data, "paragraph", limit, size=len(f.stored))) for f in files]
    exp = ref.expect(sources, cfg.data, cfg.tokenizer)
    assert {k: c[k] for k in exp.counts} == exp.counts
    assert [(s["source"], s["line"], s["reason"].split(":")[0]) for s in m["skipped"]] == \
        exp.skipped[:cfg.data.max_records_reported]
    with tempfile.TemporaryDirectory(prefix="llmp-corpus-tok-") as tok_dir:
        storage.download_dir(storage.join(result.uri, "tokenizer"), tok_dir)
        from tokenizers import Tokenizer

        from llm_platform.data import tokenizer as tokenizers

        trained = tokenizers.train_bpe(exp.tokenizer_sample, cfg.tokenizer).backend_tokenizer.to_str()
        assert Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).to_str() == trained
        ref.expect_shards(exp, cfg.data, tok_dir)
    splits = ref.expected_splits(exp, cfg.data.seq_len)
    ds = open_dataset(result.uri)
    for name in ("train", "val"):
        assert {k: v for k, v in m["splits"][name].items() if k != "row_groups"} == splits[name], name
        for uri, rel in zip(ds.files[name], m["splits"][name]["files"]):
            shard = rel.replace("/part-", "-").removesuffix(".parquet")
            blocks = pq.read_table(io.BytesIO(storage.read_bytes(uri)))["input_ids"].to_numpy(zero_copy_only=False)
            want = np.asarray(exp.shards[shard]["rows"]["input_ids"], np.int32)
            assert np.array_equal(np.stack(blocks), want), rel
    assert m["splits"]["val"]["documents"] > 0


def test_thousands_of_small_files_from_s3(ray_session, s3_server):
    """3,000 fortunes, one plain-text file each, on S3 (the corpus shape that once made the stage pay a Ray task, a
    HEAD and a handful of writes per file): a few tasks read them, and every file's document is accounted for and
    equals the reference's."""
    import uuid

    import boto3

    require_packages()
    files = one_file_per_fortune(3000)
    assert len(files) == 3000
    bucket = f"snippets-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    upload(files, s3_server, bucket, "corpus")
    root, corpus = f"s3://{bucket}/store", f"s3://{bucket}/corpus"
    cfg = compose("data", ["debug=smoke", f"storage.root={root}", f"data.sources=[{corpus}]", "data.name=snippets",
                           "data.seq_len=64", "data.val_fraction=0.05", "data.num_shards=2"])
    m = pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False).manifest
    c = m["counts"]
    assert c["files"] == 3000 and c["records_in"] == 3000 and c["units"] <= 3 * 8
    assert c["records_in"] == sum(c["dropped"].values()) + c["exact_duplicates"] + c["near_duplicates"] + \
        c["documents_kept"]
    sources = [ref.Source(f"{corpus}/{f.path}", len(f.stored), ref.read_text(f.data, "file", cfg.data.max_record_bytes))
               for f in sorted(files, key=lambda f: f.path)]
    exp = ref.expect(sources, cfg.data, cfg.tokenizer)
    assert {k: c[k] for k in exp.counts} == exp.counts
    assert [(s["source"], s["line"], s["reason"].split(":")[0]) for s in m["skipped"]] == \
        exp.skipped[:cfg.data.max_records_reported]
    for name in ("train", "val"):
        assert m["splits"][name]["documents"] == sum(exp.split[d.doc_id] == name for d in exp.survivors), name
