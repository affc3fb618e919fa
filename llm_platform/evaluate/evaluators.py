"""The evaluation's sections, one evaluator each, in the order `run_eval` runs them and the report lists them.

    perplexity     val split perplexity (builtin, Ray Data actor pool, or vLLM prompt log-probabilities)
    preference     preference accuracy on the val pairs of a preference dataset
    generation     generation metrics on the task file (BLEU, ROUGE, exact match) and examples
    robustness     metric deltas on the perturbed prompts (generated in generation's one job)
    harness        lm-evaluation-harness tasks
    bias           counterfactual pairs: disparity with a bootstrap CI
    saliency       a token-attribution example
    human          blinded samples for rating, and the import of ratings
    loss curves    the run's train/val loss
    sweep curves   the sweep's trials

How to add an evaluator: a class with `name`, `applies(cfg)` and `run(ctx) -> SectionResult` (section.py), placed
in `EVALUATORS`; it reads `ctx.inputs` (add a field there, read in `read_inputs`, if it has an input file to
validate), `ctx.model()` and earlier results (`ctx.result(GenerationResult)`), and reports what it skipped in its
result. A metric it adds appears in the report and metrics.json, and the gate can guard it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_platform import storage
from llm_platform.config.evaluate import EvalConfig
from llm_platform.evaluate.section import EvalContext, Evaluator, SectionResult

NUM_EXAMPLES = 5


@dataclass
class GenerationResult(SectionResult):
    """Generation's result, with what robustness and human evaluation read: the clean outputs, and the outputs of
    the perturbed prompts (generated in the same job so the model loads once)."""

    prompts: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    perturbed: dict[str, list[str]] = field(default_factory=dict)
    perturbed_outputs: list[str] = field(default_factory=list)


class Perplexity:
    name = "perplexity"

    def applies(self, cfg: EvalConfig) -> bool:
        return True

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import perplexity

        val, cfg = ctx.inputs.val, ctx.cfg
        if val is None:
            return SectionResult.skip(self.name, ctx.inputs.val_missing or "no val split")
        if cfg.endpoint:
            return SectionResult.skip(self.name, "endpoint mode scores no weights (eval.endpoint is set)")
        if val.kind == "preference":  # pairs: scored by preference accuracy (the next section), not perplexity
            return SectionResult.skip(self.name, "a preference dataset: its val pairs are scored by preference "
                                                 "accuracy")
        source = ", ".join(val.files)
        if cfg.backend == "vllm":
            records = perplexity.read_records(val.files, cfg.max_val_records)
            if "position_ids" not in records and not ctx.model().is_seq2seq:  # else: the builtin scorer below
                return SectionResult(self.name, metrics=perplexity.vllm_perplexity(
                    ctx.mv.uri, records, batch_size=cfg.batch_size, num_engines=cfg.num_actors,
                    device=cfg.vllm_device, source=source))
        if cfg.use_ray:
            return SectionResult(self.name, metrics=perplexity.ray_perplexity(
                ctx.mv.uri, val.files, limit=cfg.max_val_records, batch_size=cfg.batch_size,
                num_actors=cfg.num_actors, actor_num_cpus=cfg.actor_num_cpus))
        loaded = ctx.model()
        records = perplexity.read_records(val.files, cfg.max_val_records)
        return SectionResult(self.name, metrics=perplexity.direct_perplexity(
            loaded.model, records, is_seq2seq=loaded.is_seq2seq, batch_size=cfg.batch_size, source=source))


class Preference:
    """Preference accuracy on the val pairs against the model the run started from (`lineage.base_model`)."""

    name = "preference"

    def applies(self, cfg: EvalConfig) -> bool:
        return not cfg.endpoint

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import perplexity, preference, scoring

        val, cfg = ctx.inputs.val, ctx.cfg
        if val is None or val.kind != "preference":
            return SectionResult(self.name)  # nothing of its kind to score; perplexity says why, if anything
        records = perplexity.read_records(val.files, cfg.max_val_records)
        result = SectionResult(self.name)
        reference = None
        base = ctx.lineage.get("base_model")
        if base:
            from llm_platform.models import pretrained

            reference = scoring.load(pretrained.materialize(base, ctx.storage_root)).model
        else:
            result.skipped["preference/accuracy"] = ("the model's lineage has no base_model to compare rewards "
                                                     "against (preference/logp_accuracy needs none)")
        train_cfg = ((ctx.lineage.get("run") or {}).get("config") or {}).get("train") or {}
        beta = float((train_cfg.get("preference") or {}).get("beta", 0.1))
        result.metrics = preference.evaluate_pairs(ctx.model().model, reference, records, beta=beta,
                                                   batch_size=cfg.batch_size)
        return result


class Generation:
    name = "generation"

    def applies(self, cfg: EvalConfig) -> bool:
        return True

    def run(self, ctx: EvalContext) -> GenerationResult:
        from llm_platform.evaluate import generation, robustness

        tasks, cfg = ctx.inputs.tasks, ctx.cfg
        if tasks is None:
            return GenerationResult(self.name, skipped={self.name: "no task file (set eval.tasks_uri to a JSONL of "
                                                                   "prompt + references)"})
        prompts, refs = [t.prompt for t in tasks], [t.references for t in tasks]
        kinds = cfg.robustness.perturbations if cfg.robustness.enabled else []
        perturbed = robustness.perturb_all(prompts, kinds, cfg.seed, cfg.robustness.rate)
        # One generation job for the clean and every perturbed prompt: the model loads once (on Ray, one actor pool).
        everything = _generator(ctx)(prompts + robustness.flatten(perturbed))
        outputs = everything[:len(prompts)]
        examples = [{"prompt": p, "output": o, "references": r}
                    for p, o, r in list(zip(prompts, outputs, refs))[:NUM_EXAMPLES]]
        return GenerationResult(self.name, metrics=generation.score(outputs, refs), details={"examples": examples},
                                prompts=prompts, references=refs, outputs=outputs, perturbed=perturbed,
                                perturbed_outputs=everything[len(prompts):])


def _generator(ctx: EvalContext):
    from llm_platform.evaluate import generation

    cfg, uri = ctx.cfg, ctx.mv.uri
    if cfg.endpoint:
        return generation.endpoint_generator(cfg.endpoint, cfg.endpoint_model or ctx.mv.name, cfg.max_new_tokens,
                                             cfg.endpoint_timeout_s)
    if cfg.backend == "vllm":
        return generation.vllm_generator(uri, cfg.max_new_tokens, cfg.batch_size, cfg.num_actors,
                                         device=cfg.vllm_device)
    if cfg.use_ray:
        return generation.ray_generator(uri, cfg.max_new_tokens, cfg.batch_size, cfg.num_actors, cfg.actor_num_cpus)
    return generation.local_generator(ctx.model(), cfg.max_new_tokens, cfg.batch_size)


class Robustness:
    name = "robustness"

    def applies(self, cfg: EvalConfig) -> bool:
        return cfg.robustness.enabled

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import generation, robustness

        generated = ctx.result(GenerationResult)
        if ctx.inputs.tasks is None or generated is None:
            return SectionResult.skip(self.name, "no task file to perturb (set eval.tasks_uri)")
        if not generated.perturbed:  # eval.robustness.perturbations is empty
            return SectionResult(self.name)
        metrics, details = robustness.score_robustness(generated.perturbed, generated.perturbed_outputs,
                                                       generated.references, generated.metrics, generation.score)
        return SectionResult(self.name, metrics=metrics, details={"robustness": details})


class Harness:
    name = "harness"

    def applies(self, cfg: EvalConfig) -> bool:
        return bool(cfg.harness.tasks)

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import harness

        cfg, tasks = ctx.cfg, ctx.inputs.harness_tasks
        assert tasks is not None, "read_inputs prepares the tasks of eval.harness.tasks"
        scored = harness.run_harness(cfg.harness, tasks, ctx.mv.uri, endpoint=cfg.endpoint,
                                     endpoint_model=cfg.endpoint_model or ctx.mv.name,
                                     timeout_s=cfg.endpoint_timeout_s, batch_size=cfg.batch_size, seed=cfg.seed)
        lower = list(scored.lower_is_better)
        details = {"mode": scored.mode, "lm_eval_version": scored.lm_eval_version, "tasks": tasks.names,
                   "lower_is_better": lower, "rows": scored.rows}
        return SectionResult(self.name, metrics=scored.metrics, details={"harness": details}, lower_is_better=lower)


class Bias:
    name = "bias"

    def applies(self, cfg: EvalConfig) -> bool:
        return cfg.bias.enabled

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import bias

        cfg, pairs = ctx.cfg, ctx.inputs.pairs
        if cfg.endpoint:
            return SectionResult.skip(self.name, "endpoint mode: log-likelihoods need the weights")
        assert pairs is not None, "read_inputs loads the pairs when eval.bias.enabled"
        metrics, summary = bias.evaluate_bias(ctx.model(), pairs, samples=cfg.bias.bootstrap_samples,
                                              confidence=cfg.bias.confidence, seed=cfg.seed,
                                              batch_size=cfg.batch_size)
        bias.plot(summary, f"{ctx.folder}/bias.png")
        return SectionResult(self.name, metrics=metrics, details={"bias": summary},
                             images={"Bias: log-likelihood gap per group": "bias.png"})


class Saliency:
    name = "saliency"

    def applies(self, cfg: EvalConfig) -> bool:
        return True

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import explain

        cfg, tasks = ctx.cfg, ctx.inputs.tasks
        prompt = cfg.explain.prompt or (tasks[0].prompt if tasks else None)
        if cfg.endpoint:
            return SectionResult.skip(self.name, "endpoint mode")
        if not prompt:
            return SectionResult.skip(self.name, "no prompt (set eval.explain.prompt or tasks_uri)")
        ex = explain.explain(ctx.model(), prompt, cfg.explain.method, cfg.explain.ig_steps, with_attention=False)
        explain.saliency_png(ex, f"{ctx.folder}/saliency.png")
        return SectionResult(self.name, images={"Saliency example": "saliency.png"})


class Human:
    """Export blinded samples and/or import ratings (see `evaluate.human`)."""

    name = "human"

    def applies(self, cfg: EvalConfig) -> bool:
        return cfg.human.num_samples > 0 or bool(cfg.human.ratings_uri)

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import human

        cfg, tasks = ctx.cfg, ctx.inputs.tasks
        result = SectionResult(self.name, details={"human": {}})
        section = result.details["human"]
        if cfg.human.num_samples > 0 and not tasks:
            result.skipped["human export"] = "no task file to sample prompts from (set eval.tasks_uri)"
        elif cfg.human.num_samples > 0:
            prompts = [t.prompt for t in tasks or []]
            generated = ctx.result(GenerationResult)
            systems = {"A": generated.outputs if generated else []}
            if cfg.human.compare_model:
                systems["B"] = _compare_outputs(ctx, cfg.human.compare_model, prompts)
            section["export"] = human.export_samples(prompts, systems, cfg.human.num_samples, cfg.seed,
                                                     f"{ctx.folder}/human")
        if cfg.human.ratings_uri:
            # The key that un-blinds the ratings: the named export's, or the one exported just now.
            key_uri = (storage.join(cfg.human.export_uri, human.KEY) if cfg.human.export_uri
                       else f"{ctx.folder}/human/{human.KEY}")
            rates = human.import_ratings(cfg.human.ratings_uri, key_uri, confidence=cfg.bias.confidence)
            result.metrics = {f"human/{k}": v for k, v in rates["metrics"].items()}
            section["ratings"] = rates
        return result


def _compare_outputs(ctx: EvalContext, model_ref: str, prompts: list[str]) -> list[str]:
    """The outputs of `eval.human.compare_model` for side-by-side samples, generated in this process."""
    from llm_platform.evaluate import generation, scoring

    cfg = ctx.cfg
    other = scoring.resolve(model_ref, ctx.storage_root)
    return generation.local_generator(scoring.load(other.uri), cfg.max_new_tokens, cfg.batch_size)(prompts)


class LossCurves:
    name = "loss curves"

    def applies(self, cfg: EvalConfig) -> bool:
        return True

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import report

        rows, missing = _lineage_records(ctx.lineage, "run", "metrics.jsonl")
        if missing:
            return SectionResult.skip(self.name, missing)
        if not report.plot_loss_curves(rows, f"{ctx.folder}/loss_curves.png"):
            return SectionResult.skip(self.name, "metrics.jsonl has no train/loss or val/loss")
        return SectionResult(self.name, images={"Training and validation loss": "loss_curves.png"})


class SweepCurves:
    name = "sweep curves"

    def applies(self, cfg: EvalConfig) -> bool:
        return True

    def run(self, ctx: EvalContext) -> SectionResult:
        from llm_platform.evaluate import report

        rows, missing = _lineage_records(ctx.lineage, "sweep", "trials.jsonl")
        if missing:
            return SectionResult.skip(self.name, missing)
        if not report.plot_trials(rows, f"{ctx.folder}/sweep_trials.png"):
            return SectionResult(self.name)  # trials without a numeric metric: nothing to draw
        return SectionResult(self.name, images={"Sweep trials": "sweep_trials.png"})


def _lineage_records(lineage: dict, section: str, filename: str) -> tuple[list[dict], str | None]:
    """The JSON lines of `<lineage[section].uri>/<filename>`, or why there are none."""
    from llm_platform.evaluate.report import read_jsonl

    uri = (lineage.get(section) or {}).get("uri")
    if not uri:
        return [], f"the model's lineage has no {section}.uri"
    path = storage.join(uri, filename)
    if not storage.exists(path):
        return [], f"no {filename} at {path}"
    rows = read_jsonl(path)
    return rows, None if rows else f"{path} has no records"


EVALUATORS: list[Evaluator] = [Perplexity(), Preference(), Generation(), Robustness(), Harness(), Bias(), Saliency(),
                               Human(), LossCurves(), SweepCurves()]
