"""DPO end to end on the local Ray: preference pairs through the data stage, `train.objective=dpo` on 2 FSDP workers
with a frozen reference, resume, and the eval stage's preference accuracy; DPO-LoRA with the base as reference.

The loss and gradients themselves are checked against the papers' formulas in tests/unit/test_train_preference.py;
here: step 1 is exactly log 2 with a zero reward margin (policy == reference before the first update), the pairs are
learned (loss below log 2, chosen rewarded above rejected, on held-out pairs too), a run stopped mid-way and resumed
sees the same losses as one that was not (the reference is rebuilt from the starting weights, not the checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from fixtures.checkpoints import llama3_checkpoint
from fixtures.preferences import write_pairs

from llm_platform import storage
from llm_platform.config import compose
from llm_platform.config.train import BudgetConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def overrides(base, pairs_path, root, extra=()) -> list[str]:
    return [f"model.pretrained={base}", f"data.sources=[{pairs_path}]", f"storage.root={root}", "data.seq_len=48",
            "data.val_fraction=0.15", "train.micro_batch_size=4", "train.max_steps=6", "train.log_interval_steps=1",
            "train.eval_interval_steps=6", "train.eval_batches=2", "train.checkpoint.interval_steps=3",
            "train.shuffle_buffer_rows=0", "train.max_failures=0", "train.optimizer.warmup_steps=0",
            "train.optimizer.lr=3e-4", "train.preference.beta=0.5", "scaling.num_workers=2", *extra]


def logged(run_uri: str, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in storage.read_text(storage.join(run_uri, "metrics.jsonl")).splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo")
    base = llama3_checkpoint(folder / "llama3")
    pairs_path = folder / "pairs.jsonl"
    bad = write_pairs(pairs_path, n=120)
    return base, pairs_path, bad


def test_dpo_learns_the_pairs_resumes_exactly_and_eval_reports_preference_accuracy(ray_session, setup, tmp_path):
    from llm_platform.data.pipeline import build_dataset
    from llm_platform.evaluate.run import run_eval
    from llm_platform.train.launcher import BudgetReached, launch

    base, pairs_path, bad = setup
    root = str(tmp_path / "store")
    cfg = compose("train", ["experiment=dpo", *overrides(base, pairs_path, root)])
    data = build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    manifest = data.manifest
    assert manifest["kind"] == "preference"
    assert {r: manifest["counts"]["dropped"].get(r) for r in bad} == {r: 1 for r in bad}
    assert {(s["reason"].split(":")[0], s["line"]) for s in manifest["skipped"]} == {(r, n) for r, n in bad.items()}
    splits = manifest["splits"]
    assert splits["train"]["num_records"] + splits["val"]["num_records"] + manifest["counts"]["exact_duplicates"] == 120

    result = launch(cfg.model, cfg.train, cfg.scaling, data.uri, root, run_name="dpo")
    loss, margin = logged(result.run_uri, "train/loss"), logged(result.run_uri, "train/rewards/margin")
    assert loss[1] == pytest.approx(math.log(2), abs=1e-6) and margin[1] == pytest.approx(0.0, abs=1e-6)
    assert loss[6] < loss[1] - 0.05, loss
    assert logged(result.run_uri, "train/rewards/accuracy")[6] > 0.5
    val = logged(result.run_uri, "val/rewards/accuracy")
    assert list(val) == [6] and val[6] > 0.5
    assert result.lineage["base_model"] == str(base)

    # Stopped at step 1 (a spent budget, 2 workers agreeing), then resumed: the same losses as the run above.
    capped = dataclasses.replace(cfg.train, budget=BudgetConfig(max_cost_usd=1e-9))
    with pytest.raises(BudgetReached):
        launch(cfg.model, capped, cfg.scaling, data.uri, root, run_name="dpo-resumed")
    resumed = launch(cfg.model, cfg.train, cfg.scaling, data.uri, root, run_name="dpo-resumed")
    again = logged(resumed.run_uri, "train/loss")
    assert list(again) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([again[s] for s in again], [loss[s] for s in again], rtol=0, atol=2e-5)

    # The eval stage: preference accuracy on the held-out pairs, against the base model.
    ev = compose("eval", [f"eval.model={result.export_uri}", f"storage.root={root}", "eval.bias.enabled=false",
                          "eval.use_ray=false", f"eval.output_uri={tmp_path / 'eval'}"])
    report = run_eval(ev.eval, root)
    assert report.metrics["preference/pairs"] == splits["val"]["num_records"]
    assert report.metrics["preference/accuracy"] > 0.5 and report.metrics["preference/margin"] > 0
    assert 0 <= report.metrics["preference/logp_accuracy"] <= 1
    assert "val/perplexity" not in report.metrics and "preference accuracy" in report.skipped["perplexity"]


def test_dpo_lora_uses_the_base_without_adapters_as_reference(ray_session, setup, tmp_path):
    from llm_platform.data.pipeline import build_dataset
    from llm_platform.train.launcher import launch

    base, pairs_path, _ = setup
    root = str(tmp_path / "store")
    cfg = compose("train", ["experiment=dpo-lora", *overrides(base, pairs_path, root, (
        "scaling.num_workers=1", "train.parallelism.strategy=none", "train.optimizer.lr=2e-2", "model.lora.rank=8"))])
    data = build_dataset(cfg.data, cfg.tokenizer, root, progress=False)
    result = launch(cfg.model, cfg.train, cfg.scaling, data.uri, root, run_name="dpo-lora")
    loss = logged(result.run_uri, "train/loss")
    # LoRA's B matrices start at zero: the adapted policy is the base at step 1, so the loss is exactly log 2.
    assert loss[1] == pytest.approx(math.log(2), abs=1e-6)
    assert loss[6] < loss[1] - 0.05, loss
    assert storage.exists(storage.join(result.export_uri, "model.safetensors"))  # merged on export
