"""Every config file composes, and typos or wrong types fail at compose time naming the key."""

from pathlib import Path

import pytest

from llm_platform.config import PlatformConfig, compose, conf_dir

STAGES = ["data", "train", "tune", "serve", "eval", "run"]


def group_options() -> list[tuple[str, str]]:
    root = conf_dir()
    out = []
    for path in sorted(root.glob("*/*.yaml")):
        group = path.parent.name
        if group == "local":
            continue
        out.append((group, path.stem))
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage):
    cfg = compose(stage)
    assert isinstance(cfg, PlatformConfig)


@pytest.mark.parametrize("group,option", group_options())
def test_every_group_option_composes(group, option, monkeypatch):
    monkeypatch.setenv("LLM_PLATFORM_BUCKET", "my-bucket")  # storage=s3 requires it
    cfg = compose("train", [f"{group}={option}"])
    assert isinstance(cfg, PlatformConfig)


def test_typo_names_the_key():
    with pytest.raises(Exception, match="data.sq_len"):
        compose("data", ["data.sq_len=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(Exception, match="data.seq_len"):
        compose("data", ["data.seq_len=ten"])


def test_debug_preset_changes_only_what_it_lists():
    base, smoke = compose("data"), compose("data", ["debug=smoke"])
    assert smoke.data.seq_len == 64 and base.data.seq_len == 128
    assert smoke.data.text_field == base.data.text_field


def test_conf_tree_is_where_the_package_says():
    assert (conf_dir() / "base.yaml").is_file()
    assert Path(conf_dir()).name == "conf"
