"""`run_eval`: one evaluation of one model version, from its reference to a stored report.

Order matters for "bad input loses nothing": every input file is read and validated before any model is loaded or
any batch job starts (`section.read_inputs`), and the report folder is written in one go at the end with
metrics.json last. Then each section's evaluator runs (`evaluators.EVALUATORS`) and returns its own result; the
report and the gate read those results. Optional pieces that are absent (no dataset in the lineage, no run metrics,
no sweep, no task file) are recorded under `skipped` with the reason instead of failing the evaluation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_platform import storage
from llm_platform.config.evaluate import EvalConfig
from llm_platform.evaluate.section import EvalContext, EvalInputs, SectionResult, merged, read_inputs
from llm_platform.storage import layout, names

if TYPE_CHECKING:
    from llm_platform.evaluate.gate import GateResult
    from llm_platform.registry import ModelVersion

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What `run_eval` produced."""

    output_uri: str
    model: dict[str, str]
    metrics: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    gate: Any = None  # gate.GateResult when eval.compare_to is set
    sections: list[SectionResult] = field(default_factory=list)
    """Each evaluator's own result, in the order they ran."""

    def summary(self) -> str:
        lines = [f"evaluation of {self.model['name']}/{self.model['version']} -> {self.output_uri}"]
        lines += [f"  {k} = {v:.4g}" for k, v in sorted(self.metrics.items())
                  if k.count("/") == 1 or k.startswith("harness/")]
        lines += [f"  skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def run_eval(cfg: EvalConfig, storage_root: str, *, connect=None) -> EvalResult:
    """Evaluate `cfg.model` and write the report to `evals/<model>/<version>/<name>/` (or `cfg.output_uri`).

    Args:
        cfg: the `eval` config node.
        storage_root: `storage.root`, for registry references, baselines and the default report folder.
        connect: joins or starts Ray (the entry point's `cluster.connect(cfg.cluster)`), called only if the Ray
            path is taken and Ray is not connected yet; None starts a default local Ray then.

    Returns:
        The metrics, what was skipped and why, and the gate result when `cfg.compare_to` is set.

    Raises:
        StageError: a model that cannot be found, or a bad task / pairs / ratings file (named with its line).
    """
    from llm_platform.evaluate import gate, scoring
    from llm_platform.evaluate.evaluators import EVALUATORS

    names.check(cfg.name, "eval.name")  # it becomes the folder evals/<model>/<version>/<name>/
    mv = scoring.resolve(cfg.model, storage_root)
    inputs = read_inputs(cfg, mv, storage_root)  # before anything expensive starts
    if cfg.use_ray is None:
        cfg = dataclasses.replace(cfg, use_ray=_use_ray(cfg, mv, inputs))
    if inputs.val is not None or inputs.tasks is not None:
        _ensure_ray(cfg, connect)
    ctx = EvalContext(cfg, storage_root, mv, inputs, folder=tempfile.mkdtemp(prefix="llmp-eval-"))
    for evaluator in EVALUATORS:  # in order: a section may read the results of those before it
        if evaluator.applies(cfg):
            ctx.earlier.append(evaluator.run(ctx))
    gate_result = gate.judge(ctx.earlier, inputs.baseline, cfg.gate) if inputs.baseline is not None else None
    out_uri = cfg.output_uri or layout.evaluation(storage_root, mv.name, mv.version, cfg.name)
    return _publish(ctx, gate_result, out_uri)


def _publish(ctx: EvalContext, gate_result: GateResult | None, out_uri: str) -> EvalResult:
    """The report (plots, report.md/html, details.json) and metrics.json, written locally and copied to `out_uri`
    with metrics.json last."""
    from llm_platform.evaluate import gate, report

    cfg, mv, folder = ctx.cfg, ctx.mv, ctx.folder
    metrics, skipped, details, images = merged(ctx.earlier)
    if report.plot_metric_bars(metrics, f"{folder}/metrics.png"):
        images["Metrics"] = "metrics.png"
    model_info = {"name": mv.name, "version": mv.version, "uri": mv.uri}
    data = report.ReportData(title=f"Evaluation {cfg.name}: {mv.name}/{mv.version}", model=model_info,
                             metrics=metrics, skipped=skipped, sections=details, images=images,
                             gate_table=gate.format_table(gate_result) if gate_result else None)
    # `config` holds the gate config (compare_to, gate) that `gate` was computed under, and `model_registered_at`
    # tells this registration of the version from an earlier one of the same number: promotion (runner/) trusts
    # a stored verdict only when both match what is in force now.
    record = {"model": model_info, "name": cfg.name, "metrics": metrics, "skipped": skipped,
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
              "model_registered_at": ctx.lineage.get("registered_at"),
              "dataset": ctx.lineage.get("dataset"), "config": dataclasses.asdict(cfg),
              "gate": gate_result.to_dict() if gate_result else None}
    report.write_report(data, folder, record)
    report.publish(folder, out_uri)
    return EvalResult(output_uri=out_uri, model=model_info, metrics=metrics, skipped=skipped, gate=gate_result,
                      sections=list(ctx.earlier))


def _use_ray(cfg: EvalConfig, mv: ModelVersion, inputs: EvalInputs) -> bool:
    """`eval.use_ray` unset: Ray when there is enough work to spread or the weights are too big for the driver."""
    records = _records_to_score(cfg, inputs.val.files if inputs.val else None, inputs.tasks)
    weights_gb = sum(storage.info(f)["size"] for f in storage.glob(storage.join(mv.uri, "*.safetensors"))) / 1e9
    use_ray = records > cfg.ray_min_records or weights_gb > cfg.ray_min_model_gb
    log.info("eval: %d records to score and prompts to generate for, %.2f GB of weights: %s (set eval.use_ray "
             "to choose)", records, weights_gb, "Ray Data actor pools" if use_ray else "in this process")
    return use_ray


def _records_to_score(cfg: EvalConfig, val_files: list[str] | None, tasks) -> int:
    """Val records perplexity would score (from the shards' parquet footers) plus the prompts generation would run,
    perturbed copies included."""
    total = 0
    if val_files and not cfg.endpoint:
        import pyarrow.parquet as pq

        for uri in val_files:
            fs, path = storage.pyarrow_filesystem(uri)
            with fs.open_input_file(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        if cfg.max_val_records is not None:
            total = min(total, cfg.max_val_records)
    if tasks:
        copies = 1 + (len(cfg.robustness.perturbations) if cfg.robustness.enabled else 0)
        total += len(tasks) * copies
    return total


def _ensure_ray(cfg: EvalConfig, connect=None) -> None:
    """Ray Data paths need a Ray: the caller's (`connect`, which the entry points build from `cfg.cluster`), or
    one already connected. Never a Ray of its own making: that would ignore the cluster config."""
    if not cfg.use_ray or cfg.endpoint:
        return
    import ray

    if ray.is_initialized():
        return
    if connect is None:
        raise RuntimeError("eval needs Ray here (eval.use_ray, or a model or split past eval.ray_min_model_gb / "
                           "eval.ray_min_records) and Ray is not connected: call cluster.connect(cfg.cluster) "
                           "first, or pass connect= to run_eval")
    connect()
