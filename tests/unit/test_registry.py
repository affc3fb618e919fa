"""Registry: numbered versions, lineage written last, LATEST moved atomically, clear errors."""

import json
import os

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
    with pytest.raises(registry.RegistryError, match="invalid model name"):
        registry.register(root, "../evil", make_model_dir(tmp_path / "c", "C"), {})


@pytest.mark.s3
def test_registry_on_s3(s3_bucket, tmp_path):
    root = f"{s3_bucket}/prefix"
    mv = registry.register(root, "tiny", make_model_dir(tmp_path / "a", "A"), {"note": "s3"})
    assert mv.uri.startswith("s3://")
    assert registry.latest(root, "tiny").lineage["note"] == "s3"
    local = registry.materialize(mv.uri, cache_dir=str(tmp_path / "cache"))
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"A"
