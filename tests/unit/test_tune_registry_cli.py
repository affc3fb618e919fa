"""`llm-platform registry list|show|promote` on a real registry folder."""

import json
import os

import pytest

from llm_platform import registry
from llm_platform.commands.registry import main


def model_dir(path, marker):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "marker": marker}, f)
    return str(path)


@pytest.fixture
def root(tmp_path):
    root = str(tmp_path / "store")
    registry.register(root, "tiny", model_dir(tmp_path / "a", "A"),
                      {"run": {"metrics": {"val/loss": 2.5, "train/loss": 2.7}}, "sweep": None})
    registry.register(root, "tiny", model_dir(tmp_path / "b", "B"),
                      {"run": {"metrics": {"val/loss": 2.25}},
                       "sweep": {"name": "s1", "trial_id": "abc_00001", "params": {"train.lr": 0.003}}})
    return root


def test_list_show_promote(root, capsys):
    main(["list", "--root", root])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["model", "version", "latest"]
    v1, v2 = out[1].split(), out[2].split()
    assert v1[:2] == ["tiny", "v0001"] and "2.5" in v1 and "*" not in v1
    assert v2[:3] == ["tiny", "v0002", "*"] and "2.25" in v2 and "s1/abc_00001" in v2

    main(["--root", root, "show", "tiny"])  # LATEST, --root before the action
    out = capsys.readouterr().out
    assert out.startswith("tiny v0002")
    lineage = json.loads(out.split("\n", 1)[1])
    assert lineage["sweep"]["trial_id"] == "abc_00001" and lineage["model"]["version"] == "v0002"

    main(["promote", "tiny", "v0001", "--root", root])
    assert "LATEST -> v0001" in capsys.readouterr().out
    assert registry.latest(root, "tiny").version == "v0001"
    main(["list", "tiny", "--root", root])
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["tiny", "v0001", "*"]


def test_unknown_version_is_one_clear_line(root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["promote", "tiny", "v0009", "--root", root])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "v0009" in err and "v0001, v0002" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["show", "nope", "--root", root])
    assert "'nope'" in capsys.readouterr().err
