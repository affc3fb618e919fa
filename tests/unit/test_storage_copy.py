"""Copies stream: registering a model larger than a small memory budget works, local and S3, every direction."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_platform import registry, storage

# What a copy may hold: the parts in flight, three times over (the S3 client copies a part's bytes), whatever the
# file's size; the file is well past that.
BUDGET_MB = 3 * storage.UPLOAD_CHUNK_BYTES * storage.UPLOAD_CONCURRENCY / 2**20
FILE_MB = int(BUDGET_MB * 1.6)


def _model_folder(path) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2"}, f)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        block = os.urandom(2**20)
        for _ in range(FILE_MB):
            f.write(block)
    os.makedirs(os.path.join(path, "tokenizer"), exist_ok=True)
    with open(os.path.join(path, "tokenizer", "tokenizer.json"), "w") as f:
        f.write("{}")
    return str(path)


def _peak_mb(script: str, endpoint: str) -> float:
    """Run `script` in a fresh process under tracemalloc (the loopback S3 server lives in this one) and return the
    peak traced memory in MB of the code after `# measure`."""
    code = ("import tracemalloc, sys\nfrom llm_platform import storage, registry\n"
            f"storage.configure({{'endpoint_url': {endpoint!r}}})\n"
            "import s3fs, botocore  # imports are not the copy\n"
            "tracemalloc.start()\n" + script + "\nprint(tracemalloc.get_traced_memory()[1] / 2**20)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "AWS_ENDPOINT_URL": endpoint})
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("direction", ["local->local", "local->s3", "s3->s3", "s3->local"])
def test_registering_a_large_model_streams_it(direction, tmp_path, s3_bucket, s3_server):
    src_kind, dst_kind = direction.split("->")
    local_model = _model_folder(tmp_path / "export")
    if src_kind == "s3":
        source = f"{s3_bucket}/runs/r/export"
        storage.upload_dir(local_model, source)
    else:
        source = local_model
    root = f"{s3_bucket}/store" if dst_kind == "s3" else str(tmp_path / "store")
    peak = _peak_mb(f"registry.register({root!r}, 'big', {source!r}, {{'source': 'test'}})", s3_server)
    assert peak < BUDGET_MB, f"{direction}: a {FILE_MB} MB file took {peak:.1f} MB of traced memory to register"

    version = registry.latest(root, "big")
    print(f"{direction}: peak {peak:.1f} MB")
    assert [n for n in storage.list_files(version.uri) if not n.startswith(".")] == [
        "config.json", "lineage.json", "model.safetensors", "tokenizer/tokenizer.json"]
    fs, path = storage.filesystem(storage.join(version.uri, "model.safetensors"))
    assert fs.info(path)["size"] == FILE_MB * 2**20
    with open(os.path.join(local_model, "model.safetensors"), "rb") as f:
        head = f.read(4096)
    assert storage.read_bytes(storage.join(version.uri, "model.safetensors"))[:4096] == head


def test_a_key_that_leaves_the_folder_is_refused_before_anything_is_copied(s3_bucket, tmp_path):
    import boto3

    from llm_platform.errors import DataError

    bucket = s3_bucket.split("://")[1]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="m/../../evil.txt", Body=b"x")
    with pytest.raises(DataError, match="evil.txt"):
        storage.copy_dir(f"{s3_bucket}/m", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
