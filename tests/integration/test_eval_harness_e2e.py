"""lm-evaluation-harness in the eval stage, offline, on the shipped local tasks (tests/data/harness_tasks/).

One tiny GPT-2, fine-tuned a little so that its answers are not chance, is scored in process (lm-eval's `hf` model)
and through our own OpenAI-compatible routes (lm-eval's `local-completions` client against `/v1/completions` with
echo + logprobs). The in-process scores must equal a direct computation of the same log-likelihoods and greedy
generations with the HF model, the endpoint's must agree with them, both land in metrics.json and the report, and a
gate rule on a harness metric passes or fails as it should.

The endpoint is `serve.routes.create_api` under uvicorn in a thread: the same FastAPI app the Serve replicas run,
without starting a Serve deployment for this file (Serve's own path is tested in test_serve_app.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time

import pytest
from fixtures import evals as fx

from llm_platform import storage
from llm_platform.config.evaluate import BiasConfig, EvalConfig, GateConfig, HarnessConfig, RobustnessConfig

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

TASKS_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "data", "harness_tasks")
TASKS = ["llmp_choice", "llmp_cloze", "llmp_echo"]
NUM_GREEDY_ANSWERS = 3  # echo docs whose answer is set to the model's own greedy text: exact_match = 3/6


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Summed log p(continuation | context) and whether every continuation token is the argmax, as lm-eval defines
    them for a causal model: encode the whole text, the continuation is what follows the context's tokens."""
    import torch

    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)  # (T, V)
    rows = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]  # row i predicts cont[i]
    ll = sum(rows[i, t].item() for i, t in enumerate(cont))
    greedy = all(rows[i].argmax().item() == t for i, t in enumerate(cont))
    return ll, greedy


def _greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Greedy text after `prompt`, cut at the task's stop strings (newline, EOS) as lm-eval cuts it."""
    import torch

    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:].tolist())
    for stop in ("\n", tok.eos_token):
        text = text.split(stop)[0]
    return text


def _direct_scores(model, tok, tasks_dir: str) -> dict[str, float]:
    """The harness metrics computed here from the task files, without lm-eval."""
    choice = _jsonl(os.path.join(tasks_dir, "choice.jsonl"))
    acc, acc_norm = [], []
    for doc in choice:
        lls = [_loglikelihood(model, tok, doc["question"], " " + c)[0] for c in doc["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc["label"]))
    cloze = [_loglikelihood(model, tok, d["context"], d["continuation"]) for d in _jsonl(os.path.join(tasks_dir,
                                                                                                      "cloze.jsonl"))]
    echo = _jsonl(os.path.join(tasks_dir, "echo.jsonl"))
    matches = [float(_greedy(model, tok, d["prompt"], 6) == d["answer"]) for d in echo]
    return {"harness/llmp_choice/acc": sum(acc) / len(acc),
            "harness/llmp_choice/acc_norm": sum(acc_norm) / len(acc_norm),
            "harness/llmp_cloze/perplexity": math.exp(-sum(ll for ll, _ in cloze) / len(cloze)),
            "harness/llmp_cloze/acc": sum(g for _, g in cloze) / len(cloze),
            "harness/llmp_echo/exact_match": sum(matches) / len(matches)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GPT-2 (lineage tiny/v0002) fine-tuned on half the right answers, and a copy of the task folder whose
    first echo answers are the model's own greedy continuations."""
    base = tmp_path_factory.mktemp("harness")
    model_dir, tasks_dir = str(base / "model"), str(base / "tasks")
    shutil.copytree(TASKS_DIR, tasks_dir)
    choice = _jsonl(os.path.join(tasks_dir, "choice.jsonl"))
    right = [f"{d['question']} {d['choices'][d['label']]}." for d in choice[: len(choice) // 2]]
    texts = [f"{d['question']} {c}." for d in choice for c in d["choices"]]
    model, tok = fx.build_gpt2(model_dir, extra_text=texts)
    fx.train_on(model, tok, right, steps=40)
    model.save_pretrained(model_dir)
    fx.write_lineage(model_dir, model={"name": "tiny", "version": "v0002"})

    echo = _jsonl(os.path.join(tasks_dir, "echo.jsonl"))
    for doc in echo[:NUM_GREEDY_ANSWERS]:
        doc["answer"] = _greedy(model, tok, doc["prompt"], 6)
    with open(os.path.join(tasks_dir, "echo.jsonl"), "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in echo)
    return {"base": base, "root": str(base / "root"), "model": model_dir, "tasks": tasks_dir,
            "direct": _direct_scores(model, tok, tasks_dir)}


@pytest.fixture(scope="module")
def endpoint(world):
    """Our OpenAI-compatible app over the same model folder, on 127.0.0.1, no API keys."""
    import uvicorn
    from conftest import free_port

    from llm_platform.config.serve import AuthConfig, ServeConfig
    from llm_platform.serve.engine import Engine, load_model
    from llm_platform.serve.routes import Service, create_api

    model, tok = load_model(world["model"])
    engine = Engine(model, tok, max_batch_size=8)
    engine.start()
    service = Service(engine, tok, "tiny", ServeConfig(auth=AuthConfig(api_key_env="LLMP_HARNESS_TEST_NO_KEYS")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_api(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)
    engine.shutdown(5)


def _config(world, name: str, **changes) -> EvalConfig:
    harness = HarnessConfig(tasks=list(TASKS), include_path=changes.pop("include_path", world["tasks"]))
    return EvalConfig(model=world["model"], name=name, use_ray=False, batch_size=4,
                      bias=BiasConfig(enabled=False), robustness=RobustnessConfig(enabled=False), harness=harness,
                      **changes)


@pytest.fixture(scope="module")
def in_process(world):
    from llm_platform.evaluate import run_eval

    return run_eval(_config(world, "harness"), world["root"])


def test_in_process_scores_are_lm_evals_own_computation(world, in_process):
    direct = world["direct"]
    got = {k: v for k, v in in_process.metrics.items() if k.startswith("harness/")}
    assert set(got) == set(direct), got
    for key in ("harness/llmp_choice/acc", "harness/llmp_choice/acc_norm", "harness/llmp_cloze/acc"):
        assert got[key] == pytest.approx(direct[key], abs=1e-9), key
    # Fine-tuned on the right answer of half the questions: clearly above chance (1/3), as computed directly.
    assert direct["harness/llmp_choice/acc"] >= 0.5
    assert math.log(got["harness/llmp_cloze/perplexity"]) == pytest.approx(
        math.log(direct["harness/llmp_cloze/perplexity"]), abs=1e-6)
    assert got["harness/llmp_echo/exact_match"] == direct["harness/llmp_echo/exact_match"] == NUM_GREEDY_ANSWERS / 6


def test_scores_land_in_metrics_json_and_the_report(in_process):
    out = in_process.output_uri
    assert out == os.path.join(os.path.dirname(out), "harness") and "/evals/tiny/v0002/" in out
    record = json.load(open(os.path.join(out, "metrics.json")))
    for key, value in in_process.metrics.items():
        if key.startswith("harness/"):
            assert record["metrics"][key] == pytest.approx(value)
    details = json.load(open(os.path.join(out, "details.json")))["harness"]
    assert details["lower_is_better"] == ["harness/llmp_cloze/perplexity"]  # lm-eval's own direction
    assert "in process (lm-eval hf, cpu, float32)" == details["mode"]
    rows = {(r["task"], r["metric"]): r for r in details["rows"]}
    assert rows[("llmp_choice", "acc")]["samples"] == 12 and rows[("llmp_choice", "acc")]["stderr"] > 0
    md = open(os.path.join(out, "report.md")).read()
    html = open(os.path.join(out, "report.html")).read()
    acc = f"{in_process.metrics['harness/llmp_choice/acc']:.4g}"
    assert "## lm-evaluation-harness" in md and f"| llmp_choice | acc | none | {acc} |" in md
    assert "<h2>lm-evaluation-harness</h2>" in html and "<td>llmp_echo</td><td>exact_match</td>" in html
    assert f"| harness/llmp_choice/acc | {acc} |" in md  # also in the metrics table


@pytest.mark.s3
def test_endpoint_agrees_and_the_gate_reads_harness_metrics(world, in_process, endpoint, s3_bucket):
    """Through our /v1/completions with the model version and the task folder on S3 (only the version's tokenizer
    files are fetched); a planted better baseline fails the acc guard, the perplexity guard passes, and a misnamed
    harness guard fails instead of passing unseen."""
    from llm_platform.evaluate import run_eval

    storage.upload_dir(world["tasks"], f"{s3_bucket}/harness_tasks")
    storage.upload_dir(world["model"], f"{s3_bucket}/model")
    baseline = json.load(open(os.path.join(in_process.output_uri, "metrics.json")))
    baseline["metrics"]["harness/llmp_choice/acc"] = in_process.metrics["harness/llmp_choice/acc"] + 0.25
    storage.write_json(os.path.join(world["root"], "evals", "tiny", "v0001", "harness", "metrics.json"), baseline)
    guards = ["harness/llmp_choice/acc", "harness/llmp_cloze/perplexity", "harness/llmp_choice/acc_nrom"]
    cfg = _config(world, "harness", include_path=f"{s3_bucket}/harness_tasks", endpoint=endpoint,
                  compare_to="v0001", output_uri=str(world["base"] / "by-endpoint"),
                  gate=GateConfig(guard_metrics=guards, max_regression_pct=5.0))
    cfg.model = f"{s3_bucket}/model"
    result = run_eval(cfg, world["root"])

    assert result.skipped["saliency"] == "endpoint mode"  # no weights were loaded in this process
    for key in ("harness/llmp_choice/acc", "harness/llmp_choice/acc_norm", "harness/llmp_cloze/acc",
                "harness/llmp_echo/exact_match"):
        assert result.metrics[key] == in_process.metrics[key], key
    assert math.log(result.metrics["harness/llmp_cloze/perplexity"]) == pytest.approx(
        math.log(in_process.metrics["harness/llmp_cloze/perplexity"]), abs=1e-4)

    rows = {r.metric: r for r in result.gate.rows}
    assert rows["harness/llmp_choice/acc"].status == "FAIL" and rows["harness/llmp_choice/acc"].guard
    assert rows["harness/llmp_cloze/perplexity"].status == "ok" and rows["harness/llmp_cloze/perplexity"].guard
    assert rows["harness/llmp_choice/acc_nrom"].status == "FAIL"
    assert not result.gate.passed and len(result.gate.failures) == 2
    assert any("acc_nrom" in f and "harness/llmp_choice/acc_norm" in f for f in result.gate.failures)
    md = open(os.path.join(result.output_uri, "report.md")).read()
    assert "local-completions" in md and "harness/llmp_choice/acc *" in md


def test_a_model_the_endpoint_does_not_serve_is_named(world, endpoint, tmp_path):
    """Without the check lm-eval would retry, then raise an HTTP 404 from deep inside its client."""
    from llm_platform.errors import ConfigError
    from llm_platform.evaluate import run_eval

    cfg = _config(world, "wrong-model", endpoint=endpoint, endpoint_model="ghost", output_uri=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"eval.endpoint_model='ghost' is not served at .* \(it serves tiny\)"):
        run_eval(cfg, world["root"])
    assert not os.path.exists(tmp_path / "out")
