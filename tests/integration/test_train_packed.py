"""Packed supervised data end to end: the data stage packs sft and chat records (`data.pack_supervised`, the
default), Ray Train runs a few sft steps on the packed rows, and the eval stage's perplexity of the export over the
rows the run validated on equals the run's own validation loss (both score each example as if alone)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from fixtures.training import read_rows, sentences

from llm_platform.config import compose
from llm_platform.config.model import ModelConfig
from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ScalingConfig, TrainConfig
from llm_platform.data import pipeline

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _records(kind: str, n: int) -> list[dict]:
    texts = sentences(2 * n, seed=11)
    pairs = [(texts[2 * i], texts[2 * i + 1] + f" {i}") for i in range(n)]
    if kind == "sft":
        return [{"prompt": p, "response": r} for p, r in pairs]
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in pairs]


@pytest.mark.parametrize("kind", ["sft", "chat"])
def test_sft_trains_on_packed_rows(ray_session, tmp_path, kind):
    from llm_platform.evaluate import perplexity
    from llm_platform.evaluate.scoring import load
    from llm_platform.train.launcher import launch

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _records(kind, 160)))
    cfg = compose("data", ["debug=smoke", f"data={kind}", "data.seq_len=128", "data.val_fraction=0.2",
                           "data.num_shards=1"])
    data = pipeline.build_dataset(dataclasses.replace(cfg.data, sources=[str(corpus)]), cfg.tokenizer,
                                  str(tmp_path), progress=False, executor=pipeline.in_process)
    packing = data.manifest["splits"]["train"]["packing"]
    assert packing["examples_per_row"] > 2 and packing["fill_rate"] > 0.7

    tc = TrainConfig(objective="sft", max_steps=4, micro_batch_size=4, log_interval_steps=1, eval_interval_steps=4,
                     eval_batches=1, shuffle_buffer_rows=0, max_failures=0,
                     checkpoint=CheckpointConfig(interval_steps=4), optimizer=OptimizerConfig(warmup_steps=1, lr=3e-3))
    model = ModelConfig(name=f"packed-{kind}", family="llama", hidden_size=32, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    result = launch(model, tc, ScalingConfig(num_workers=1), data.uri, str(tmp_path), run_name=f"packed-{kind}")
    assert result.metrics["step"] == 4 and math.isfinite(result.metrics["val/loss"])

    # The run validated on the first micro-batch of val rows; the eval stage scores them the same way.
    rows = {k: list(v[:tc.micro_batch_size]) for k, v in read_rows(data.uri, "val").items()}
    assert "position_ids" in rows
    scored = perplexity.direct_perplexity(load(result.export_uri).model, rows, batch_size=2)
    assert scored["val/loss"] == pytest.approx(result.metrics["val/loss"], abs=1e-4)
