"""Registry: numbered versions, lineage written last, LATEST moved atomically, clear errors; references and
LATEST never leave `registry/<model>/`, and concurrent registrations never share a version number."""

import json
import os
import threading

import pytest

from llm_platform import registry, storage


def make_model_dir(path, marker: str) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "marker": marker}, f)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(marker.encode())
    return str(path)


def test_register_list_promote_resolve(tmp_path):
    root = str(tmp_path / "store")
    a = registry.register(root, "tiny", make_model_dir(tmp_path / "a", "A"), {"run": {"metrics": {"val/loss": 2.0}}})
    b = registry.register(root, "tiny", make_model_dir(tmp_path / "b", "B"), {"run": {"metrics": {"val/loss": 1.5}}})
    assert (a.version, b.version) == ("v0001", "v0002")
    assert [v.version for v in registry.list_versions(root, "tiny")] == ["v0001", "v0002"]
    assert registry.latest(root, "tiny").version == "v0002"
    assert registry.resolve("registry:tiny", root).metrics == {"val/loss": 1.5}
    registry.promote(root, "tiny", "v0001")
    assert registry.resolve("registry:tiny", root).version == "v0001"
    assert registry.resolve("registry:tiny/v0002", root).lineage["model"]["version"] == "v0002"
    with open(os.path.join(registry.resolve("registry:tiny", root).uri, "model.safetensors"), "rb") as f:
        assert f.read() == b"A"


def test_incomplete_version_is_invisible_and_not_reused(tmp_path):
    root = str(tmp_path / "store")
    registry.register(root, "tiny", make_model_dir(tmp_path / "a", "A"), {})
    # An interrupted registration: files but no lineage.json.
    storage.write_text(storage.join(root, "registry", "tiny", "v0002", "config.json"), "{}")
    assert [v.version for v in registry.list_versions(root, "tiny")] == ["v0001"]
    nxt = registry.register(root, "tiny", make_model_dir(tmp_path / "b", "B"), {})
    assert nxt.version == "v0003"


def test_errors_name_the_model_and_version(tmp_path):
    root = str(tmp_path / "store")
    with pytest.raises(registry.RegistryError, match="'nope'"):
        registry.resolve("registry:nope", root)
    registry.register(root, "tiny", make_model_dir(tmp_path / "a", "A"), {})
    with pytest.raises(registry.RegistryError, match="v0009"):
        registry.resolve("registry:tiny/v0009", root)
    with pytest.raises(registry.RegistryError, match="HF-format"):
        registry.resolve(str(tmp_path / "missing"), root)
    with pytest.raises(registry.RegistryError, match="registry model name='../evil': not a valid name"):
        registry.register(root, "../evil", make_model_dir(tmp_path / "c", "C"), {})


@pytest.mark.s3
def test_registry_on_s3(s3_bucket, tmp_path):
    root = f"{s3_bucket}/prefix"
    mv = registry.register(root, "tiny", make_model_dir(tmp_path / "a", "A"), {"note": "s3"})
    assert mv.uri.startswith("s3://")
    assert registry.latest(root, "tiny").lineage["note"] == "s3"
    local = registry.materialize(mv.uri, cache_dir=str(tmp_path / "cache"))
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"A"


def test_references_and_promote_stay_inside_the_model(tmp_path):
    root = str(tmp_path / "store")
    registry.register(root, "debug", make_model_dir(tmp_path / "a", "A"), {})
    registry.register(root, "other", make_model_dir(tmp_path / "o", "O"), {})
    # A complete-looking model folder elsewhere in storage (a run's export).
    evil = make_model_dir(tmp_path / "store" / "runs" / "evil" / "export", "EVIL")
    storage.write_json(os.path.join(evil, "lineage.json"), {"model": {"name": "evil"}})
    for ref in ("registry:debug/../../runs/evil/export", "registry:debug/../other/v0001", "registry:../runs/evil",
                "registry:debug/v0001/../../other/v0001"):
        with pytest.raises(registry.RegistryError, match="not a version of model|not a valid name"):
            registry.resolve(ref, root)
    for version in ("../../runs/evil/export", "../other/v0001", "latest", "v1", "v0001/../v0001"):
        with pytest.raises(registry.RegistryError):
            registry.promote(root, "debug", version)
    with pytest.raises(registry.RegistryError, match="no version 'v0002'"):  # well-formed, but not registered
        registry.promote(root, "debug", "v0002")
    assert storage.read_text(os.path.join(root, "registry", "debug", "LATEST")) == "v0001\n"
    # LATEST rewritten by hand to point outside is refused when read, not followed.
    storage.write_text(os.path.join(root, "registry", "debug", "LATEST"), "../../runs/evil/export\n")
    with pytest.raises(registry.RegistryError, match="not a version of model 'debug'"):
        registry.resolve("registry:debug", root)


def _concurrent_registrations(root: str, tmp_path, monkeypatch, count: int):
    """`count` threads register at once, all listing the model's versions before any of them writes: the race
    that two `register` processes hit when their listings interleave."""
    barrier = threading.Barrier(count, timeout=30)
    listdir = storage.listdir

    def listing_then_wait(uri):
        names = listdir(uri)
        if uri.rstrip("/").endswith("/registry/tiny"):
            barrier.wait()
        return names

    monkeypatch.setattr(storage, "listdir", listing_then_wait)
    sources = [make_model_dir(tmp_path / f"src{i}", f"M{i}") for i in range(count)]
    results: dict[int, object] = {}

    def one(i):
        try:
            results[i] = registry.register(root, "tiny", sources[i], {"i": i}, make_latest=False)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.setattr(storage, "listdir", listdir)
    return results


def _check_distinct_versions(root, results, count):
    assert all(isinstance(r, registry.ModelVersion) for r in results.values()), results
    versions = {i: r.version for i, r in results.items()}
    assert sorted(versions.values()) == [f"v{n:04d}" for n in range(1, count + 1)], versions
    for i, version in versions.items():  # each version holds its own model and lineage, nothing mixed in
        mv = registry.get(root, "tiny", version)
        assert mv.lineage["i"] == i
        assert storage.read_bytes(storage.join(mv.uri, "model.safetensors")) == f"M{i}".encode()


def test_concurrent_register_never_shares_a_version(tmp_path, monkeypatch):
    root = str(tmp_path / "store")
    results = _concurrent_registrations(root, tmp_path, monkeypatch, 4)
    _check_distinct_versions(root, results, 4)


@pytest.mark.s3
def test_concurrent_register_on_s3_never_shares_a_version(s3_bucket, tmp_path, monkeypatch):
    root = f"{s3_bucket}/prefix"
    results = _concurrent_registrations(root, tmp_path, monkeypatch, 3)
    _check_distinct_versions(root, results, 3)


def test_promote_cli_refuses_a_path_as_version(tmp_path, capsys):
    from llm_platform.commands import registry as registry_cmd

    root = str(tmp_path / "store")
    registry.register(root, "debug", make_model_dir(tmp_path / "a", "A"), {})
    with pytest.raises(SystemExit) as e:
        registry_cmd.main(["promote", "debug", "../../runs/evil/export", "--root", root])
    assert e.value.code == 2
    assert "'../../runs/evil/export' is not a version of model 'debug'" in capsys.readouterr().err
    assert registry.latest(root, "debug").version == "v0001"
