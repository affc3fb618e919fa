"""Bad training configs fail before any worker starts, with the key, file or field named."""

import pytest
from train_fixtures import make_dataset

from llm_platform.config.model import ModelConfig
from llm_platform.config.train import ParallelismConfig, ScalingConfig, TrainConfig
from llm_platform.errors import ConfigError, DataError
from llm_platform.train.launcher import preflight


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("d")), "pretrain", seq_len=32)


def run(dataset, root, model=None, train=None, scaling=None):
    return preflight(model or ModelConfig(), train or TrainConfig(), scaling or ScalingConfig(), dataset, root)


def test_a_good_config_passes(pretrain, tmp_path):
    info, pretrained = run(pretrain, str(tmp_path))
    assert info.kind == "pretrain" and pretrained is None


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest.json is missing"):
        run(str(tmp_path / "nowhere"), str(tmp_path))


def test_sequence_beyond_positions(pretrain, tmp_path):
    with pytest.raises(ConfigError, match=r"data.seq_len=32 is beyond model.max_position_embeddings=16"):
        run(pretrain, str(tmp_path), model=ModelConfig(max_position_embeddings=16))


def test_vocab_mismatch(pretrain, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size=999 does not match"):
        run(pretrain, str(tmp_path), model=ModelConfig(vocab_size=999))


def test_pretrained_model_with_a_smaller_vocab(pretrain, tmp_path):
    import json

    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_positions": 64}))
    with pytest.raises(ConfigError, match="tokenizer and model do not match"):
        run(pretrain, str(tmp_path), model=ModelConfig(pretrained=str(folder)))


def test_objective_must_fit_family_and_dataset(pretrain, tmp_path):
    with pytest.raises(ConfigError, match="train.objective='mlm' does not fit model.family='gpt2'"):
        run(pretrain, str(tmp_path), train=TrainConfig(objective="mlm"))
    with pytest.raises(ConfigError, match="needs a 'sft' or 'chat' dataset"):
        run(pretrain, str(tmp_path), train=TrainConfig(objective="sft"))


def test_more_rows_per_step_than_the_split(pretrain, tmp_path):
    with pytest.raises(ConfigError, match="train.micro_batch_size \\* scaling.num_workers"):
        run(pretrain, str(tmp_path), train=TrainConfig(micro_batch_size=100_000))


def test_single_worker_mode_with_many_workers(pretrain, tmp_path):
    with pytest.raises(ConfigError, match="train.parallelism.strategy=none needs scaling.num_workers=1"):
        run(pretrain, str(tmp_path), train=TrainConfig(parallelism=ParallelismConfig(strategy="none")),
            scaling=ScalingConfig(num_workers=2))
