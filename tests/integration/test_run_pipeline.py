"""`llm-platform run` on the embedded default: every stage, a sample query, then a second run that skips them all."""

import pytest

from llm_platform import registry, storage
from llm_platform.config import compose
from llm_platform.runner import STATUS, run_all

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_run_end_to_end_then_everything_is_skipped(ray_session, tmp_path):
    from ray import serve

    from conftest import free_port

    root = str(tmp_path / "store")
    overrides = ["debug=smoke", f"storage.root={root}", f"serve.port={free_port()}", "run.keep_serving=false",
                 "eval.bias.bootstrap_samples=100", "scaling.num_workers=1", "train.max_steps=10"]
    try:
        first = run_all(compose("run", overrides))
        assert [s["result"] for s in first.stages.values()] == ["ran"] * 5, first.stages
        assert first.sample and first.sample["completion"]  # the endpoint answered through the OpenAI API
        chain = first.chain
        assert chain["model_version"] == "debug/v0001" and registry.latest(root, "debug").version == "v0001"
        for key in ("dataset", "run", "eval_report", "endpoint", "tokenizer_sha256"):
            assert chain[key], key
        assert storage.exists(storage.join(chain["eval_report"], "metrics.json"))
        record = storage.read_json(storage.join(root, STATUS))
        assert record["chain"] == chain

        second = run_all(compose("run", overrides + ["run.until_stage=eval"]))
        assert {k: v["result"] for k, v in second.stages.items()} == {
            "data": "skipped", "train": "skipped", "register": "skipped", "eval": "skipped"}
        assert [v.version for v in registry.list_versions(root, "debug")] == ["v0001"]
    finally:
        serve.shutdown()
