"""`run_eval`: one evaluation of one model version, from its reference to a stored report.

Order matters for "bad input loses nothing": every input file is read and validated before any model is loaded or
any batch job starts, and the report folder is written in one go at the end with metrics.json last. Optional pieces
that are absent (no dataset in the lineage, no run metrics, no sweep, no task file) are recorded under `skipped`
with the reason instead of failing the evaluation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any

from llm_platform import layout, names, storage
from llm_platform.config.evaluate import EvalConfig
from llm_platform.errors import ConfigError, DataError

log = logging.getLogger(__name__)
NUM_EXAMPLES = 5


@dataclass
class EvalResult:
    """What `run_eval` produced."""

    output_uri: str
    model: dict[str, str]
    metrics: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    gate: Any = None  # gate.GateResult when eval.compare_to is set

    def summary(self) -> str:
        lines = [f"evaluation of {self.model['name']}/{self.model['version']} -> {self.output_uri}"]
        lines += [f"  {k} = {v:.4g}" for k, v in sorted(self.metrics.items())
                  if k.count("/") == 1 or k.startswith("harness/")]
        lines += [f"  skipped {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def _val_files(cfg: EvalConfig, lineage: dict, skipped: dict[str, str]) -> list[str] | None:
    from llm_platform.data.dataset import open_dataset

    uri = cfg.dataset_uri or (lineage.get("dataset") or {}).get("uri")
    if not uri:
        skipped["perplexity"] = "no dataset: the model's lineage has no dataset.uri and eval.dataset_uri is unset"
        return None
    files = open_dataset(uri).files.get("val") or []
    if not files:
        skipped["perplexity"] = f"the dataset at {uri} has no val split"
        return None
    return files


def _dataset_kind(cfg: EvalConfig, lineage: dict) -> str:
    from llm_platform.data.dataset import open_dataset

    return open_dataset(cfg.dataset_uri or lineage["dataset"]["uri"]).kind


def _preference(cfg: EvalConfig, lineage: dict, loaded_fn, files: list[str], storage_root: str,
                skipped: dict[str, str]) -> dict[str, float]:
    """Preference accuracy on the val pairs against the model the run started from (`lineage.base_model`)."""
    from llm_platform.evaluate import models, perplexity, preference

    records = perplexity.read_records(files, cfg.max_val_records)
    skipped["perplexity"] = "a preference dataset: its val pairs are scored by preference accuracy"
    reference = None
    base = lineage.get("base_model")
    if base:
        from llm_platform.models import pretrained

        reference = models.load(pretrained.materialize(base, storage_root)).model
    else:
        skipped["preference/accuracy"] = ("the model's lineage has no base_model to compare rewards against "
                                          "(preference/logp_accuracy needs none)")
    train_cfg = ((lineage.get("run") or {}).get("config") or {}).get("train") or {}
    beta = float((train_cfg.get("preference") or {}).get("beta", 0.1))
    return preference.evaluate_pairs(loaded_fn().model, reference, records, beta=beta, batch_size=cfg.batch_size)


def _perplexity(cfg: EvalConfig, mv, loaded_fn, files: list[str]) -> dict[str, float]:
    from llm_platform.evaluate import perplexity

    if cfg.backend == "vllm":
        records = perplexity.read_records(files, cfg.max_val_records)
        if "position_ids" not in records and not loaded_fn().is_seq2seq:  # else: the builtin scorer below
            return perplexity.vllm_perplexity(mv.uri, records, batch_size=cfg.batch_size, num_engines=cfg.num_actors,
                                              device=cfg.vllm_device, source=", ".join(files))
    if cfg.use_ray:
        return perplexity.ray_perplexity(mv.uri, files, limit=cfg.max_val_records, batch_size=cfg.batch_size,
                                         num_actors=cfg.num_actors, actor_num_cpus=cfg.actor_num_cpus)
    loaded = loaded_fn()
    records = perplexity.read_records(files, cfg.max_val_records)
    return perplexity.direct_perplexity(loaded.model, records, is_seq2seq=loaded.is_seq2seq,
                                        batch_size=cfg.batch_size, source=", ".join(files))


def _generator(cfg: EvalConfig, mv, loaded_fn):
    from llm_platform.evaluate import generation

    if cfg.endpoint:
        return generation.endpoint_generator(cfg.endpoint, cfg.endpoint_model or mv.name, cfg.max_new_tokens,
                                             cfg.endpoint_timeout_s)
    if cfg.backend == "vllm":
        return generation.vllm_generator(mv.uri, cfg.max_new_tokens, cfg.batch_size, cfg.num_actors,
                                         device=cfg.vllm_device)
    if cfg.use_ray:
        return generation.ray_generator(mv.uri, cfg.max_new_tokens, cfg.batch_size, cfg.num_actors,
                                        cfg.actor_num_cpus)
    return generation.local_generator(loaded_fn(), cfg.max_new_tokens, cfg.batch_size)


def _records(lineage: dict, section: str, filename: str, skipped: dict[str, str], key: str) -> list[dict]:
    from llm_platform.evaluate.report import read_jsonl

    uri = (lineage.get(section) or {}).get("uri")
    if not uri:
        skipped[key] = f"the model's lineage has no {section}.uri"
        return []
    path = storage.join(uri, filename)
    if not storage.exists(path):
        skipped[key] = f"no {filename} at {path}"
        return []
    rows = read_jsonl(path)
    if not rows:
        skipped[key] = f"{path} has no records"
    return rows


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
    from llm_platform.evaluate import bias, explain, gate, generation, models, report, robustness

    names.check(cfg.name, "eval.name")  # it becomes the folder evals/<model>/<version>/<name>/
    mv = models.resolve(cfg.model, storage_root)
    lineage = mv.lineage or {}
    out_uri = cfg.output_uri or layout.evaluation(storage_root, mv.name, mv.version, cfg.name)
    skipped: dict[str, str] = {}
    sections: dict[str, Any] = {}
    metrics: dict[str, float] = {}

    # Read and validate every input before anything expensive starts.
    tasks = generation.read_tasks(cfg.tasks_uri) if cfg.tasks_uri else None
    pairs = bias.load_pairs(cfg.bias.pairs_uri, cfg.bias.include_builtin) if cfg.bias.enabled else None
    if cfg.human.ratings_uri:
        if not storage.exists(cfg.human.ratings_uri):
            raise DataError(f"eval.human.ratings_uri: no file at {cfg.human.ratings_uri}")
        if not cfg.human.export_uri and cfg.human.num_samples <= 0:
            raise ConfigError("eval.human.ratings_uri needs eval.human.export_uri (the export folder with key.json)")
    val_files = _val_files(cfg, lineage, skipped)
    harness_tasks = _harness_tasks(cfg)
    baseline = None
    if cfg.compare_to:
        baseline = gate.load_baseline(storage_root, mv.name, cfg.compare_to, cfg.name)

    cache: dict[str, Any] = {}

    def loaded_fn():
        if "model" not in cache:
            cache["model"] = models.load(mv.uri)
        return cache["model"]

    if cfg.use_ray is None:
        records = _records_to_score(cfg, val_files, tasks)
        weights_gb = sum(storage.info(f)["size"] for f in storage.glob(storage.join(mv.uri, "*.safetensors"))) / 1e9
        cfg = dataclasses.replace(cfg, use_ray=records > cfg.ray_min_records or weights_gb > cfg.ray_min_model_gb)
        log.info("eval: %d records to score and prompts to generate for, %.2f GB of weights: %s (set eval.use_ray "
                 "to choose)", records, weights_gb, "Ray Data actor pools" if cfg.use_ray else "in this process")
    if val_files is not None or tasks is not None:
        _ensure_ray(cfg, connect)

    if val_files is not None:
        if cfg.endpoint:
            skipped["perplexity"] = "endpoint mode scores no weights (eval.endpoint is set)"
        elif _dataset_kind(cfg, lineage) == "preference":  # pairs: scored by preference accuracy, not perplexity
            metrics.update(_preference(cfg, lineage, loaded_fn, val_files, storage_root, skipped))
        else:
            metrics.update(_perplexity(cfg, mv, loaded_fn, val_files))

    outputs: list[str] = []
    if tasks is None:
        skipped["generation"] = "no task file (set eval.tasks_uri to a JSONL of prompt + references)"
    else:
        generate = _generator(cfg, mv, loaded_fn)
        prompts, refs = [t.prompt for t in tasks], [t.references for t in tasks]
        kinds = cfg.robustness.perturbations if cfg.robustness.enabled else []
        perturbed = robustness.perturb_all(prompts, kinds, cfg.seed, cfg.robustness.rate)
        # One generation job for the clean and every perturbed prompt: the model loads once (on Ray, one actor pool).
        everything = generate(prompts + robustness.flatten(perturbed))
        outputs = everything[:len(prompts)]
        clean = generation.score(outputs, refs)
        metrics.update(clean)
        sections["examples"] = [{"prompt": p, "output": o, "references": r}
                                for p, o, r in list(zip(prompts, outputs, refs))[:NUM_EXAMPLES]]
        if kinds:
            robust_metrics, sections["robustness"] = robustness.score_robustness(
                perturbed, everything[len(prompts):], refs, clean, generation.score)
            metrics.update(robust_metrics)
    if tasks is None and cfg.robustness.enabled:
        skipped["robustness"] = "no task file to perturb (set eval.tasks_uri)"

    lower_is_better: list[str] = []
    if harness_tasks is not None:
        from llm_platform.evaluate import harness

        scored = harness.run_harness(cfg.harness, harness_tasks, mv.uri, endpoint=cfg.endpoint,
                                     endpoint_model=cfg.endpoint_model or mv.name, timeout_s=cfg.endpoint_timeout_s,
                                     batch_size=cfg.batch_size, seed=cfg.seed)
        metrics.update(scored.metrics)
        lower_is_better = scored.lower_is_better
        sections["harness"] = {"mode": scored.mode, "lm_eval_version": scored.lm_eval_version,
                               "tasks": harness_tasks.names, "lower_is_better": lower_is_better, "rows": scored.rows}

    folder = tempfile.mkdtemp(prefix="llmp-eval-")
    images: dict[str, str] = {}
    if pairs is not None:
        if cfg.endpoint:
            skipped["bias"] = "endpoint mode: log-likelihoods need the weights"
        else:
            bias_metrics, sections["bias"] = bias.evaluate_bias(
                loaded_fn(), pairs, samples=cfg.bias.bootstrap_samples, confidence=cfg.bias.confidence,
                seed=cfg.seed, batch_size=cfg.batch_size)
            metrics.update(bias_metrics)
            bias.plot(sections["bias"], f"{folder}/bias.png")
            images["Bias: log-likelihood gap per group"] = "bias.png"

    prompt = cfg.explain.prompt or (tasks[0].prompt if tasks else None)
    if cfg.endpoint or not prompt:
        skipped["saliency"] = "endpoint mode" if cfg.endpoint else "no prompt (set eval.explain.prompt or tasks_uri)"
    else:
        ex = explain.explain(loaded_fn(), prompt, cfg.explain.method, cfg.explain.ig_steps, with_attention=False)
        explain.saliency_png(ex, f"{folder}/saliency.png")
        images["Saliency example"] = "saliency.png"

    if cfg.human.num_samples > 0 or cfg.human.ratings_uri:
        sections["human"] = _human(cfg, storage_root, tasks, outputs, folder, metrics, skipped)

    run_rows = _records(lineage, "run", "metrics.jsonl", skipped, "loss curves")
    if run_rows and report.plot_loss_curves(run_rows, f"{folder}/loss_curves.png"):
        images["Training and validation loss"] = "loss_curves.png"
    elif run_rows:
        skipped["loss curves"] = "metrics.jsonl has no train/loss or val/loss"
    trial_rows = _records(lineage, "sweep", "trials.jsonl", skipped, "sweep curves")
    if trial_rows and report.plot_trials(trial_rows, f"{folder}/sweep_trials.png"):
        images["Sweep trials"] = "sweep_trials.png"
    if report.plot_metric_bars(metrics, f"{folder}/metrics.png"):
        images["Metrics"] = "metrics.png"

    gate_result = None
    if baseline is not None:
        # A harness guard that this evaluation did not produce is a misnamed metric, not a skipped measurement.
        gate_result = gate.compare(metrics, baseline[0], cfg.gate.guard_metrics, cfg.gate.max_regression_pct,
                                   baseline[1], lower_is_better=lower_is_better,
                                   expected=[g for g in cfg.gate.guard_metrics if g.startswith(gate.HARNESS_PREFIX)])
    model_info = {"name": mv.name, "version": mv.version, "uri": mv.uri}
    data = report.ReportData(title=f"Evaluation {cfg.name}: {mv.name}/{mv.version}", model=model_info,
                             metrics=metrics, skipped=skipped, sections=sections, images=images,
                             gate_table=gate.format_table(gate_result) if gate_result else None)
    # `config` holds the gate config (compare_to, gate) that `gate` was computed under, and `model_registered_at`
    # tells this registration of the version from an earlier one of the same number: promotion (runner.py) trusts
    # a stored verdict only when both match what is in force now.
    record = {"model": model_info, "name": cfg.name, "metrics": metrics, "skipped": skipped,
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
              "model_registered_at": lineage.get("registered_at"),
              "dataset": lineage.get("dataset"), "config": _plain(cfg),
              "gate": gate_result.to_dict() if gate_result else None}
    report.write_report(data, folder, record)
    report.publish(folder, out_uri)
    return EvalResult(output_uri=out_uri, model=model_info, metrics=metrics, skipped=skipped, gate=gate_result)


def _harness_tasks(cfg: EvalConfig):
    """lm-eval's tasks resolved up front (`harness.prepare`), or None; harness guards need harness tasks."""
    from llm_platform.evaluate.gate import HARNESS_PREFIX

    named = [g for g in cfg.gate.guard_metrics if g.startswith(HARNESS_PREFIX)]
    if named and not cfg.harness.tasks:
        raise ConfigError(f"eval.gate.guard_metrics names {', '.join(named)} but eval.harness.tasks is empty "
                          f"(set eval.harness.tasks=[...] to produce harness metrics)")
    if not cfg.harness.tasks:
        return None
    from llm_platform.evaluate import harness

    return harness.prepare(cfg.harness)


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


def _plain(cfg: EvalConfig) -> dict:
    from llm_platform.config import as_dict

    return as_dict(cfg)


def _human(cfg: EvalConfig, storage_root: str, tasks, outputs: list[str], folder: str,
           metrics: dict[str, float], skipped: dict[str, str]) -> dict:
    """Export blinded samples and/or import ratings (see `evaluate.human`)."""
    from llm_platform.evaluate import human

    section: dict[str, Any] = {}
    if cfg.human.num_samples > 0:
        if not tasks:
            skipped["human export"] = "no task file to sample prompts from (set eval.tasks_uri)"
        else:
            prompts = [t.prompt for t in tasks]
            systems = {"A": outputs}
            if cfg.human.compare_model:
                from llm_platform.evaluate import generation, models

                other = models.resolve(cfg.human.compare_model, storage_root)
                systems["B"] = generation.local_generator(models.load(other.uri), cfg.max_new_tokens,
                                                          cfg.batch_size)(prompts)
            section["export"] = human.export_samples(prompts, systems, cfg.human.num_samples, cfg.seed,
                                                     f"{folder}/human")
    if cfg.human.ratings_uri:
        # The key that un-blinds the ratings: the named export's, or the one exported just now.
        key_uri = (storage.join(cfg.human.export_uri, human.KEY) if cfg.human.export_uri
                   else f"{folder}/human/{human.KEY}")
        rates = human.import_ratings(cfg.human.ratings_uri, key_uri, confidence=cfg.bias.confidence)
        metrics.update({f"human/{k}": v for k, v in rates["metrics"].items()})
        section["ratings"] = rates
    return section
