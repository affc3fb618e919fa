"""Each evaluation section on its own (`evaluate/evaluators.py`): what it measures, what it skips and why, and that
it reads earlier sections' results without writing into them; the gate reads the results. No model is loaded: the
model folder does not exist, so a section that touched the weights would fail."""

from __future__ import annotations

import copy
import dataclasses

from fixtures import evals as fx

from llm_platform.config.evaluate import EvalConfig, GateConfig, RobustnessConfig
from llm_platform.evaluate import evaluators, gate
from llm_platform.evaluate.evaluators import EVALUATORS, GenerationResult
from llm_platform.evaluate.generation import Task
from llm_platform.evaluate.section import EvalContext, EvalInputs, SectionResult
from llm_platform.registry import ModelVersion

TASKS = [Task(prompt=f"the {w} said", references=[f"the {w} said hello"], line=i + 1)
         for i, w in enumerate(("nurse", "pilot", "cook"))]


def _ctx(tmp_path, cfg: EvalConfig | None = None, lineage: dict | None = None, **inputs) -> EvalContext:
    mv = ModelVersion("tiny", "v0001", str(tmp_path / "no-weights-here"), lineage or {})
    return EvalContext(cfg or EvalConfig(use_ray=False), str(tmp_path / "root"), mv, EvalInputs(**inputs),
                       folder=str(tmp_path))


def test_the_sections_run_in_report_order_under_distinct_names():
    names = [e.name for e in EVALUATORS]
    assert names == ["perplexity", "preference", "generation", "robustness", "harness", "bias", "saliency",
                     "human", "loss curves", "sweep curves"]


def test_applies_reads_the_config_alone():
    off = EvalConfig(robustness=RobustnessConfig(enabled=False), endpoint="http://x/v1")
    assert not evaluators.Robustness().applies(off) and evaluators.Robustness().applies(EvalConfig())
    assert not evaluators.Harness().applies(EvalConfig())
    assert evaluators.Harness().applies(dataclasses.replace(EvalConfig(), harness=dataclasses.replace(
        EvalConfig().harness, tasks=["arc_easy"])))
    assert not evaluators.Preference().applies(off)
    assert not evaluators.Human().applies(EvalConfig())


def test_generation_then_robustness_one_job_and_read_only(tmp_path, monkeypatch):
    """Generation generates the clean and the perturbed prompts in one call; robustness scores the perturbed ones
    from generation's result and leaves that result as it was."""
    jobs: list[list[str]] = []

    def echo(ctx):
        def generate(prompts: list[str]) -> list[str]:
            jobs.append(prompts)
            return [p + " hello" for p in prompts]
        return generate

    monkeypatch.setattr(evaluators, "_generator", echo)
    cfg = EvalConfig(use_ray=False, robustness=RobustnessConfig(perturbations=["casing", "typos"], rate=0.5))
    ctx = _ctx(tmp_path, cfg, tasks=TASKS)
    generated = evaluators.Generation().run(ctx)
    assert len(jobs) == 1 and len(jobs[0]) == 3 * len(TASKS)
    assert generated.metrics["gen/exact_match"] == 100.0 and generated.skipped == {}
    assert [e["prompt"] for e in generated.details["examples"]] == [t.prompt for t in TASKS]
    ctx.earlier.append(generated)
    before = copy.deepcopy(generated)
    robust = evaluators.Robustness().run(ctx)
    assert generated == before, "robustness wrote into generation's result"
    assert set(robust.metrics) >= {"robust/casing/rougeL_delta", "robust/typos/bleu_delta"}
    assert set(robust.details["robustness"]) == {"casing", "typos"} and robust.skipped == {}


def test_without_a_task_file_each_section_says_why_it_skipped(tmp_path):
    ctx = _ctx(tmp_path, val_missing="no dataset: the model's lineage has no dataset.uri")
    ctx.earlier.append(evaluators.Generation().run(ctx))
    assert ctx.earlier[0].skipped == {"generation": "no task file (set eval.tasks_uri to a JSONL of prompt + "
                                                    "references)"}
    assert evaluators.Robustness().run(ctx).skipped == {"robustness": "no task file to perturb (set eval.tasks_uri)"}
    assert evaluators.Perplexity().run(ctx).skipped == {"perplexity": "no dataset: the model's lineage has no "
                                                                      "dataset.uri"}
    assert evaluators.Saliency().run(ctx).skipped == {"saliency": "no prompt (set eval.explain.prompt or tasks_uri)"}
    assert evaluators.Preference().run(ctx) == SectionResult("preference")  # nothing of its kind: no entry at all


def test_endpoint_mode_skips_what_needs_the_weights(tmp_path):
    from llm_platform.evaluate.section import ValSplit

    ctx = _ctx(tmp_path, EvalConfig(endpoint="http://x/v1"), tasks=TASKS, val=ValSplit(["v.parquet"], "pretrain"))
    assert "endpoint mode" in evaluators.Perplexity().run(ctx).skipped["perplexity"]
    assert "endpoint mode" in evaluators.Bias().run(ctx).skipped["bias"]
    assert evaluators.Saliency().run(ctx).skipped == {"saliency": "endpoint mode"}


def test_human_without_tasks_skips_the_export_only(tmp_path):
    from llm_platform.config.evaluate import HumanConfig

    result = evaluators.Human().run(_ctx(tmp_path, EvalConfig(human=HumanConfig(num_samples=2))))
    assert result.skipped == {"human export": "no task file to sample prompts from (set eval.tasks_uri)"}
    assert result.details == {"human": {}} and result.metrics == {}


def test_curves_from_the_lineage_or_the_reason_they_are_missing(tmp_path):
    run = fx.write_run(str(tmp_path / "run"))
    drawn = evaluators.LossCurves().run(_ctx(tmp_path, lineage={"run": {"uri": run}}))
    assert drawn.images == {"Training and validation loss": "loss_curves.png"} and drawn.skipped == {}
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert evaluators.LossCurves().run(_ctx(tmp_path)).skipped == {"loss curves": "the model's lineage has no run.uri"}
    missing = evaluators.SweepCurves().run(_ctx(tmp_path, lineage={"sweep": {"uri": str(tmp_path / "none")}}))
    assert "no trials.jsonl at" in missing.skipped["sweep curves"]


def test_the_gate_reads_the_results_and_their_lower_is_better(tmp_path):
    """A harness metric lm-eval marks lower-is-better regresses when it rises, which its name does not say."""
    cfg = GateConfig(guard_metrics=["harness/wikitext/bits_per_byte", "gen/rougeL"], max_regression_pct=5.0)
    results = [SectionResult("generation", metrics={"gen/rougeL": 50.0}),
               SectionResult("harness", metrics={"harness/wikitext/bits_per_byte": 1.2},
                             lower_is_better=["harness/wikitext/bits_per_byte"])]
    baseline = ({"gen/rougeL": 50.0, "harness/wikitext/bits_per_byte": 1.0}, "evals/tiny/v0000/default/metrics.json")
    verdict = gate.judge(results, baseline, cfg)
    assert not verdict.passed and verdict.failures[0].startswith("harness/wikitext/bits_per_byte: 1 -> 1.2")
    results[1].lower_is_better = []  # as if the harness had not said so: higher would read as better
    assert gate.judge(results, baseline, cfg).passed
    # A harness guard no section produced is misnamed, not skipped.
    assert not gate.judge(results[:1], ({"gen/rougeL": 50.0}, "b"), cfg).passed


def test_an_earlier_result_is_found_by_its_type(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.earlier.append(SectionResult("perplexity"))
    assert ctx.result(GenerationResult) is None
    ctx.earlier.append(GenerationResult("generation"))
    assert ctx.result(GenerationResult) is ctx.earlier[1]
