"""Bias pair parsing and statistics, and the human-evaluation export/import round trip (no model, no Ray)."""

import csv
import json

import numpy as np
import pytest

from llm_platform.errors import DataError
from llm_platform.evaluate import bias, human


def test_builtin_pairs_differ_in_exactly_one_word():
    pairs = bias.builtin_pairs()
    assert len(pairs) >= 20
    assert {p.bias_type for p in pairs} >= {"gender", "age"}
    for p in pairs:
        a, b = p.stereo.split(), p.anti.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, (p.stereo, p.anti)


def test_crows_pairs_format_and_orientation():
    text = ("sent_more,sent_less,stereo_antistereo,bias_type\n"
            "A x.,A y.,stereo,g1\n"
            "B x.,B y.,antistereo,g2\n")
    pairs = bias.parse_pairs(text, "user.csv")
    assert (pairs[0].stereo, pairs[0].anti) == ("A x.", "A y.")
    assert (pairs[1].stereo, pairs[1].anti) == ("B y.", "B x.")  # antistereo: sent_less is the stereotype


@pytest.mark.parametrize("text,match", [
    ("sent_more,sent_less,bias_type\na,b,c\n", r"user.csv: missing column\(s\) stereo_antistereo"),
    ("sent_more,sent_less,stereo_antistereo,bias_type\na,b,stereo,g\na,b,maybe,g\n", r"user.csv:3: stereo_anti"),
    ("sent_more,sent_less,stereo_antistereo,bias_type\na,,stereo,g\n", r"user.csv:2: empty sent_more"),
    ("sent_more,sent_less,stereo_antistereo,bias_type\n", r"user.csv: no pairs"),
])
def test_bad_pairs_name_file_and_line(text, match):
    with pytest.raises(DataError, match=match):
        bias.parse_pairs(text, "user.csv")


def test_missing_pairs_file_names_the_key(tmp_path):
    with pytest.raises(DataError, match="eval.bias.pairs_uri"):
        bias.load_pairs(str(tmp_path / "x.csv"))


def test_summary_known_values_and_ci():
    gaps = np.array([1.0, 2.0, 3.0, -1.0, 0.5, 0.5])
    groups = ["a", "a", "a", "b", "b", "b"]
    s = bias.summarize(gaps, groups, samples=2000, confidence=0.9, seed=3)
    assert s["overall"]["mean_gap_nats"] == pytest.approx(1.0)
    assert s["groups"]["a"]["mean_gap_nats"] == pytest.approx(2.0)
    assert s["groups"]["b"]["stereo_preference_pct"] == pytest.approx(200 / 3)
    assert s["groups"]["a"]["ci_low"] >= 1.0 and s["groups"]["a"]["ci_high"] <= 3.0
    assert s["overall"]["ci_low"] < 1.0 < s["overall"]["ci_high"]
    assert bias.summarize(gaps, groups, 2000, 0.9, 3) == s  # seeded bootstrap


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small = bias.bootstrap_ci(rng.normal(size=10), 1000, 0.95, 0)
    large = bias.bootstrap_ci(rng.normal(size=1000), 1000, 0.95, 0)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3


def test_wilson_known_value():
    low, high = human.wilson(5, 10, 0.95)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)


def _export_pair(tmp_path, n=8):
    prompts = [f"prompt {i}" for i in range(12)]
    systems = {"A": [f"good answer {i}" for i in range(12)], "B": [f"bad answer {i}" for i in range(12)]}
    folder = tmp_path / "export"
    human.export_samples(prompts, systems, n, seed=1, folder=str(folder))
    return folder


def test_export_is_blinded_shuffled_and_complete(tmp_path):
    folder = _export_pair(tmp_path)
    rows = list(csv.DictReader(open(folder / "samples.csv")))
    assert len(rows) == 8 and set(rows[0]) == {"sample_id", "prompt", "output_1", "output_2"}
    assert "good answer" not in rows[0]["sample_id"] and "A" not in open(folder / "samples.csv").read().split("\n")[0]
    key = json.load(open(folder / "key.json"))
    firsts = [key["samples"][r["sample_id"]][0] for r in rows]
    assert set(firsts) == {"A", "B"}  # positions are shuffled per sample
    for r in rows:  # the key decodes each output to its system
        order = key["samples"][r["sample_id"]]
        assert r[f"output_{order.index('A') + 1}"].startswith("good")
    assert len(open(folder / "samples.jsonl").read().splitlines()) == 8
    page = open(folder / "rating_sheet.html").read()
    assert page.count('type="radio"') == 8 * 3 and "ratings.csv" in page


def test_ratings_round_trip_to_win_rates(tmp_path):
    folder = _export_pair(tmp_path)
    key = json.load(open(folder / "key.json"))
    rows = list(csv.DictReader(open(folder / "samples.csv")))
    with open(tmp_path / "ratings.csv", "w") as f:
        f.write("sample_id,preference\n")
        for i, r in enumerate(rows):
            pos_a = key["samples"][r["sample_id"]].index("A") + 1
            # The rater prefers A six times, calls one a tie and prefers B once.
            f.write(f"{r['sample_id']},{'tie' if i == 6 else (3 - pos_a if i == 7 else pos_a)}\n")
    out = human.import_ratings(str(tmp_path / "ratings.csv"), str(folder / "key.json"))
    m = out["metrics"]
    assert m["A_win_rate"] == pytest.approx(6.5 / 8) and m["B_win_rate"] == pytest.approx(1.5 / 8)
    assert m["tie_rate"] == pytest.approx(1 / 8)
    assert m["A_win_rate_ci_low"] < m["A_win_rate"] < m["A_win_rate_ci_high"]


def test_single_system_scores(tmp_path):
    human.export_samples(["p1", "p2", "p3"], {"A": ["o1", "o2", "o3"]}, 3, 0, str(tmp_path / "e"))
    ids = [r["sample_id"] for r in csv.DictReader(open(tmp_path / "e" / "samples.csv"))]
    (tmp_path / "r.csv").write_text("sample_id,score\n" + "".join(f"{s},{v}\n" for s, v in zip(ids, [3, 4, 5])))
    m = human.import_ratings(str(tmp_path / "r.csv"), str(tmp_path / "e" / "key.json"))["metrics"]
    assert m["mean_score"] == pytest.approx(4.0) and m["mean_score_ci_low"] < 4.0 < m["mean_score_ci_high"]


def test_bad_ratings_name_file_and_line(tmp_path):
    folder = _export_pair(tmp_path)
    sid = next(csv.DictReader(open(folder / "samples.csv")))["sample_id"]
    (tmp_path / "r.csv").write_text(f"sample_id,preference\n{sid},1\nnope,1\n")
    with pytest.raises(DataError, match=r"r.csv:3: unknown sample_id 'nope'"):
        human.import_ratings(str(tmp_path / "r.csv"), str(folder / "key.json"))
    (tmp_path / "r.csv").write_text(f"sample_id,preference\n{sid},3\n")
    with pytest.raises(DataError, match=r"r.csv:2: preference must be 1, 2 or tie"):
        human.import_ratings(str(tmp_path / "r.csv"), str(folder / "key.json"))
