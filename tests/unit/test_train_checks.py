"""Bad training configs fail before any worker starts, with the key, file or field named; what only a worker can
see (its C++ compiler, its process group) fails in its setup, naming the key too."""

import pytest
from fixtures.training import make_dataset

from llm_platform.config.model import ModelConfig
from llm_platform.config.train import ParallelismConfig, ScalingConfig, TrainConfig
from llm_platform.errors import ConfigError, DataError
from llm_platform.train.checks import preflight


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


def test_compile_on_cpu_without_a_cpp_compiler_names_the_key(monkeypatch):
    import torch

    from llm_platform.models.build import build_model
    from llm_platform.train.parallelize import parallelize

    model = build_model(ModelConfig(num_layers=1, hidden_size=32), 64, {"eos": 0, "pad": 1, "mask": 2})
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ConfigError, match=r"train.parallelism.compile=true on CPU workers needs a C\+\+ compiler"):
        parallelize(model, parallelism="none", device=torch.device("cpu"), compute_dtype=torch.float32, compile=True)


def test_cpu_offload_on_gpus_needs_a_cpu_backend_in_the_process_group():
    """NCCL alone cannot all-reduce the offloaded gradients' norm; the check runs before any step (simulated here
    on CPU: a group whose only backend serves `cuda` device tensors)."""
    import socket

    import torch
    import torch.distributed as dist

    from llm_platform.train.parallelize import check_offload_backend, process_group_backend

    assert process_group_backend(cpu_offload=True, use_gpu=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(cpu_offload=False, use_gpu=True) is None  # Ray Train's default
    assert process_group_backend(cpu_offload=True, use_gpu=False) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match=r"train.parallelism.cpu_offload=true on GPU workers needs a process "
                                              r"group with a CPU backend \(cpu:gloo,cuda:nccl\); this one is "
                                              r"'cuda:gloo'"):
            check_offload_backend(torch.device("cuda", 0))
        check_offload_backend(torch.device("cpu"))  # CPU workers: gloo is the group
    finally:
        dist.destroy_process_group()
