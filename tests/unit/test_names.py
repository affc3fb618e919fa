"""One name pattern for everything that becomes a folder in storage (`data.name`, `train.run_name`, registry model
names): bad names fail early, naming the field, and none can climb out of its folder."""

from __future__ import annotations

import pytest
from fixtures.training import make_dataset

from llm_platform.config.data import DataConfig
from llm_platform.config.model import ModelConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.errors import ConfigError
from llm_platform.storage import names

BAD = ["", "..", "../evil", "a/b", "a\\b", ".hidden", "-flag", "a..b", "x" * 129, "sp ace", "new\nline", "ü", None]
GOOD = ["a", "debug", "gpt2-124m", "run_2024.01", "A" * 128, "tiny-clm-0a1b2c3d"]


def test_the_pattern():
    assert [n for n in GOOD if not names.is_valid(n)] == []
    assert [n for n in BAD if names.is_valid(n)] == []
    with pytest.raises(ConfigError, match=r"data.name='\.\./evil': not a valid name \(1-128 letters"):
        names.check("../evil", "data.name")


def test_data_name_is_checked_where_it_becomes_a_folder(tmp_path):
    from llm_platform.data import pipeline

    for bad in ("../../runs/x", "a/b"):
        cfg = DataConfig(name=bad)
        with pytest.raises(ConfigError, match="data.name="):
            pipeline.validate(cfg, TokenizerConfig())
        with pytest.raises(ConfigError, match="data.name="):
            pipeline.resolve_dataset(cfg, TokenizerConfig(), str(tmp_path))


def test_run_name_is_checked_before_any_worker_starts(tmp_path, monkeypatch):
    import ray.train.torch

    from llm_platform.train.launcher import launch

    def no_trainer(*args, **kwargs):
        raise AssertionError("a TorchTrainer was built for a run with a bad name")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)  # launch imports it when it gets that far

    dataset = make_dataset(str(tmp_path / "store"), "pretrain", seq_len=32)
    model = ModelConfig(name="tiny", family="gpt2", num_layers=1, num_heads=2, hidden_size=16,
                        max_position_embeddings=64)
    for kwargs in ({"run_name": "../../registry/debug/v0001"}, {"run_name": "a/b"}):
        with pytest.raises(ConfigError, match="train.run_name="):
            launch(model, TrainConfig(), ScalingConfig(num_workers=1), dataset, str(tmp_path / "store"), **kwargs)
    with pytest.raises(ConfigError, match=r"train.run_name='\.\./x'"):
        launch(model, TrainConfig(run_name="../x"), ScalingConfig(num_workers=1), dataset, str(tmp_path / "store"))


def test_sweep_and_eval_names_are_checked_where_they_become_folders(tmp_path):
    from llm_platform.config.evaluate import EvalConfig
    from llm_platform.config.model import ModelConfig
    from llm_platform.config.train import ScalingConfig, TrainConfig
    from llm_platform.config.tune import TuneConfig
    from llm_platform.evaluate.run import run_eval
    from llm_platform.tune.driver import run_sweep

    with pytest.raises(ConfigError, match=r"tune\.name='\.\./x'"):
        run_sweep(TuneConfig(name="../x"), ModelConfig(), TrainConfig(), ScalingConfig(), str(tmp_path), str(tmp_path))
    with pytest.raises(ConfigError, match=r"eval\.name='a/b'"):
        run_eval(EvalConfig(model=str(tmp_path / "nowhere"), name="a/b"), str(tmp_path))
