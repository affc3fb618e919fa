"""Drift math without Ray: JS divergence, PSI, the rolling monitor and its alert, references from manifests."""

from __future__ import annotations

import numpy as np
import pytest
from serve_fixtures import build_tiny_model, sample_texts

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
