"""Sweep summary from fake trials: winner selection, the table, summary.csv, trials.jsonl and curves.png."""

import csv
import json
import os

from llm_platform.tune.summary import ERROR, FINISHED, STOPPED, TrialRecord, select_winner, write_summary


def reports(values, every=5):
    return [{"training_iteration": i + 1, "step": (i + 1) * every, "val/loss": v, "train/loss": v + 0.1,
             "trial_id": "x", "checkpoint_path": None} for i, v in enumerate(values)]


def fake_trials():
    return [
        TrialRecord("t0", {"train.lr": 1e-2}, reports([3.0, 2.5, 2.4, 2.45]), FINISHED),  # best 2.4, final 2.45
        TrialRecord("t1", {"train.lr": 3e-3}, reports([3.1, 2.6, 2.5, 2.42]), FINISHED),  # final 2.42: winner
        TrialRecord("t2", {"train.lr": 1e-6}, reports([5.5]), STOPPED),  # stopped early
        TrialRecord("t3", {"train.lr": 5e-2}, reports([2.0]), ERROR, error="ConfigError: boom"),  # errored: never wins
    ]


def test_winner_is_the_best_final_metric_among_finished_trials():
    trials = fake_trials()
    assert select_winner(trials).trial_id == "t1"
    assert select_winner(trials, "val/loss", "max").trial_id == "t0"
    assert select_winner(trials, "train/loss").trial_id == "t1"
    assert select_winner([t for t in trials if t.status != FINISHED]) is None
    nan = TrialRecord("t4", {}, reports([float("nan")]), FINISHED)
    assert select_winner([nan]) is None


def test_summary_files(tmp_path):
    trials = fake_trials()
    winner = select_winner(trials)
    table = write_summary(str(tmp_path), trials, "val/loss", "min", winner)
    lines = table.splitlines()
    assert lines[0].split() [:2] == ["trial", "train.lr"] and len(lines) == 2 + len(trials)
    assert "stopped" in lines[4] and "error: ConfigError: boom" in lines[5]

    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["trial"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert float(rows[0]["best val/loss"]) == 2.4 and float(rows[0]["final val/loss"]) == 2.45
    assert [int(r["iterations"]) for r in rows] == [4, 4, 1, 1]
    assert rows[2]["status"] == "stopped" and rows[1]["train.lr"] == "0.003"

    records = [json.loads(line) for line in open(tmp_path / "trials.jsonl")]
    assert len(records) == 4 + 4 + 1 + 1
    first = records[0]
    assert first == {"trial_id": "t0", "training_iteration": 1, "step": 5,
                     "metrics": {"val/loss": 3.0, "train/loss": 3.1}, "params": {"train.lr": 1e-2},
                     "status": "finished"}

    png = open(tmp_path / "curves.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / "curves.png") > 5000
