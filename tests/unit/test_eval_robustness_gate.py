"""Perturbations are deterministic for a seed and change only what they say; the gate fails on a planted regression."""

import re

import pytest

from llm_platform.errors import ConfigError
from llm_platform.evaluate import gate, robustness

PROMPTS = [f"The quick brown fox number {i} jumps over the lazy dog, then sleeps." for i in range(20)]


@pytest.mark.parametrize("kind", sorted(robustness.PERTURBATIONS))
def test_perturbations_are_deterministic_for_a_seed(kind):
    a = robustness.perturb(PROMPTS, kind, seed=7, rate=0.3)
    b = robustness.perturb(PROMPTS, kind, seed=7, rate=0.3)
    c = robustness.perturb(PROMPTS, kind, seed=8, rate=0.3)
    assert a == b
    assert a != c
    assert a != PROMPTS


def test_casing_changes_only_case():
    out = robustness.perturb(PROMPTS, "casing", 0, 0.5)
    assert [o.lower() for o in out] == [p.lower() for p in PROMPTS]


def test_whitespace_changes_only_whitespace():
    out = robustness.perturb(PROMPTS, "whitespace", 0, 0.5)
    assert [o.split() for o in out] == [p.split() for p in PROMPTS]
    assert all(o != p for o, p in zip(out, PROMPTS))


def test_punctuation_keeps_the_words():
    out = robustness.perturb(PROMPTS, "punctuation", 0, 0.5)
    strip = lambda s: re.sub(r"[.,;:!?]", "", s).split()  # noqa: E731
    assert [strip(o) for o in out] == [strip(p) for p in PROMPTS]


def test_typos_keep_word_count_and_change_letters():
    out = robustness.perturb(PROMPTS, "typos", 0, 0.5)
    assert [len(o.split(" ")) for o in out] == [len(p.split(" ")) for p in PROMPTS]
    assert sum(o != p for o, p in zip(out, PROMPTS)) >= 15


def test_unknown_perturbation_names_the_key():
    with pytest.raises(ConfigError, match="eval.robustness.perturbations"):
        robustness.perturb(PROMPTS, "emoji", 0, 0.1)


def test_robustness_scoring_reports_deltas():
    # A "model" that echoes the prompt: typos lower exact match by exactly the share of prompts they changed,
    # while casing (undone by the exact-match normalization) changes nothing.
    from llm_platform.evaluate.generation import score

    refs = [[p] for p in PROMPTS]
    clean = score(PROMPTS, refs)
    perturbed = robustness.perturb_all(PROMPTS, ["typos", "casing"], 0, 0.05)
    echoed = robustness.flatten(perturbed)
    metrics, details = robustness.score_robustness(perturbed, echoed, refs, clean, score)
    changed = sum(o != p for o, p in zip(robustness.perturb(PROMPTS, "typos", 0, 0.05), PROMPTS))
    assert 0 < changed < len(PROMPTS)
    assert metrics["robust/typos/exact_match_delta"] == pytest.approx(-100.0 * changed / len(PROMPTS))
    assert metrics["robust/casing/exact_match_delta"] == 0.0
    assert metrics["robust/typos/rougeL_delta"] < 0
    assert details["typos"]["metrics"]["gen/exact_match"] == pytest.approx(
        100.0 + metrics["robust/typos/exact_match_delta"])


BASE = {"val/perplexity": 20.0, "gen/rougeL": 40.0, "gen/bleu": 10.0, "bias/disparity_nats": 0.5}
GUARDS = ["val/perplexity", "gen/rougeL", "bias/disparity_nats"]


def test_gate_passes_on_improvement_and_small_noise():
    cur = {"val/perplexity": 19.0, "gen/rougeL": 39.5, "gen/bleu": 2.0, "bias/disparity_nats": -0.4}
    result = gate.compare(cur, BASE, GUARDS, max_regression_pct=5.0)
    assert result.passed, result.failures
    rows = {r.metric: r for r in result.rows}
    assert rows["val/perplexity"].regression_pct == pytest.approx(-5.0)
    assert rows["gen/rougeL"].regression_pct == pytest.approx(1.25)
    assert not rows["gen/bleu"].guard  # a big bleu drop is shown but does not fail the gate


def test_gate_fails_on_planted_regression():
    cur = dict(BASE, **{"val/perplexity": 23.0})
    result = gate.compare(cur, BASE, GUARDS, max_regression_pct=5.0)
    assert not result.passed
    assert result.failures == ["val/perplexity: 20 -> 23 (+15.0% worse, limit 5.0%)"]
    table = gate.format_table(result)
    assert "FAIL" in table and "val/perplexity *" in table


def test_gate_higher_is_better_and_disparity_magnitude():
    assert gate.regression_pct("gen/rougeL", 40.0, 30.0) == pytest.approx(25.0)
    assert gate.regression_pct("bias/disparity_nats", 0.5, -1.0) == pytest.approx(100.0)
    assert gate.regression_pct("val/loss", 0.0, 0.1) == float("inf")


def test_gate_fails_when_a_guard_goes_missing():
    cur = {k: v for k, v in BASE.items() if k != "gen/rougeL"}
    result = gate.compare(cur, BASE, GUARDS, 5.0)
    assert not result.passed and "gen/rougeL" in result.failures[0]


def test_missing_baseline_names_the_version_and_path(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.compare_to=v0007: no stored evaluation at .*evals/m/v0007/default"):
        gate.load_baseline(str(tmp_path), "m", "v0007", "default")
