"""lm-evaluation-harness plumbing without a model run: result naming, gate directions, report table, config errors.

The runs themselves (in process and through the endpoint) are in tests/integration/test_eval_harness_e2e.py.
"""

from __future__ import annotations

import os
import sys

import pytest

from llm_platform.config.evaluate import EvalConfig, GateConfig, HarnessConfig
from llm_platform.errors import ConfigError
from llm_platform.evaluate import gate, harness, report

TASKS_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "data", "harness_tasks")

# The shape `lm_eval.simple_evaluate` returns (0.4.x): "<metric>,<filter>" keys, stderr beside, "N/A" when none.
RESULTS = {
    "results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
                  "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
        "wikitext": {"alias": "wikitext", "word_perplexity,none": 30.5, "word_perplexity_stderr,none": "N/A",
                     "bits_per_byte,none": 1.1, "bits_per_byte_stderr,none": "N/A"},
        "mc_sub": {"alias": " - mc_sub", "acc,none": 0.75, "acc_stderr,none": 0.1, "acc_norm,none": float("nan")},
    },
    "groups": {"mc": {"alias": "mc", "acc,none": 0.7, "acc_stderr,none": 0.08}},
    "higher_is_better": {"gsm8k": {"exact_match": True},
                         "wikitext": {"word_perplexity": False, "bits_per_byte": False},
                         "mc_sub": {"acc": True, "acc_norm": True}, "mc": {"acc": True}},
    "n-samples": {"gsm8k": {"original": 1319, "effective": 100}, "mc_sub": {"original": 8, "effective": 8}},
}


def test_results_become_harness_metrics_with_lm_evals_directions():
    metrics, lower, rows = harness.to_metrics(RESULTS)
    assert metrics == {"harness/gsm8k/exact_match/strict-match": 0.25,
                       "harness/gsm8k/exact_match/flexible-extract": 0.5,
                       "harness/wikitext/word_perplexity": 30.5, "harness/wikitext/bits_per_byte": 1.1,
                       "harness/mc_sub/acc": 0.75, "harness/mc/acc": 0.7}  # NaN and stderrs are not metrics
    assert sorted(lower) == ["harness/wikitext/bits_per_byte", "harness/wikitext/word_perplexity"]
    by_name = {(r["task"], r["metric"], r["filter"]): r for r in rows}
    assert by_name[("gsm8k", "exact_match", "strict-match")]["stderr"] == 0.05
    assert by_name[("gsm8k", "exact_match", "strict-match")]["samples"] == 100
    assert by_name[("gsm8k", "exact_match", "flexible-extract")]["stderr"] is None
    assert by_name[("wikitext", "bits_per_byte", "none")]["higher_is_better"] is False


def test_gate_direction_of_a_harness_metric_comes_from_lm_eval():
    # bits_per_byte says nothing about direction in its name: lower is better only because lm-eval says so.
    assert gate.regression_pct("harness/w/bits_per_byte", 1.0, 1.2) == pytest.approx(-20.0)
    assert gate.regression_pct("harness/w/bits_per_byte", 1.0, 1.2, lower_is_better=True) == pytest.approx(20.0)
    base = {"harness/w/bits_per_byte": 1.0, "harness/mc/acc": 0.70}
    guards = ["harness/w/bits_per_byte", "harness/mc/acc"]
    ok = gate.compare({"harness/w/bits_per_byte": 0.9, "harness/mc/acc": 0.69}, base, guards, 5.0,
                      lower_is_better=["harness/w/bits_per_byte"], expected=guards)
    assert ok.passed, ok.failures
    bad = gate.compare({"harness/w/bits_per_byte": 1.2, "harness/mc/acc": 0.60}, base, guards, 5.0,
                       lower_is_better=["harness/w/bits_per_byte"], expected=guards)
    assert sorted(f.split(":")[0] for f in bad.failures) == sorted(guards)
    assert "gate (limit 5.0% on * metrics) FAILED" in gate.format_table(bad)


def test_a_misnamed_harness_guard_fails_and_lists_what_exists():
    result = gate.compare({"harness/mc/acc": 0.7}, {"harness/mc/acc": 0.7}, ["harness/mc/accuracy"], 5.0,
                          expected=["harness/mc/accuracy"])
    assert not result.passed
    assert result.failures == ["harness/mc/accuracy: guard metric produced by neither evaluation "
                               "(this one has harness/mc/acc)"]
    # Without `expected` (the default guards), a metric neither side measured is not a failure.
    assert gate.compare({}, {}, ["val/perplexity"], 5.0).passed


def test_report_shows_the_harness_table():
    _, _, rows = harness.to_metrics(RESULTS)
    data = report.ReportData(title="t", model={"name": "m"}, metrics={"harness/mc/acc": 0.7},
                             sections={"harness": {"mode": "in process (lm-eval hf, cpu, float32)",
                                                   "lm_eval_version": "0.4.13", "rows": rows}})
    md, html = report.to_markdown(data), report.to_html(data)
    assert "lm-evaluation-harness 0.4.13, in process (lm-eval hf, cpu, float32)" in md
    assert "| gsm8k | exact_match | strict-match | 0.25 | 0.05 | 100 | higher |" in md
    assert "| wikitext | bits_per_byte | none | 1.1 | - | - | lower |" in md
    assert "<td>mc</td><td>acc</td><td>none</td><td>0.7</td><td>0.08</td>" in html


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ConfigError, match=r"eval.harness.tasks .*pip install 'llm-platform\[harness\]'"):
        harness.prepare(HarnessConfig(tasks=["llmp_choice"], include_path=TASKS_DIR))


def test_an_unknown_task_names_eval_harness_tasks():
    pytest.importorskip("lm_eval")
    cfg = HarnessConfig(tasks=["llmp_choice", "llmp_choise"], include_path=TASKS_DIR, include_builtin=False)
    with pytest.raises(ConfigError, match=r"eval.harness.tasks: .*llmp_choise .*include_path=.*did you mean "
                                          r"llmp_choice"):
        harness.prepare(cfg)
    found = harness.prepare(HarnessConfig(tasks=["llmp_echo", "llmp_choice"], include_path=TASKS_DIR))
    assert found.names == ["llmp_echo", "llmp_choice"]
    # Every name was in the folder, so lm-eval's ~15k built-in YAMLs were not indexed.
    assert set(found.manager.all_tasks) == {"llmp_choice", "llmp_cloze", "llmp_echo"}


def test_a_missing_task_folder_names_eval_harness_include_path(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError, match="eval.harness.include_path: no folder at .*nowhere"):
        harness.prepare(HarnessConfig(tasks=["x"], include_path=str(tmp_path / "nowhere")))


def test_a_harness_guard_without_harness_tasks_is_refused(tmp_path):
    from llm_platform.evaluate import run_eval

    # config.json alone: the refusal must come before any weights are read.
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = EvalConfig(model=str(tmp_path / "m"), use_ray=False, output_uri=str(tmp_path / "out"),
                     gate=GateConfig(guard_metrics=["val/perplexity", "harness/mc/acc"]))
    with pytest.raises(ConfigError, match=r"eval.gate.guard_metrics names harness/mc/acc but eval.harness.tasks"):
        run_eval(cfg, str(tmp_path / "root"))
    assert not os.path.exists(tmp_path / "out")


def test_model_arguments_per_mode(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 128}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    cfg = HarnessConfig(tasks=["t"], num_concurrent=4, device="cuda", dtype="bfloat16")
    name, args, _ = harness.model_spec(cfg, str(tmp_path), endpoint="http://h:8000/v1/", endpoint_model="tiny",
                                       timeout_s=2.5)
    assert name == "local-completions" and args["base_url"] == "http://h:8000/v1/completions"
    assert args["tokenizer"] == str(tmp_path) and args["tokenizer_backend"] == "huggingface"
    assert (args["model"], args["max_length"], args["num_concurrent"], args["timeout"]) == ("tiny", 128, 4, 3)
    cfg.apply_chat_template = True
    name, args, _ = harness.model_spec(cfg, str(tmp_path), endpoint="http://h:8000/v1", endpoint_model="tiny",
                                       timeout_s=60)
    assert name == "local-chat-completions" and args["base_url"] == "http://h:8000/v1/chat/completions"
    assert args["eos_string"] == "<|endoftext|>" and "tokenizer" not in args
    name, args, mode = harness.model_spec(cfg, str(tmp_path), endpoint=None, endpoint_model="", timeout_s=60)
    assert name == "hf" and (args["device"], args["dtype"], args["use_safetensors"]) == ("cuda", "bfloat16", True)
    assert args["pretrained"] == args["tokenizer"] == str(tmp_path) and "cuda" in mode


def test_the_harness_group_composes_and_typos_name_the_key():
    from llm_platform.config import compose

    cfg = compose("eval", ["eval.harness.tasks=[llmp_choice,hellaswag]", "eval.harness.include_path=s3://b/tasks",
                           "eval.gate.guard_metrics=[harness/llmp_choice/acc,harness/gsm8k/exact_match/strict-match]"])
    assert cfg.eval.harness.tasks == ["llmp_choice", "hellaswag"]
    assert cfg.eval.gate.guard_metrics[1] == "harness/gsm8k/exact_match/strict-match"
    with pytest.raises(Exception, match="eval.harness.task"):
        compose("eval", ["eval.harness.task=[x]"])
    with pytest.raises(Exception, match="eval.harness.num_concurrent"):
        compose("eval", ["eval.harness.num_concurrent=many"])


def test_chat_prompts_in_process_need_the_models_chat_template(tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    tasks = harness.HarnessTasks(names=["llmp_echo"], manager=None, folder=None)
    with pytest.raises(ConfigError,
                       match="eval.harness.apply_chat_template=true but the tokenizer .* no chat template"):
        harness.run_harness(HarnessConfig(tasks=["llmp_echo"], apply_chat_template=True), tasks, str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert harness._has_chat_template(str(tmp_path))
