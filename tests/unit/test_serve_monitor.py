"""Drift math without Ray: JS divergence, PSI, the rolling monitor and its alert, references from manifests."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.serving import build_tiny_model, sample_texts

from llm_platform.serve.monitor import DriftMonitor, js_divergence, psi, reference_from_manifest, reference_from_texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_js_and_psi_bounds():
    p = np.array([1.0, 0, 0, 0])
    assert js_divergence(p, p) == pytest.approx(0.0)
    assert js_divergence(p, np.array([0, 1.0, 0, 0])) == pytest.approx(1.0)
    assert psi([10, 10, 10], [10, 10, 10]) == pytest.approx(0.0, abs=1e-9)
    assert psi([10, 10, 10], [1, 1, 28]) > 0.25


def feed(monitor, tok, texts):
    for t in texts:
        monitor.observe_prompt(tok(t).input_ids, [-1.0])


def test_drift_low_in_distribution_high_when_shifted(tok, caplog):
    ref = reference_from_texts(tok, sample_texts(500, seed=1))
    same = DriftMonitor(ref, window_prompts=100, min_prompts=20, js_threshold=0.3)
    feed(same, tok, sample_texts(100, seed=2))
    shifted = DriftMonitor(ref, window_prompts=100, min_prompts=20, js_threshold=0.3)
    caplog.set_level("WARNING")
    feed(shifted, tok, ["ZQX 1234 !!! @@ ### ünïcode café 日本語 " * 4 for _ in range(100)])
    low, high = same.report(), shifted.report()
    assert low["js_divergence"] < 0.15 and low["psi_prompt_length"] < 0.25 and not low["alert"]
    assert high["js_divergence"] > 0.3 and high["psi_prompt_length"] > low["psi_prompt_length"]
    assert high["alert"] and shifted.alerts == 1 and "DRIFT ALERT" in caplog.text
    assert low["mean_prompt_perplexity"] == pytest.approx(np.e)


def test_no_numbers_before_min_prompts(tok):
    m = DriftMonitor(reference_from_texts(tok, sample_texts(50)), min_prompts=20)
    feed(m, tok, sample_texts(5))
    assert m.report()["js_divergence"] is None and m.report()["window_prompts"] == 5


def test_reference_from_manifest():
    manifest = {"stats": {"token_frequencies": [0.5, 0.5, 0.0], "doc_length_tokens": {"edges": [0, 4, 8],
                                                                                    "counts": [3, 1]}}}
    ref = reference_from_manifest(manifest)
    assert ref.token_frequencies.tolist() == [0.5, 0.5, 0.0] and ref.length_counts == [3, 1]
    with pytest.raises(KeyError, match="token_frequencies"):
        reference_from_manifest({"stats": {}}, "s3://b/manifest.json")


def test_engine_reports_its_cache_use_and_one_gap_per_token_after_the_first(tmp_path, monkeypatch):
    """The engine's loop driven step by step (no thread): the cache holds what the scheduler admitted, shrinks as
    sequences finish and is empty at the end; every token but a sequence's first follows one recorded gap."""
    import asyncio

    from llm_platform.serve.engine import Engine, load_model
    from llm_platform.serve.sampling import SamplingParams
    from llm_platform.serve.scheduler import BatchShape

    model, tokenizer = load_model(build_tiny_model(tmp_path / "tiny"))
    engine = Engine(model, tokenizer, max_batch_size=8, max_batch_tokens=400)
    monkeypatch.setattr(engine, "healthy", lambda: True)  # no generation thread: this test runs the iterations
    prompts = [tokenizer("the cat sat on a mat").input_ids, tokenizer("a dog").input_ids]
    asks = [(prompts[0], 5, 1), (prompts[1], 12, 2)]  # (prompt, max_tokens, n)

    async def drive() -> list[float]:
        for ids, max_tokens, n in asks:
            engine.submit(ids, SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0, seed=1, ignore_eos=True))
        fractions = []
        while engine._iteration():  # admit and prefill, then decode until every sequence is done
            fractions.append(engine.kv_cache_used_fraction())
        return fractions

    fractions = asyncio.run(drive())
    admitted = BatchShape.of_request(len(prompts[0]), 5, 1).join(BatchShape.of_request(len(prompts[1]), 12, 2))
    assert fractions[0] == admitted.slots / 400
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] == 0 and engine.kv_slots_allocated == 0
    assert len(engine.token_gaps) == sum(n * (max_tokens - 1) for _, max_tokens, n in asks)
    assert all(gap >= 0 for gap in engine.token_gaps)


def test_replica_cost_rate_is_its_gpus_or_vcpus_at_the_table_price():
    from llm_platform.config.prices import Market, PricesConfig
    from llm_platform.errors import ConfigError
    from llm_platform.serve.monitor import replica_usd_per_hour

    prices = PricesConfig()
    # The table's H100 price is a p5.48xlarge's eighth; half a GPU costs half of it, its CPUs nothing more.
    h100 = prices.instances["p5.48xlarge"].on_demand_usd_per_hour / 8
    assert replica_usd_per_hour(prices, num_gpus=0.5, num_cpus=4, gpu_type="NVIDIA H100 80GB HBM3") == \
        pytest.approx(0.5 * h100)
    assert replica_usd_per_hour(prices, num_gpus=0, num_cpus=2, gpu_type=None) == \
        pytest.approx(2 * prices.cpu.on_demand_usd_per_hour)
    prices.market = Market.spot
    assert replica_usd_per_hour(prices, num_gpus=0, num_cpus=2, gpu_type=None) == \
        pytest.approx(2 * prices.cpu.spot_usd_per_hour)
    with pytest.raises(ConfigError, match="num_gpus_per_replica"):
        replica_usd_per_hour(prices, num_gpus=1, num_cpus=1, gpu_type=None)
    with pytest.raises(ConfigError, match=r"serve\.prices\.gpus"):
        replica_usd_per_hour(prices, num_gpus=1, num_cpus=1, gpu_type="TPU-v9")


def test_deploy_log_line_prices_the_replicas():
    from llm_platform.config.serve import ServeConfig
    from llm_platform.serve.app import cost_summary

    cfg = ServeConfig()
    cfg.deployment.num_replicas, cfg.deployment.num_cpus_per_replica = 2, 1.0
    per = cfg.prices.cpu.on_demand_usd_per_hour
    assert cost_summary(cfg, None).startswith(f"endpoint: 2 replicas, about ${2 * per:.4g}/hour (on_demand prices")
    cfg.deployment.num_gpus_per_replica = 1.0
    cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas = 1, 3
    gpu = cfg.prices.gpus["L4"].on_demand_usd_per_hour
    assert f"1-3 replicas (autoscaling), about ${gpu:.4g}-${3 * gpu:.4g}/hour" in cost_summary(cfg, "L4")
    assert "cost unknown" in cost_summary(cfg, None)
