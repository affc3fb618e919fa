"""`llm-platform run`: every stage in order, each skipped when its output for the same inputs and config exists.

    data -> train (or tune) -> register -> eval -> promote -> serve -> sample query

The stages are records in `stages.PIPELINE` (name, done-check, run -> typed result); `run_all` walks them. Only the
promote stage moves LATEST. Register (and the sweep's registration of its winner) adds a version without moving it;
eval stores its `metrics.json` with the gate's verdict; promote reads that stored record and points LATEST at the
version only when the record is of exactly this version (this registration of it) and was computed under the gate
config in force (`eval.compare_to`, `eval.gate.*`), and its gate passed (`promotion.py`). An evaluation with no
`eval.compare_to` has no gate and counts as passing. A stored record of another gate config is not reused: the eval
stage evaluates again. So a rerun after a failed gate refuses again, a rerun after a pass promotes (once; after that
LATEST is there already), and a run that stops before promote, or has no eval, leaves LATEST where it was and says
so in its summary. Serving then loads `registry:<name>` (LATEST).

Each stage reads the previous stage's output from storage, as if it ran alone. A slice that starts after register
(`--from eval`, `--from promote`) works on the newest registered version, the one waiting for promotion. The lineage
chain (dataset, tokenizer, run, sweep, version, eval report, endpoint) is written to `status/last_run.json` for
`llm-platform status`.

This is an orchestrator over the stages' library functions, so like an entry point it sees the whole config.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_platform import registry, storage
from llm_platform.config import PlatformConfig
from llm_platform.config.choices import Stage
from llm_platform.errors import ConfigError
from llm_platform.runner.promotion import Verdict, eval_folder, promotion_verdict, stored_verdict
from llm_platform.runner.stages import PIPELINE, STAGES, RunContext, StageResult, canonical, model_name
from llm_platform.storage import layout

__all__ = ["STAGES", "RunSummary", "Verdict", "eval_folder", "lineage_chain", "promotion_verdict", "run_all",
           "selected_stages", "stored_verdict"]
log = logging.getLogger("llm_platform.run")


@dataclass
class RunSummary:
    """What each stage did (ran or skipped), how long it took, and the lineage chain."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    chain: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None
    sample: dict[str, Any] | None = None

    def add(self, stage: Stage, result: StageResult, seconds: float) -> None:
        self.stages[stage.value] = {"result": result.outcome.value, "seconds": seconds, "output": result.output}

    def table(self) -> str:
        lines = [f"{'stage':<10}{'result':<10}{'seconds':>9}  output"]
        for name, rec in self.stages.items():
            lines.append(f"{name:<10}{rec['result']:<10}{rec['seconds']:>9.1f}  {rec.get('output', '')}")
        if self.sample:
            lines.append(f"sample query: {self.sample['prompt']!r} -> {self.sample['completion']!r}")
        return "\n".join(lines)


def selected_stages(cfg: PlatformConfig) -> list[Stage]:
    """The configured stages, cut to `run.from_stage`..`run.until_stage` (tune counts as train). Names outside
    `config.choices.Stage` fail at compose time already; here a bound that is not one of `run.stages` fails."""
    stages = [canonical(s) for s in cfg.run.stages]
    bounds = {"run.from_stage": cfg.run.from_stage, "run.until_stage": cfg.run.until_stage}
    for key, value in bounds.items():
        if value is not None and canonical(value) not in stages:
            raise ConfigError(f"{key}={value!r} is not one of the run's stages {stages}")
    start = stages.index(canonical(cfg.run.from_stage)) if cfg.run.from_stage else 0
    stop = stages.index(canonical(cfg.run.until_stage)) + 1 if cfg.run.until_stage else len(stages)
    return stages[start:stop]


def run_all(cfg: PlatformConfig, connect: Callable[[], object] | None = None) -> RunSummary:
    """Run the selected stages; a stage whose output exists with the same inputs and config is skipped.

    `connect` (the entry point's `cluster.connect(cfg.cluster)`) is called when a stage first needs Ray, so a run
    whose stages are all done starts none; None: Ray is connected already."""
    ctx = RunContext(cfg, connect or (lambda: None), selected_stages(cfg))
    summary = RunSummary()
    for spec in PIPELINE:
        start = time.perf_counter()
        if spec.name not in ctx.todo:
            result = spec.unselected(ctx) if spec.unselected else None
            if result is not None:
                summary.add(spec.name, result, 0.0)
            continue
        result = (spec.done(ctx) if spec.done else None) or spec.run(ctx)
        ctx.record(spec.name, result)
        summary.add(spec.name, result, time.perf_counter() - start)
        row = summary.stages[spec.name.value]
        log.info("%s: %s in %.1fs -> %s", spec.name, row["result"], row["seconds"], row["output"])
    if ctx.serve is not None:
        summary.endpoint, summary.sample = ctx.serve.url, ctx.serve.sample
    summary.chain = lineage_chain(ctx)
    storage.write_json(layout.last_run_status(cfg.storage.root), {
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), "stages": summary.stages,
        "chain": summary.chain, "sample": summary.sample})
    return summary


def describe_cost(cost: dict[str, Any] | None) -> str | None:
    """A run's lineage `cost` in a line: `$12.3 (4 GPU-hours, 0.5 h; on_demand prices as of 2025-07-01)`."""
    if not cost:
        return None
    usd = "unpriced" if cost.get("cost_usd") is None else f"${cost['cost_usd']:.4g}"
    return (f"{usd} ({cost.get('gpu_hours', 0):.3g} GPU-hours, {cost.get('hours', 0):.3g} h; "
            f"{cost.get('market')} prices as of {cost.get('prices_as_of')})")


def lineage_chain(ctx: RunContext) -> dict[str, Any]:
    """Dataset -> tokenizer -> run -> sweep -> version -> eval report -> endpoint, from the stored records.

    The version is this run's (the one registered, evaluated or promoted), else LATEST's."""
    dataset = ctx.data.uri if ctx.data else None
    try:
        this_run = ctx.register is not None or {Stage.eval, Stage.promote} & set(ctx.todo)
        mv = ctx.candidate() if this_run else registry.latest(ctx.root, model_name(ctx.cfg))
    except registry.RegistryError:
        return {"dataset": dataset}
    lineage = mv.lineage
    return {
        "dataset": (lineage.get("dataset") or {}).get("uri") or dataset,
        "dataset_fingerprint": (lineage.get("dataset") or {}).get("fingerprint"),
        "tokenizer_sha256": (lineage.get("dataset") or {}).get("tokenizer_sha256"),
        "run": (lineage.get("run") or {}).get("uri"),
        "sweep": (lineage.get("sweep") or {}).get("uri") if lineage.get("sweep") else None,
        "run_cost": describe_cost(lineage.get("cost")),
        "model_version": f"{mv.name}/{mv.version}",
        "model_uri": mv.uri,
        "eval_report": ctx.eval.uri if ctx.eval else None,
        "endpoint": ctx.serve.url if ctx.serve else None,
    }
