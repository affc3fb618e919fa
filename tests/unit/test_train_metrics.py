"""metrics.jsonl costs what each line costs: appended locally, rotated parts on S3, consolidated at close."""

from __future__ import annotations

import json

import pytest

from llm_platform import storage
from llm_platform.train import metrics
from llm_platform.train.metrics import MetricsLogger, read_metrics


@pytest.fixture(autouse=True)
def no_tensorboard(monkeypatch):
    """The TensorBoard writer is not what is measured here."""

    class Quiet:
        def add_scalar(self, *args):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(MetricsLogger, "_writer", lambda self: Quiet())


def test_local_lines_are_appended_and_a_resume_drops_what_follows_the_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    writes = []
    monkeypatch.setattr(storage.records, "write_bytes", lambda uri, data: writes.append(uri))  # no whole rewrites
    logger = MetricsLogger(run, total_steps=10)
    for step in range(1, 7):
        logger.log(step, {"train/loss": 1.0 / step})
    logger.close()
    assert writes == []
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    monkeypatch.undo()

    # A restart from the step-4 checkpoint: steps 5 and 6 are dropped once, then the new ones are appended.
    again = MetricsLogger(run, resume_step=4, total_steps=10)
    again.log(5, {"train/loss": 0.5, "val/loss": float("nan")})
    again.close()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["val/loss"] is None and records[-1]["train/loss"] == 0.5


def test_a_torn_last_line_is_not_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "train/lo')
    assert read_metrics(str(run)) == [{"step": 1}]


def test_s3_parts_bound_each_put_and_close_consolidates(s3_bucket, monkeypatch):
    monkeypatch.setattr(metrics, "PART_LINES", 3)
    run = f"{s3_bucket}/runs/r"
    puts: list[tuple[str, int]] = []
    real_write = storage.write_bytes

    def spy(uri, data):
        puts.append((uri, data.count(b"\n")))
        real_write(uri, data)

    monkeypatch.setattr(storage.records, "write_bytes", spy)
    logger = MetricsLogger(run, total_steps=8)
    for step in range(1, 8):
        logger.log(step, {"train/loss": float(step)})
        # A reader (the driver's progress display, `last_logged`) sees every line while the run goes on.
        assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))
    assert max(lines for _, lines in puts) == 3  # no PUT carries the whole history
    assert sorted({uri.rsplit("/", 1)[1] for uri, _ in puts}) == [
        "part-000000.jsonl", "part-000001.jsonl", "part-000002.jsonl"]
    logger.close()
    assert puts[-1] == (f"{run}/metrics.jsonl", 7)
    assert not storage.glob(f"{run}/metrics.parts/*")
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 8))

    # A restart at step 5 after a crash that left parts behind (no close): one consolidating PUT, then new parts.
    crashed = MetricsLogger(run, resume_step=7, total_steps=12)
    for step in (8, 9):
        crashed.log(step, {"train/loss": float(step)})
    restarted = MetricsLogger(run, resume_step=5, total_steps=12)
    restarted.log(6, {"train/loss": 60.0})
    restarted.close()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[-1]["train/loss"] == 60.0
