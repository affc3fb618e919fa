"""The composed config is checked before anything runs: stray keys refused by name, local paths made absolute, and
the console routing that a stage sets up. No Ray."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from llm_platform import console
from llm_platform.config import PlatformConfig, compose, paths
from llm_platform.errors import ConfigError


def test_a_key_added_with_plus_that_the_schema_lacks_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown config key data\.sq_len \(did you mean data\.seq_len\?\)"):
        compose("data", ["+data.sq_len=1"])
    with pytest.raises(ConfigError, match=r"unknown config key train\.optim \(did you mean train\.optimizer\?\)"):
        compose("train", ["+train.optim.lr=1"])
    # A typo inside a train sub-group is refused the same way, naming the full key.
    with pytest.raises(ConfigError,
                       match=r"unknown config key train\.optimizer\.lrr \(did you mean train\.optimizer\.lr\?\)"):
        compose("train", ["+train.optimizer.lrr=1"])


def test_free_form_dict_fields_still_take_any_key():
    cfg = compose("tune", ["+tune.space.train.lr={loguniform: [1e-4, 1e-2]}"])
    assert "train.lr" in str(cfg.tune.space) or "train" in cfg.tune.space


def test_relative_local_paths_become_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLM_PLATFORM_HOME", raising=False)
    (tmp_path / "tok").mkdir()  # a tokenizer folder here (tokenizer.path may also be a Hub id, like model.pretrained)
    cfg = compose("run", ["train.checkpoint.resume_from=runs/a/checkpoint_00000004",
                          "data.sources=[docs/*.jsonl,s3://b/c.jsonl]", "tokenizer.path=tok",
                          "eval.tasks_uri=file:tasks.jsonl", "serve.model=registry:debug",
                          "model.pretrained=meta-llama/Llama-3.2-1B"])
    assert cfg.storage.root == str(tmp_path / ".llm-platform" / "storage")
    assert cfg.log_dir == str(tmp_path / ".llm-platform" / "logs")
    assert cfg.train.checkpoint.resume_from == str(tmp_path / "runs/a/checkpoint_00000004")
    assert cfg.data.sources == [str(tmp_path / "docs/*.jsonl"), "s3://b/c.jsonl"]
    assert cfg.tokenizer.path == str(tmp_path / "tok")
    assert cfg.eval.tasks_uri == f"file:{tmp_path / 'tasks.jsonl'}"
    assert cfg.serve.model == "registry:debug"
    assert cfg.model.pretrained == "meta-llama/Llama-3.2-1B"  # a Hub id, not a folder here


def test_a_model_folder_that_exists_here_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    cfg = compose("train", ["model.pretrained=my-model", "eval.model=./other"])
    assert cfg.model.pretrained == str(tmp_path / "my-model")
    assert cfg.eval.model == str(tmp_path / "other")


def test_every_path_like_field_of_the_schema_is_listed():
    """A new `*_uri`, `*_path`, `*_file` or `*_dir` field must be added to config/paths.py (or it would be read in
    the worker's working directory)."""
    listed = set(paths.LOCAL_PATH_KEYS) | set(paths.MAYBE_PATH_KEYS)
    found = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            elif f.name.endswith(("_uri", "_path", "_file", "_dir")) or f.name in ("path", "root", "sources"):
                found.append(f"{prefix}{f.name}")

    walk(PlatformConfig, "")
    # Written by the platform itself or not a path of the user's (a URL, a name).
    not_paths = {"train.mlflow_tracking_uri"}
    assert sorted(set(found) - listed - not_paths) == []
    for key in listed:  # and every listed key exists
        paths._parent_and_field(PlatformConfig(), key)


def test_the_console_shows_our_lines_and_errors_and_the_log_file_gets_everything(tmp_path, capsys, monkeypatch):
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):  # setup sets them: restored after the test
        monkeypatch.setenv(name, "1")
    root = logging.getLogger()
    before = list(root.handlers)
    console_handler = logging.StreamHandler()
    root.addHandler(console_handler)
    try:
        path = console.setup("data", verbose=False, log_dir=str(tmp_path))
        console.adopt_ray_loggers()  # what cluster.connect does once Ray is up
        logging.getLogger("llm_platform.data").info("ours")
        logging.getLogger("ray.data").info("ray data chatter")
        logging.getLogger("some.library").warning("a library warning")
        logging.getLogger("some.library").error("a library error")
        shown = capsys.readouterr().err
        assert "ours" in shown and "a library error" in shown
        assert "chatter" not in shown and "a library warning" not in shown
        for h in root.handlers:
            h.flush()
        logged = open(path).read()
        assert all(s in logged for s in ("ours", "ray data chatter", "a library warning", "a library error"))
        assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("data-")
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
            logging.getLogger(name).removeHandler(console._State.file_handler)
        console_handler.filters.clear()
        console._State.verbose, console._State.file_handler = True, None
        logging.captureWarnings(False)


def test_a_choice_outside_its_set_fails_at_compose_time_naming_key_and_values():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose("run", ["train.parallelism.strategy=fdsp"])
    text = f"{err.value} {err.value.__cause__}"
    assert "train.parallelism.strategy" in text and "fsdp, ddp, none" in text
    cfg = compose("run", ["train.parallelism.strategy=ddp", "tune.scheduler=pbt"])
    # Members behave as their strings everywhere the code and the records use them.
    strategy = cfg.train.parallelism.strategy
    assert strategy == "ddp" and f"{strategy}" == "ddp" and {"ddp": 1}[strategy]
    assert json.loads(json.dumps(dataclasses.asdict(cfg.train)))["parallelism"]["strategy"] == "ddp"


def test_every_choice_member_is_named_by_its_value():
    """Hashing and dict lookups by the plain string rely on it (Enum hashes a member by its name)."""
    import enum

    from llm_platform.config import choices

    for cls in vars(choices).values():
        if isinstance(cls, type) and issubclass(cls, choices.Choice) and cls is not choices.Choice:
            for member in cls:
                assert member.name == member.value and hash(member) == hash(member.value), member
    assert issubclass(choices.Choice, enum.Enum)


def test_run_refuses_a_bad_train_key_before_the_data_stage_writes_anything(tmp_path):
    """`llm-platform run` checks every selected stage first: no Ray started, nothing written."""
    import subprocess
    import sys

    import llm_platform

    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_PLATFORM")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(llm_platform.__file__))  # the package under test
    done = subprocess.run([sys.executable, "-m", "llm_platform", "run", "debug=smoke", "train.max_steps=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "train.max_steps=0 must be at least 1" in done.stdout + done.stderr
    assert not (tmp_path / ".llm-platform" / "storage").exists()
    assert "starting a local Ray" not in done.stdout + done.stderr
