"""`llm-platform run`: every stage in order, each skipped when its output for the same inputs and config exists.

    data -> train (or tune) -> register -> eval -> promote -> serve -> sample query

Only the promote stage moves LATEST. Register (and the sweep's registration of its winner) adds a version without
moving it; eval stores its `metrics.json` with the gate's verdict; promote reads that stored record and points
LATEST at the version only when the record is of exactly this version (this registration of it) and was computed
under the gate config in force (`eval.compare_to`, `eval.gate.*`), and its gate passed. An evaluation with no
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

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from llm_platform import layout, registry, storage
from llm_platform.config import PlatformConfig, as_dict
from llm_platform.config.evaluate import EvalConfig
from llm_platform.errors import ConfigError, StageError

log = logging.getLogger("llm_platform.run")
STAGES = ["data", "train", "register", "eval", "promote", "serve"]


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
            sweep = run_sweep(cfg.tune, cfg.model, cfg.train, cfg.scaling, dataset_uri, root, prices=cfg.plan.prices)
            return sweep, False, sweep.uri
        from llm_platform.train.launcher import launch

        result = launch(cfg.model, dataclasses.replace(cfg.train, register_as=None), cfg.scaling, dataset_uri, root,
                        connect=connect, prices=cfg.plan.prices)
        return result, result.reused, result.export_uri

    stage("train", train)

    def register():
        trained = state.get("train")
        if trained is None:  # a slice from register on: the version waiting for promotion
            mv = _newest_or_fail(root, model_name(cfg))
            return mv, True, mv.uri
        if cfg.run.use_tune:  # the sweep registered its winner already (without moving LATEST)
            mv = _sweep_version(root, trained)
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
    # The version this run evaluates and may promote: the one just registered, else (a slice that starts later)
    # the newest registered one.
    version: registry.ModelVersion | None = state.get("register")
    if version is None and {"eval", "promote"} & set(todo):
        version = _newest_or_fail(root, model_name(cfg))

    def evaluate():
        from llm_platform.evaluate.run import run_eval

        assert version is not None
        folder = eval_folder(cfg, version)
        verdict = stored_verdict(folder, version, cfg.eval)
        reused = verdict.passed is not None
        if not reused:
            if storage.exists(storage.join(folder, "metrics.json")):
                log.info("eval: %s; evaluating again", verdict.reason)
            eval_cfg = dataclasses.replace(cfg.eval, model=f"registry:{version.name}/{version.version}")
            run_eval(eval_cfg, root, connect=connect)
            verdict = stored_verdict(folder, version, cfg.eval)
            if verdict.passed is None:  # run_eval's record and promotion_verdict disagree: a bug, not bad input
                raise StageError(f"eval: the evaluation just written to {folder} cannot be read back: "
                                 f"{verdict.reason}")
        if verdict.passed is False:  # also with --until eval: the gate's verdict is an error, as `eval` exits 1
            raise StageError(_gate_failed(version, cfg.eval, verdict, folder))
        record = storage.read_json(storage.join(folder, "metrics.json"))
        return {"uri": folder, "metrics": record.get("metrics"), "gate": record.get("gate")}, reused, folder

    stage("eval", evaluate)

    def promote():
        assert version is not None
        folder = eval_folder(cfg, version)
        verdict = stored_verdict(folder, version, cfg.eval)
        ref = f"{version.name}/{version.version}"
        if verdict.passed is None:
            raise StageError(f"promote: {verdict.reason}; LATEST not moved. Evaluate it first: `llm-platform run "
                             f"--from eval` with the same overrides, or `llm-platform eval eval.model=registry:{ref}` "
                             f"with the same eval.* overrides")
        if verdict.passed is False:
            raise StageError(_gate_failed(version, cfg.eval, verdict, folder))
        if _latest_version(root, version.name) == version.version:
            return version, True, f"LATEST is {version.version} already ({verdict.reason})"
        registry.promote(root, version.name, version.version)
        log.info("promote: LATEST -> %s (%s)", ref, verdict.reason)
        return version, False, f"LATEST -> {version.version} ({verdict.reason})"

    stage("promote", promote)
    if "promote" not in todo and version is not None:
        held = _not_promoted(cfg, version)
        if held:
            log.info("promote: %s/%s %s", version.name, version.version, held)
            summary.stages["promote"] = {"result": "held", "seconds": 0.0, "output": held}

    def serve():
        from llm_platform.serve.app import deploy

        serve_cfg = dataclasses.replace(cfg.serve, model=f"registry:{model_name(cfg)}")
        connect()
        url = deploy(serve_cfg, root, storage.settings())
        summary.endpoint = url
        summary.sample = sample_query(url, cfg.run.query, cfg.serve.auth.api_key_env)
        return url, False, url

    stage("serve", serve)
    summary.chain = lineage_chain(root, model_name(cfg), state, summary.endpoint, version)
    storage.write_json(layout.last_run_status(root), {"finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                                                     "stages": summary.stages, "chain": summary.chain,
                                                     "sample": summary.sample})
    return summary


def _newest_or_fail(root: str, name: str) -> registry.ModelVersion:
    """The newest registered version of `name` (the candidate for promotion), which need not be LATEST."""
    versions = registry.list_versions(root, name)
    if not versions:
        raise StageError(f"model {name!r} has no registered version in {root}: run the train stage first "
                         f"(run.from_stage=train)")
    return versions[-1]


def _latest_version(root: str, name: str) -> str | None:
    """The version LATEST points at, or None when it points nowhere yet."""
    try:
        return registry.latest(root, name).version
    except registry.RegistryError:
        return None


def _sweep_version(root: str, sweep) -> registry.ModelVersion:
    """The version a sweep registered its winner as, from its record (also for a sweep finished earlier)."""
    ref = sweep.record.get("model_version")
    if not ref:
        raise StageError(f"sweep {sweep.uri} registered no model version (see its sweep.json): rerun it with another "
                         f"tune.name")
    return registry.get(root, ref["name"], ref["version"])


@dataclass
class Verdict:
    """What a stored evaluation says about making one version LATEST under the gate config in force."""

    passed: bool | None
    """True: a fresh evaluation whose gate passed (or that had none); False: its gate failed; None: no fresh one."""
    reason: str
    """Why, in words: the log line, the summary's output and the errors."""


def eval_folder(cfg: PlatformConfig, mv: registry.ModelVersion) -> str:
    """Where the eval stage writes (and promote reads) the evaluation of `mv`: `eval.output_uri` or the default."""
    return cfg.eval.output_uri or layout.evaluation(cfg.storage.root, mv.name, mv.version, cfg.eval.name)


def stored_verdict(folder: str, mv: registry.ModelVersion, eval_cfg: EvalConfig) -> Verdict:
    """The verdict of the evaluation stored in `folder` (its `metrics.json`) on `mv`; see `promotion_verdict`."""
    uri = storage.join(folder, "metrics.json")
    return promotion_verdict(storage.read_json(uri) if storage.exists(uri) else None, mv, eval_cfg, uri)


def promotion_verdict(record: dict | None, mv: registry.ModelVersion, eval_cfg: EvalConfig, uri: str = "") -> Verdict:
    """Whether an evaluation record (`metrics.json`, as `evaluate.run.run_eval` writes it) lets `mv` become LATEST.

    Fresh means: of this version, of this registration of it (a registry rebuilt from scratch numbers its versions
    from v0001 again, and an old evaluation of an old v0001 says nothing about the new one), and computed under
    the gate config in force (`eval.compare_to` and `eval.gate`). A record that is not fresh gives `passed=None`,
    never the old verdict.
    """
    ref = f"{mv.name}/{mv.version}"
    if record is None:
        return Verdict(None, f"no eval of {ref}")
    model = record.get("model") or {}
    if (model.get("name"), model.get("version")) != (mv.name, mv.version):
        return Verdict(None, f"the eval at {uri} is of {model.get('name')}/{model.get('version')}, not of {ref}")
    if record.get("model_registered_at") != mv.lineage.get("registered_at"):
        return Verdict(None, f"the eval at {uri} is of an earlier registration of {ref}")
    config = record.get("config") or {}
    gate_now, gate_then = as_dict(eval_cfg.gate), config.get("gate") or {}
    want = {"eval.compare_to": eval_cfg.compare_to, **{f"eval.gate.{k}": v for k, v in gate_now.items()}}
    have = {"eval.compare_to": config.get("compare_to"), **{f"eval.gate.{k}": gate_then.get(k) for k in gate_now}}
    changed = [f"{k}={have[k]} (in force: {want[k]})" for k in want if have[k] != want[k]]
    if changed:
        return Verdict(None, f"the eval at {uri} of {ref} was made under another gate config: {', '.join(changed)}")
    if eval_cfg.compare_to is None:
        return Verdict(True, "no gate: eval.compare_to is unset")
    gate = record.get("gate")
    if not gate or "passed" not in gate:
        return Verdict(None, f"the eval at {uri} of {ref} records no gate verdict")
    if gate["passed"]:
        return Verdict(True, f"gate passed against {eval_cfg.compare_to}")
    return Verdict(False, f"gate failed against {eval_cfg.compare_to}: " + "; ".join(gate.get("failures") or []))


def _not_promoted(cfg: PlatformConfig, mv: registry.ModelVersion) -> str | None:
    """Why this run's version is not LATEST when the promote stage was not selected (None: it is LATEST), for the
    summary: a version left behind silently looks like a deployment that happened."""
    latest = _latest_version(cfg.storage.root, mv.name)
    if latest == mv.version:
        return None
    stored = stored_verdict(eval_folder(cfg, mv), mv, cfg.eval)
    stays = f"LATEST stays {latest or 'unset'}"
    if stored.passed:
        return f"not promoted: the promote stage was not selected; {stays} (`--from promote` promotes it)"
    if stored.passed is None:
        return f"not promoted: {stored.reason}; {stays} (`--from eval` evaluates and promotes it)"
    return f"not promoted: {stored.reason}; {stays}"


def _gate_failed(mv: registry.ModelVersion, eval_cfg: EvalConfig, result: Verdict, folder: str) -> str:
    return (f"{mv.name}/{mv.version} regressed against {eval_cfg.compare_to} ({result.reason}); LATEST not moved "
            f"(see the eval report in {folder})")


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


def describe_cost(cost: dict[str, Any] | None) -> str | None:
    """A run's lineage `cost` in a line: `$12.3 (4 GPU-hours, 0.5 h; on_demand prices as of 2025-07-01)`."""
    if not cost:
        return None
    usd = "unpriced" if cost.get("cost_usd") is None else f"${cost['cost_usd']:.4g}"
    return (f"{usd} ({cost.get('gpu_hours', 0):.3g} GPU-hours, {cost.get('hours', 0):.3g} h; "
            f"{cost.get('market')} prices as of {cost.get('prices_as_of')})")


def lineage_chain(root: str, name: str, state: dict[str, Any], endpoint: str | None,
                  version: registry.ModelVersion | None = None) -> dict[str, Any]:
    """Dataset -> tokenizer -> run -> sweep -> version -> eval report -> endpoint, from the stored records.

    The version is this run's (`version`, else the register stage's), else LATEST's."""
    try:
        mv = version or state.get("register") or registry.latest(root, name)
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
        "run_cost": describe_cost(lineage.get("cost")),
        "model_version": f"{mv.name}/{mv.version}",
        "model_uri": mv.uri,
        "eval_report": evaluation.get("uri"),
        "endpoint": endpoint,
    }
