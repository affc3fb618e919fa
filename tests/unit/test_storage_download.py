"""Downloading an S3 folder: no object lands outside the target folder, and the model cache is keyed by content,
filled atomically and private to this user (moto's S3 server, no Ray)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from llm_platform import registry, storage
from llm_platform.errors import DataError, StageError

pytestmark = pytest.mark.s3


def put(bucket_uri: str, key: str, body: bytes) -> None:
    import boto3

    bucket = bucket_uri[len("s3://"):]
    boto3.client("s3", endpoint_url=storage.endpoint_url()).put_object(Bucket=bucket, Key=key, Body=body)


def test_a_key_with_dot_dot_cannot_leave_the_folder(s3_bucket, tmp_path):
    put(s3_bucket, "model/config.json", b"{}")
    put(s3_bucket, "model/../../escaped.txt", b"evil")  # a valid S3 key: keys are plain strings
    target = tmp_path / "a" / "b" / "download"
    with pytest.raises(DataError, match=r"refusing to download object '.*model/\.\./\.\./escaped.txt'"):
        storage.download_dir(f"{s3_bucket}/model", str(target))
    assert not [p for p in tmp_path.rglob("escaped.txt")]
    with pytest.raises(DataError, match="refusing"):
        registry.materialize(f"{s3_bucket}/model", cache_dir=str(tmp_path / "cache"))
    assert not [p for p in tmp_path.rglob("escaped.txt")]


def test_folder_markers_and_nested_files_download(s3_bucket, tmp_path):
    put(s3_bucket, "m/config.json", b"{}")
    put(s3_bucket, "m/sub/", b"")  # a "folder" placeholder some S3 tools create
    put(s3_bucket, "m/sub/tok.json", b"[]")
    local = storage.download_dir(f"{s3_bucket}/m", str(tmp_path / "out"))
    assert sorted(str(p.relative_to(local)) for p in (tmp_path / "out").rglob("*") if p.is_file()) == \
        ["config.json", os.path.join("sub", "tok.json")]


def test_a_reuploaded_model_is_fetched_again(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/models/tiny"
    put(s3_bucket, "models/tiny/config.json", b"{}")
    put(s3_bucket, "models/tiny/model.safetensors", b"first")
    cache = str(tmp_path / "cache")
    first = registry.materialize(uri, cache_dir=cache)
    assert open(os.path.join(first, "model.safetensors"), "rb").read() == b"first"
    assert registry.materialize(uri, cache_dir=cache) == first  # unchanged: the same copy, no download
    put(s3_bucket, "models/tiny/model.safetensors", b"second")
    second = registry.materialize(uri, cache_dir=cache)
    assert second != first and open(os.path.join(second, "model.safetensors"), "rb").read() == b"second"


def test_downloads_go_to_a_private_folder_and_appear_whole(s3_bucket, tmp_path, monkeypatch):
    uri = f"{s3_bucket}/models/race"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        put(s3_bucket, f"models/race/{name}", name.encode() * 1000)
    cache = str(tmp_path / "cache")
    destinations: list[str] = []
    fs, _ = storage.filesystem(uri)  # one cached instance; fsspec puts its sync methods on the instance
    get_file = fs.get_file

    def recording_get_file(remote, dest, *args, **kwargs):
        destinations.append(dest)
        return get_file(remote, dest, *args, **kwargs)

    monkeypatch.setattr(fs, "get_file", recording_get_file)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(registry.materialize(uri, cache_dir=cache)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3 and len(set(results)) == 1, results
    final = results[0]
    # Nothing was ever written into the folder that readers load; each download went to a temporary sibling.
    assert destinations and not [d for d in destinations if d.startswith(final + os.sep)]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert open(os.path.join(final, name), "rb").read() == name.encode() * 1000
    assert os.listdir(cache) == [os.path.basename(final)]  # no partial copies left behind


def test_the_default_cache_is_private(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    folder = storage.private_cache_dir("llmp-models")
    assert folder == str(tmp_path / f"llmp-models-{os.getuid()}")
    assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0
    os.chmod(folder, 0o777)  # planted or opened up by someone else: refused
    with pytest.raises(StageError, match="closed to others"):
        storage.private_cache_dir("llmp-models")


def test_a_download_killed_midway_leaves_no_folder_behind(s3_bucket, tmp_path):
    """A process killed while it downloads never runs its cleanup: the next download on the node removes that
    process's temporary folder (it can hold most of a model) and leaves a live process's alone."""
    import subprocess
    import sys

    uri = f"{s3_bucket}/models/killed"
    put(s3_bucket, "models/killed/config.json", b"{}")
    cache = tmp_path / "cache"
    cache.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # exited: its pid is not running (reuse within the test is not a concern here)
    abandoned = cache / f".abc.partial-{dead_pid}-x1y2"
    (abandoned / "sub").mkdir(parents=True)
    (abandoned / "sub" / "model.safetensors").write_bytes(b"half a model")
    live = cache / f".abc.partial-{os.getpid()}-x3y4"  # this process: a download under way
    live.mkdir()
    unrelated = cache / "notes.partial-999999-x"  # not a folder of ours (no leading dot): never touched
    unrelated.mkdir()
    local = registry.materialize(uri, cache_dir=str(cache))
    assert os.path.isfile(os.path.join(local, "config.json"))
    assert not abandoned.exists()
    assert live.is_dir() and unrelated.is_dir()
    assert not [p for p in cache.iterdir() if ".partial-" in p.name and p not in (live, unrelated)]
