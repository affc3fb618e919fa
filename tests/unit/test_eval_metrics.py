"""Generation metrics against hand-computed values, and the task-file checks that name file and line."""

import math

import pytest

from llm_platform.errors import DataError
from llm_platform.evaluate import generation as g


def test_exact_match_normalizes_case_and_whitespace():
    preds = ["The  Cat ", "dog", "bird"]
    refs = [["the cat"], ["cat", "Dog"], ["fish"]]
    assert g.exact_match(preds, refs) == pytest.approx(200 / 3)


def test_bleu_brevity_penalty_known_value():
    # All n-gram precisions are 1; hypothesis 4 tokens vs reference 5: BLEU = exp(1 - 5/4).
    assert g.bleu(["a b c d"], [["a b c d e"]]) == pytest.approx(100 * math.exp(-0.25), rel=1e-6)


def test_bleu_identical_and_disjoint():
    assert g.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert g.bleu(["x y z w"], [["a b c d"]]) == pytest.approx(0.0, abs=1e-9)


def test_bleu_uses_the_best_of_several_references():
    one = g.bleu(["the cat sat on the mat"], [["a dog ran in the park"]])
    two = g.bleu(["the cat sat on the mat"], [["a dog ran in the park", "the cat sat on the mat"]])
    assert one < 20 and two == pytest.approx(100.0)


def test_bleu_with_uneven_reference_counts():
    score = g.bleu(["a b c d", "e f g h"], [["a b c d"], ["x", "e f g h"]])
    assert score == pytest.approx(100.0)


def test_rouge_known_values():
    # pred "the cat sat" vs ref "the cat": unigram P=2/3, R=1 -> F=0.8; bigram P=1/2, R=1 -> F=2/3; LCS=2 -> 0.8.
    r = g.rouge(["the cat sat"], [["the cat"]])
    assert r["rouge1"] == pytest.approx(80.0)
    assert r["rouge2"] == pytest.approx(200 / 3)
    assert r["rougeL"] == pytest.approx(80.0)


def test_rouge_takes_best_reference_and_averages():
    r = g.rouge(["the cat sat", "zzz"], [["nothing here", "the cat sat"], ["qqq"]])
    assert r["rouge1"] == pytest.approx(50.0)


def test_score_names():
    out = g.score(["a"], [["a"]])
    assert set(out) == {"gen/bleu", "gen/exact_match", "gen/rouge1", "gen/rouge2", "gen/rougeL"}
    assert out["gen/exact_match"] == 100.0


def test_parse_tasks_accepts_string_reference_and_blank_lines():
    tasks = g.parse_tasks('{"prompt": "p1", "references": ["a", "b"]}\n\n{"prompt": "p2", "references": "c"}\n',
                          "tasks.jsonl")
    assert [t.references for t in tasks] == [["a", "b"], ["c"]]
    assert [t.line for t in tasks] == [1, 3]


@pytest.mark.parametrize("text,match", [
    ("", r"tasks.jsonl: the task file is empty"),
    ("\n  \n", r"tasks.jsonl: the task file is empty"),
    ('{"prompt": "a", "references": ["b"]}\n{"prompt": "oops"\n', r"tasks.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "references": ["b"]}\n{"prompt": "c"}\n', r"tasks.jsonl:2: missing `references`"),
    ('{"references": ["b"]}\n', r"tasks.jsonl:1: missing or empty `prompt`"),
    ('{"prompt": "a", "references": []}\n', r"tasks.jsonl:1: `references` must be a non-empty list"),
    ('{"prompt": "a", "references": [1]}\n', r"tasks.jsonl:1: `references` must be a non-empty list"),
    ('["a", "b"]\n', r"tasks.jsonl:1: expected a JSON object"),
])
def test_parse_tasks_errors_name_file_and_line(text, match):
    with pytest.raises(DataError, match=match):
        g.parse_tasks(text, "tasks.jsonl")


def test_read_tasks_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope.jsonl")):
        g.read_tasks(str(tmp_path / "nope.jsonl"))
