"""`llm-platform run`: every stage in order, each skipped when its output for the same inputs and config exists.

    data -> train (or tune) -> register -> eval -> promote -> serve -> sample query

The new version is registered without moving LATEST, evaluated, and promoted only when the evaluation's gate (when
`eval.compare_to` is set) passes; serving then loads `registry:<name>` (LATEST). Each stage reads the previous
stage's output from storage, as if it ran alone. The lineage chain (dataset, tokenizer, run, sweep, version, eval
report, endpoint) is written to `status/last_run.json` for `llm-platform status`.

This is an orchestrator over the stages' library functions, so like an entry point it sees the whole config.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from llm_platform import layout, registry, storage
from llm_platform.config import PlatformConfig
from llm_platform.errors import ConfigError, StageError

log = logging.getLogger("llm_platform.run")
STAGES = ["data", "train", "register", "eval", "serve"]


@dataclass
class RunSummary:
    """What each stage did (ran or skipped), how long it took, and the lineage chain."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    chain: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None
    sample: dict[str, Any] | None = None

    def table(self) -> str:
        lines = [f"{'stage':<10}{'result':<10}{'seconds':>9}  output"]
        for name, rec in self.stages.items():
            lines.append(f"{name:<10}{rec['result']:<10}{rec['seconds']:>9.1f}  {rec.get('output', '')}")
        if self.sample:
            lines.append(f"sample query: {self.sample['prompt']!r} -> {self.sample['completion']!r}")
        return "\n".join(lines)


def selected_stages(cfg: PlatformConfig) -> list[str]:
    """The configured stages, cut to `run.from_stage`..`run.until_stage` (names as in STAGES; tune counts as train)."""
    stages = ["train" if s == "tune" else s for s in cfg.run.stages]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {unknown}; choose from {STAGES}")
    for key, value in (("run.from_stage", cfg.run.from_stage), ("run.until_stage", cfg.run.until_stage)):
        if value is not None and ("train" if value == "tune" else value) not in stages:
            raise ConfigError(f"{key}={value!r} is not one of the run's stages {stages}")
    start = stages.index("train" if cfg.run.from_stage == "tune" else cfg.run.from_stage) if cfg.run.from_stage else 0
    stop = (stages.index("train" if cfg.run.until_stage == "tune" else cfg.run.until_stage) + 1
            if cfg.run.until_stage else len(stages))
    return stages[start:stop]


def model_name(cfg: PlatformConfig) -> str:
    return cfg.tune.register_as or cfg.train.register_as or cfg.model.name


def run_all(cfg: PlatformConfig, connect=None) -> RunSummary:
    """Run the selected stages; a stage whose output exists with the same inputs and config is skipped.

    `connect` (the entry point's `cluster.connect(cfg.cluster)`) is called when a stage first needs Ray, so a run
    whose stages are all done starts none; None: Ray is connected already."""
    connect = connect or (lambda: None)
    from llm_platform.data.pipeline import build_dataset, resolve_dataset

    summary = RunSummary()
    todo = selected_stages(cfg)
    root = cfg.storage.root
    state: dict[str, Any] = {}

    def stage(name: str, fn) -> None:
        if name not in todo:
            return
        start = time.perf_counter()
        result, skipped, output = fn()
        state[name] = result
        summary.stages[name] = {"result": "skipped" if skipped else "ran", "seconds": time.perf_counter() - start,
                                "output": output}
        log.info("%s: %s in %.1fs -> %s", name, summary.stages[name]["result"], summary.stages[name]["seconds"], output)

    def data():
        result = build_dataset(cfg.data, cfg.tokenizer, root, connect=connect)
        return result.uri, result.reused, result.uri

    stage("data", data)
    dataset_uri = state.get("data") or cfg.train.dataset or resolve_dataset(cfg.data, cfg.tokenizer, root)

    def train():
        if not dataset_uri:
            raise StageError(f"no finished dataset for data.name={cfg.data.name!r} with this data and tokenizer config "
                             f"under {root}: start the run at the data stage (--from data), give the same overrides "
                             f"as the run that built it, or set train.dataset=<dataset folder>")
        if cfg.run.use_tune:
            from llm_platform.tune.driver import run_sweep

            connect()
            sweep = run_sweep(cfg.tune, cfg.model, cfg.train, cfg.scaling, dataset_uri, root)
            return sweep, False, sweep.uri
        from llm_platform.train.launcher import launch

        result = launch(cfg.model, dataclasses.replace(cfg.train, register_as=None), cfg.scaling, dataset_uri, root,
                        connect=connect)
        return result, result.reused, result.export_uri

    stage("train", train)

    def register():
        trained = state.get("train")
        if trained is None:
            return _latest_or_fail(root, model_name(cfg)), True, "LATEST"
        if cfg.run.use_tune:  # the sweep registered its winner already
            mv = registry.latest(root, model_name(cfg))
            return mv, True, mv.uri
        existing = [v for v in registry.list_versions(root, model_name(cfg))
                    if v.lineage.get("source_uri") == trained.export_uri
                    and v.lineage.get("run", {}).get("config") == trained.lineage["run"]["config"]
                    and v.lineage.get("created_at") == trained.lineage.get("created_at")]
        if existing:
            return existing[-1], True, existing[-1].uri
        mv = registry.register(root, model_name(cfg), trained.export_uri, trained.lineage, make_latest=False)
        return mv, False, mv.uri

    stage("register", register)
    version = state.get("register")

    def evaluate():
        from llm_platform.evaluate.run import run_eval

        mv = version or _latest_or_fail(root, model_name(cfg))
        eval_cfg = dataclasses.replace(cfg.eval, model=f"registry:{mv.name}/{mv.version}")
        out = layout.eval_metrics(root, mv.name, mv.version, eval_cfg.name)
        if storage.exists(out):
            return {"uri": out, "metrics": storage.read_json(out), "gate": None}, True, out
        result = run_eval(eval_cfg, root, connect=connect)
        return {"uri": result.output_uri, "metrics": result.metrics, "gate": result.gate}, False, result.output_uri

    stage("eval", evaluate)
    if version is not None:
        gate = (state.get("eval") or {}).get("gate")
        if gate is not None and not gate.passed:
            raise StageError(f"{version.name}/{version.version} regressed against {cfg.eval.compare_to}; "
                             f"LATEST not moved (see the eval report)")
        registry.promote(root, version.name, version.version)

    def serve():
        from llm_platform.serve.app import deploy

        serve_cfg = dataclasses.replace(cfg.serve, model=f"registry:{model_name(cfg)}")
        connect()
        url = deploy(serve_cfg, root, storage.settings())
        summary.endpoint = url
        summary.sample = sample_query(url, cfg.run.query, cfg.serve.auth.api_key_env)
        return url, False, url

    stage("serve", serve)
    summary.chain = lineage_chain(root, model_name(cfg), state, summary.endpoint)
    storage.write_json(layout.last_run_status(root), {"finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                                                     "stages": summary.stages, "chain": summary.chain,
                                                     "sample": summary.sample})
    return summary


def _latest_or_fail(root: str, name: str) -> registry.ModelVersion:
    try:
        return registry.latest(root, name)
    except registry.RegistryError as e:
        raise StageError(f"{e}: run the train stage first (run.from_stage=train)") from None


def sample_query(url: str, prompt: str, api_key_env: str) -> dict[str, Any]:
    """One completion against the endpoint, through the OpenAI API."""
    import os

    import httpx

    key = (os.environ.get(api_key_env) or "").split(",")[0].strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["data"]
    body = {"model": models[0]["id"], "prompt": prompt, "max_tokens": 32, "temperature": 0.7, "seed": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    reply.raise_for_status()
    return {"prompt": prompt, "completion": reply.json()["choices"][0]["text"], "model": models[0]["id"]}


def lineage_chain(root: str, name: str, state: dict[str, Any], endpoint: str | None) -> dict[str, Any]:
    """Dataset -> tokenizer -> run -> sweep -> version -> eval report -> endpoint, from the stored records."""
    try:
        mv = state.get("register") or registry.latest(root, name)
    except registry.RegistryError:
        return {"dataset": state.get("data")}
    lineage = mv.lineage
    evaluation = state.get("eval") or {}
    return {
        "dataset": (lineage.get("dataset") or {}).get("uri") or state.get("data"),
        "dataset_fingerprint": (lineage.get("dataset") or {}).get("fingerprint"),
        "tokenizer_sha256": (lineage.get("dataset") or {}).get("tokenizer_sha256"),
        "run": (lineage.get("run") or {}).get("uri"),
        "sweep": (lineage.get("sweep") or {}).get("uri") if lineage.get("sweep") else None,
        "model_version": f"{mv.name}/{mv.version}",
        "model_uri": mv.uri,
        "eval_report": evaluation.get("uri"),
        "endpoint": endpoint,
    }
