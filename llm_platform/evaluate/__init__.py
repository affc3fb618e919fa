"""The evaluation stage: perplexity, generation metrics, bias, robustness, human evaluation, explanations, report.

Library entry: `run_eval(cfg.eval, storage_root)` (in `evaluate.run`). One job per module:
    scoring      load an HF folder (safetensors only) and score token sequences
    perplexity   held-out loss/perplexity, directly or as Ray Data batch inference on an actor pool
    generation   task files, BLEU/ROUGE/exact match, generation (local, Ray Data, OpenAI endpoint)
    bias         counterfactual pairs, per-group preference, disparity with a bootstrap CI
    robustness   seeded prompt perturbations and metric deltas
    human        blinded sample export, rating sheet, ratings -> win rates
    explain      token attributions and attention maps
    harness      lm-evaluation-harness tasks, in process or through the endpoint
    report       plots, report.md/html, metrics.json
    gate         baseline comparison for promotion
    section      the evaluator protocol, SectionResult, EvalContext, read_inputs
    evaluators   one evaluator per report section (EVALUATORS), run in order by run_eval
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_eval"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light module (gate, robustness) does not pull in torch and transformers.
    if name == "run_eval":
        from llm_platform.evaluate.run import run_eval

        return run_eval
    raise AttributeError(name)
