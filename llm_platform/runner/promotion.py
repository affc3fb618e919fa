"""When a stored evaluation lets a version become LATEST: the promote stage's rule (see `runner/__init__.py`).

An evaluation (`metrics.json`, as `evaluate.run.run_eval` writes it) counts only when it is fresh: of exactly this
version, of this registration of it, and computed under the gate config in force (`eval.compare_to`, `eval.gate.*`).
A stale record never lends its old verdict: the eval stage evaluates again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llm_platform import registry, storage
from llm_platform.config import PlatformConfig
from llm_platform.config.evaluate import EvalConfig
from llm_platform.storage import layout


def latest_version(root: str, name: str) -> str | None:
    """The version LATEST points at, or None when it points nowhere yet."""
    try:
        return registry.latest(root, name).version
    except registry.RegistryError:
        return None


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
    gate_now, gate_then = dataclasses.asdict(eval_cfg.gate), config.get("gate") or {}
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


def not_promoted(cfg: PlatformConfig, mv: registry.ModelVersion) -> str | None:
    """Why this run's version is not LATEST when the promote stage was not selected (None: it is LATEST), for the
    summary: a version left behind silently looks like a deployment that happened."""
    latest = latest_version(cfg.storage.root, mv.name)
    if latest == mv.version:
        return None
    stored = stored_verdict(eval_folder(cfg, mv), mv, cfg.eval)
    stays = f"LATEST stays {latest or 'unset'}"
    if stored.passed:
        return f"not promoted: the promote stage was not selected; {stays} (`--from promote` promotes it)"
    if stored.passed is None:
        return f"not promoted: {stored.reason}; {stays} (`--from eval` evaluates and promotes it)"
    return f"not promoted: {stored.reason}; {stays}"


def gate_failed(mv: registry.ModelVersion, eval_cfg: EvalConfig, result: Verdict, folder: str) -> str:
    return (f"{mv.name}/{mv.version} regressed against {eval_cfg.compare_to} ({result.reason}); LATEST not moved "
            f"(see the eval report in {folder})")
