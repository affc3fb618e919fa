"""The eval stage end to end on the shared local Ray: Ray Data perplexity, report, gate, bad input, endpoint mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from fixtures import evals as fx

from llm_platform import storage
from llm_platform.config.evaluate import BiasConfig, EvalConfig, HumanConfig, RobustnessConfig
from llm_platform.errors import DataError, StageError

pytestmark = pytest.mark.slow

TASKS = [{"prompt": f"the {w} said that", "references": [f"the {w} said that she would be late"]}
         for w in ("nurse", "engineer", "teacher", "pilot")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A storage root, a tiny GPT-2 with lineage (dataset, run, sweep), and a task file."""
    base = tmp_path_factory.mktemp("evalworld")
    model = str(base / "model")
    _, tok = fx.build_gpt2(model)
    ds = fx.build_dataset(str(base / "ds"), tok, seq_len=32, num_blocks=12)
    fx.write_lineage(model, dataset={"uri": ds}, run={"uri": fx.write_run(str(base / "run"))},
                     sweep={"uri": fx.write_sweep(str(base / "sweep"))}, model={"name": "tiny", "version": "v0002"})
    tasks = fx.write_tasks(str(base / "tasks.jsonl"), TASKS)
    return {"base": base, "root": str(base / "root"), "model": model, "ds": ds, "tasks": tasks}


def _direct(model_uri: str, files: list[str]) -> dict:
    from llm_platform.evaluate import perplexity, scoring

    loaded = scoring.load(model_uri)
    return perplexity.direct_perplexity(loaded.model, perplexity.read_records(files))


@pytest.mark.ray
@pytest.mark.s3
def test_ray_data_perplexity_equals_direct_from_s3(ray_session, world, s3_bucket):
    from llm_platform.data.dataset import open_dataset
    from llm_platform.evaluate import perplexity

    storage.upload_dir(world["ds"], f"{s3_bucket}/ds")
    storage.upload_dir(world["model"], f"{s3_bucket}/model")
    files = open_dataset(f"{s3_bucket}/ds").files["val"]
    assert all(f.startswith("s3://") for f in files)
    got = perplexity.ray_perplexity(f"{s3_bucket}/model", files, batch_size=5, num_actors=2, actor_num_cpus=0.5)
    want = _direct(world["model"], open_dataset(world["ds"]).files["val"])
    assert got["val/tokens"] == want["val/tokens"] == 12 * 31
    assert got["val/perplexity"] == pytest.approx(want["val/perplexity"], rel=1e-6)


@pytest.mark.ray
def test_run_eval_writes_a_complete_report(ray_session, world):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    from llm_platform.data.dataset import open_dataset
    from llm_platform.evaluate import run_eval

    cfg = EvalConfig(model=world["model"], tasks_uri=world["tasks"], max_new_tokens=6, batch_size=4, use_ray=True,
                     bias=BiasConfig(bootstrap_samples=200), human=HumanConfig(num_samples=3))
    result = run_eval(cfg, world["root"])
    out = os.path.join(world["root"], "evals", "tiny", "v0002", "default")
    assert result.output_uri == out
    assert result.skipped == {}, result.skipped
    want = _direct(world["model"], open_dataset(world["ds"]).files["val"])
    assert result.metrics["val/perplexity"] == pytest.approx(want["val/perplexity"], rel=1e-6)
    for key in ("gen/bleu", "gen/rougeL", "gen/exact_match", "bias/disparity_nats", "robust/typos/rougeL_delta",
                "robust/whitespace/bleu_delta"):
        assert key in result.metrics, key
    names = set(os.listdir(out))
    assert {"metrics.json", "report.md", "report.html", "details.json", "loss_curves.png", "sweep_trials.png",
            "metrics.png", "bias.png", "saliency.png", "human"} <= names
    for png in (n for n in names if n.endswith(".png")):
        img = mpimg.imread(os.path.join(out, png))
        assert img[..., :3].std() > 0.02, png
    record = json.load(open(os.path.join(out, "metrics.json")))
    assert record["model"]["version"] == "v0002" and record["metrics"] == result.metrics
    assert set(os.listdir(os.path.join(out, "human"))) == {"samples.csv", "samples.jsonl", "key.json",
                                                           "rating_sheet.html"}
    md = open(os.path.join(out, "report.md")).read()
    assert "![Training and validation loss](loss_curves.png)" in md and "val/perplexity" in md


def _cli(*overrides: str) -> tuple[int, str]:
    """Run `llm-platform eval <overrides>` in a subprocess; returns (exit code, stdout + stderr).

    A subprocess, not an in-process call: Hydra reconfigures the root logger on the (captured) stdout, and a
    later write to that closed stream killed the whole pytest process.
    """
    proc = subprocess.run([sys.executable, "-m", "llm_platform", "eval", *overrides], capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_gate_fails_on_a_planted_regression(world):
    from llm_platform.evaluate import run_eval

    common = [f"storage.root={world['root']}", f"eval.model={world['model']}", f"eval.tasks_uri={world['tasks']}",
              "eval.name=gate", "eval=inprocess", "eval.max_new_tokens=4", "eval.bias.bootstrap_samples=100",
              "eval.robustness.enabled=false"]
    # The evaluation to compare with, in this process (the CLI runs below are what is under test).
    run_eval(EvalConfig(model=world["model"], tasks_uri=world["tasks"], name="gate", use_ray=False, max_new_tokens=4,
                        bias=BiasConfig(bootstrap_samples=100), robustness=RobustnessConfig(enabled=False)),
             world["root"])
    stored = os.path.join(world["root"], "evals", "tiny", "v0002", "gate", "metrics.json")
    record = json.load(open(stored))
    # A baseline version that was clearly better on a guard metric, and one that was the same.
    for version, factor in (("v0001", 0.5), ("v0000", 1.0)):
        better = dict(record, metrics=dict(record["metrics"], **{"val/perplexity":
                                                                 record["metrics"]["val/perplexity"] * factor}))
        storage.write_json(os.path.join(world["root"], "evals", "tiny", version, "gate", "metrics.json"), better)
    code, printed = _cli(*common, "eval.compare_to=v0001")
    assert code == 1
    assert "val/perplexity *" in printed and "FAILED" in printed and "+100.0" in printed
    code, printed = _cli(*common, "eval.compare_to=v0000")
    assert code == 0 and "PASSED" in printed


@pytest.mark.parametrize("content,match", [
    ("", "tasks.jsonl: the task file is empty"),
    ('{"prompt": "a", "references": ["b"]}\n{"prompt": \n', "tasks.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "references": ["b"]}\n{"prompt": "c", "refs": ["d"]}\n', "tasks.jsonl:2: missing `references`"),
])
def test_bad_task_file_names_file_and_line_and_loses_nothing(world, tmp_path, content, match):
    from llm_platform.evaluate import run_eval

    out = str(tmp_path / "out")
    os.makedirs(out)
    (tmp_path / "out" / "metrics.json").write_text('{"metrics": {"kept": 1}}')
    bad = tmp_path / "tasks.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=match):
        run_eval(EvalConfig(model=world["model"], tasks_uri=str(bad), output_uri=out), world["root"])
    assert os.listdir(out) == ["metrics.json"]  # the earlier evaluation is untouched
    code, printed = _cli(f"storage.root={world['root']}", f"eval.model={world['model']}", f"eval.tasks_uri={bad}",
                         "eval=inprocess")
    assert code == 2 and match in printed


def test_missing_model_is_named(world):
    code, printed = _cli(f"storage.root={world['root']}", "eval.model=registry:ghost/v0009", "eval=inprocess")
    assert code == 2 and "registry:ghost/v0009" in printed
    with pytest.raises(StageError, match="/no/such/model"):
        from llm_platform.evaluate import run_eval

        run_eval(EvalConfig(model="/no/such/model"), world["root"])


@pytest.mark.ray
def test_seq2seq_over_ray_data_and_skips_are_reported(ray_session, tmp_path):
    from llm_platform.evaluate import run_eval

    model = str(tmp_path / "t5")
    fx.build_t5(model)
    tasks = fx.write_tasks(str(tmp_path / "t.jsonl"), TASKS)
    result = run_eval(EvalConfig(model=model, tasks_uri=tasks, max_new_tokens=4, use_ray=True,
                                 robustness=RobustnessConfig(perturbations=["casing"]),
                                 bias=BiasConfig(bootstrap_samples=100)), str(tmp_path / "root"))
    assert "gen/rougeL" in result.metrics and "robust/casing/rougeL_delta" in result.metrics
    assert "bias/disparity_nats" in result.metrics
    assert "no dataset" in result.skipped["perplexity"]
    assert "run.uri" in result.skipped["loss curves"] and "sweep.uri" in result.skipped["sweep curves"]
    md = open(os.path.join(result.output_uri, "report.md")).read()
    assert "## Skipped" in md and "sweep.uri" in md


def test_endpoint_mode_uses_the_openai_api(world, tmp_path):
    """A tiny OpenAI-compatible server on 127.0.0.1 that answers the first reference: exact match is 100."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from llm_platform.evaluate import run_eval

    answers = {t["prompt"]: t["references"][0] for t in TASKS}
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["model"], body["temperature"]))
            reply = json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                                "choices": [{"index": 0, "text": " " + answers.get(body["prompt"], "?"),
                                             "finish_reason": "stop", "logprobs": None}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = EvalConfig(model=world["model"], tasks_uri=world["tasks"], use_ray=False,
                         endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1",
                         robustness=RobustnessConfig(enabled=False), output_uri=str(tmp_path / "out"))
        result = run_eval(cfg, world["root"])
    finally:
        server.shutdown()
    assert result.metrics["gen/exact_match"] == 100.0 and result.metrics["gen/bleu"] == pytest.approx(100.0)
    assert seen[0] == ("/v1/completions", "tiny", 0.0) and len(seen) == len(TASKS)
    assert "endpoint" in result.skipped["perplexity"] and "endpoint" in result.skipped["bias"]


def test_skewed_fine_tuning_shows_disparity_untrained_does_not(tmp_path):
    """Fine-tuned on the stereotyped side of every pair, the model's CI excludes 0; untrained, it contains 0."""
    from llm_platform.evaluate import bias, run_eval

    pairs = bias.builtin_pairs()
    model_dir = str(tmp_path / "skewed")
    model, tok = fx.build_gpt2(model_dir, extra_text=[p.stereo for p in pairs] + [p.anti for p in pairs])
    cfg = EvalConfig(model=model_dir, use_ray=False, robustness=RobustnessConfig(enabled=False),
                     output_uri=str(tmp_path / "untrained"), bias=BiasConfig(bootstrap_samples=1000))
    untrained = run_eval(cfg, str(tmp_path / "root")).metrics
    fx.train_on(model, tok, [p.stereo for p in pairs], steps=60)
    model.save_pretrained(model_dir)
    cfg.output_uri = str(tmp_path / "trained")
    trained = run_eval(cfg, str(tmp_path / "root")).metrics
    assert untrained["bias/disparity_ci_low"] <= 0.0 <= untrained["bias/disparity_ci_high"], untrained
    assert trained["bias/disparity_ci_low"] > 0.5, trained
    assert trained["bias/disparity_nats"] > untrained["bias/disparity_nats"] + 2.0
    assert trained["bias/stereo_preference_pct"] >= 70.0
    shutil.rmtree(model_dir)
