"""The report's files exist, its PNGs decode and are not blank, and metrics.json is written last."""

import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
from fixtures import evals as fx  # noqa: E402

from llm_platform.evaluate import bias, report  # noqa: E402


def assert_png_not_blank(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert float(img[..., :3].std()) > 0.02, f"{path} looks blank"


def test_plots_and_report_files(tmp_path):
    run = fx.write_run(str(tmp_path / "run"))
    sweep = fx.write_sweep(str(tmp_path / "sweep"))
    folder = str(tmp_path / "report")
    os.makedirs(folder)
    assert report.plot_loss_curves(report.read_jsonl(os.path.join(run, "metrics.jsonl")), f"{folder}/loss.png")
    assert report.plot_trials(report.read_jsonl(os.path.join(sweep, "trials.jsonl")), f"{folder}/trials.png") \
        == "val/loss"
    metrics = {"gen/bleu": 12.0, "gen/rougeL": 30.0, "robust/typos/rougeL_delta": -4.0, "val/perplexity": 9.0}
    assert report.plot_metric_bars(metrics, f"{folder}/metrics.png")
    summary = bias.summarize(np.array([1.0, 2.0, -0.5, 0.2]), ["a", "a", "b", "b"], 200, 0.95, 0)
    bias.plot(summary, f"{folder}/bias.png")
    for name in ("loss.png", "trials.png", "metrics.png", "bias.png"):
        assert_png_not_blank(f"{folder}/{name}")

    data = report.ReportData(title="Evaluation t", model={"name": "m", "version": "v1"}, metrics=metrics,
                             skipped={"sweep curves": "no sweep"}, images={"Loss": "loss.png"},
                             sections={"examples": [{"prompt": "p|q", "output": "o", "references": ["r"]}]})
    report.write_report(data, folder, {"metrics": metrics})
    md = open(f"{folder}/report.md").read()
    assert "![Loss](loss.png)" in md and "| gen/bleu | 12 |" in md and "no sweep" in md and "p\\|q" in md
    page = open(f"{folder}/report.html").read()
    assert '<img src="loss.png"' in page and "gen/rougeL" in page
    assert json.load(open(f"{folder}/metrics.json"))["metrics"]["gen/bleu"] == 12.0


def test_missing_curves_return_false(tmp_path):
    assert not report.plot_loss_curves([{"step": 1, "lr": 0.1}], str(tmp_path / "x.png"))
    assert report.plot_trials([{"trial_id": "a", "step": 1}], str(tmp_path / "y.png")) is None
    assert not report.plot_metric_bars({"val/loss": 1.0}, str(tmp_path / "z.png"))
    assert not os.listdir(tmp_path)


def test_publish_writes_record_last(tmp_path, monkeypatch):
    from llm_platform import storage

    folder = tmp_path / "r"
    (folder / "human").mkdir(parents=True)
    for name in ("metrics.json", "a.png", "report.md", "human/key.json"):
        (folder / name).write_text(name)
    order = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (order.append(os.path.basename(uri)),
                                                                   real(uri, data)))
    report.publish(str(folder), str(tmp_path / "out"))
    assert order[-1] == "metrics.json" and len(order) == 4
    assert (tmp_path / "out" / "human" / "key.json").read_text() == "human/key.json"


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    assert report.read_jsonl(str(tmp_path / "m.jsonl")) == [{"step": 1, "train/loss": 2.0}]
