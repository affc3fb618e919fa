"""One short Ray Train run per objective on a tiny model; each HF export reloads with `from_pretrained` and gives
the run's own final validation loss. SFT is a LoRA fine-tune of a model exported in the platform's format."""

from __future__ import annotations

import os

import pytest
import torch
from fixtures.training import make_dataset, read_rows

from llm_platform.config.model import LoraConfig, ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ScalingConfig, TrainConfig
from llm_platform.data.dataset import open_dataset
from llm_platform.models.build import build_model, model_class
from llm_platform.train.objectives import count_targets, loss_sum, prepare_batch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def short_run(objective: str) -> TrainConfig:
    return TrainConfig(objective=objective, max_steps=3, micro_batch_size=4, log_interval_steps=1,
                       eval_interval_steps=3, eval_batches=1, shuffle_buffer_rows=0, max_failures=0,
                       checkpoint=CheckpointConfig(interval_steps=3),
                       optimizer=OptimizerConfig(warmup_steps=1, lr=3e-3))


def export_val_loss(export_uri: str, family: str, dataset_uri: str, tc: TrainConfig) -> float:
    """The exported model's loss on the rows the run validated on (one worker: the first micro-batch)."""
    info = open_dataset(dataset_uri)
    special = {n: info.special_token_id(n) for n in ("eos", "pad", "mask")}
    model = model_class(family).from_pretrained(export_uri, use_safetensors=True).eval()
    rows = {k: v[:tc.micro_batch_size] for k, v in read_rows(dataset_uri, "val").items()}
    inputs, targets = prepare_batch(tc.objective, rows, special=special, vocab_size=info.vocab_size,
                                    mlm_probability=tc.mlm_probability,
                                    generator=torch.Generator().manual_seed(tc.seed))
    with torch.no_grad():
        logits = model(**inputs).logits
    return (loss_sum(logits, targets) / count_targets(targets)).item()


@pytest.mark.parametrize("family,objective,kind", [("t5", "seq2seq", "seq2seq"), ("bert", "mlm", "pretrain")])
def test_objective_trains_and_exports(ray_session, tmp_path, family, objective, kind):
    from llm_platform.train.launcher import launch

    root = str(tmp_path)
    dataset = make_dataset(root, kind, seq_len=32, target_len=16)
    tc = short_run(objective)
    model = ModelConfig(name=f"{family}-tiny", family=family, hidden_size=32, num_heads=4, max_position_embeddings=64)
    result = launch(model, tc, ScalingConfig(num_workers=1), dataset, root, run_name=f"{family}-{objective}")
    assert result.metrics["step"] == 3 and result.metrics["val/loss"] > 0
    assert abs(export_val_loss(result.export_uri, family, dataset, tc) - result.metrics["val/loss"]) < 1e-4


def test_lora_sft_from_an_exported_model(ray_session, tmp_path):
    from safetensors.torch import load_file

    from llm_platform.train.checkpoint import export_hf
    from llm_platform.train.launcher import launch

    root = str(tmp_path)
    dataset = make_dataset(root, "sft", seq_len=48)
    info = open_dataset(dataset)
    special = {n: info.special_token_id(n) for n in ("eos", "pad", "mask")}
    base_cfg = ModelConfig(name="base", family="gpt2", hidden_size=32, num_heads=4, max_position_embeddings=64)
    base_uri = os.path.join(root, "base-export")
    export_hf(build_model(base_cfg, info.vocab_size, special, seed=5), info.load_tokenizer(), base_uri, {"kind": "run"})

    tc = short_run("sft")
    lora = ModelConfig(name="lora", family="gpt2", pretrained=base_uri, max_position_embeddings=64,
                       lora=LoraConfig(enabled=True, rank=4, alpha=8, target_modules=["c_attn"]))
    result = launch(lora, tc, ScalingConfig(num_workers=1), dataset, root, run_name="lora-sft")
    assert result.lineage["base_model"] == base_uri

    base = load_file(os.path.join(base_uri, "model.safetensors"))
    tuned = load_file(os.path.join(result.export_uri, "model.safetensors"))
    assert not any("lora" in k for k in tuned)  # adapters merged into plain weights
    attn = [k for k in base if k.endswith("attn.c_attn.weight")]
    assert attn and all(not torch.equal(base[k], tuned[k]) for k in attn)
    untouched = [k for k in base if "mlp" in k]
    assert untouched and all(torch.equal(base[k], tuned[k]) for k in untouched)
    assert abs(export_val_loss(result.export_uri, "gpt2", dataset, tc) - result.metrics["val/loss"]) < 1e-4
