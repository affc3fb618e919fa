"""Fast stand-ins for the expensive stage functions of `runner.run_all` (`runner/stages.py`), for the promotion tests.

Each fake writes what the real function writes and the runner reads back, in a real local storage root: a data
manifest, a run's `export/` (config.json) and `lineage.json`, a sweep's `sweep.json`, an evaluation's
`metrics.json`. Everything around them is real: the registry, `tune.driver.register_winner` (the sweep's
registration), `evaluate.gate` (baseline loading and the comparison) and the runner's own register, eval-reuse and
promote logic. A model's quality is a plain function of its config, `PERPLEXITY[train.max_steps]`, so a test can
say in advance which version passes which gate.

`tests/unit/test_runner_promote.py::test_the_real_run_eval_record_gives_the_verdicts_the_fake_one_does` checks
that the real `run_eval` writes a record the runner reads the same way as the fake's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from types import SimpleNamespace

from llm_platform import registry, storage
from llm_platform.config import PlatformConfig, as_dict
from llm_platform.config.choices import Stage
from llm_platform.config.evaluate import EvalConfig, GateConfig
from llm_platform.errors import ConfigError
from llm_platform.storage import layout

# train.max_steps -> the val/perplexity its model scores (lower is better).
PERPLEXITY = {10: 9.0, 20: 10.0, 30: 8.0, 40: 20.0}
ENDPOINT = "http://fake-endpoint"


def config(root: str, *, max_steps: int = 10, use_tune: bool = False, compare_to: str | None = None,
           max_regression_pct: float = 5.0, from_stage: str | None = None,
           until_stage: str | None = None, stages: list[str] | None = None) -> PlatformConfig:
    """The default config with what the promotion tests vary (no Hydra compose: thousands of runs)."""
    cfg = PlatformConfig()
    cfg.storage = dataclasses.replace(cfg.storage, root=root)
    cfg.train = dataclasses.replace(cfg.train, max_steps=max_steps)
    # One sweep per base config: the real driver refuses a finished sweep name with another config.
    cfg.tune = dataclasses.replace(cfg.tune, name=f"sweep-{max_steps}")
    cfg.eval = dataclasses.replace(cfg.eval, compare_to=compare_to,
                                   gate=GateConfig(guard_metrics=["val/perplexity"],
                                                   max_regression_pct=max_regression_pct))
    # Stage names as the Enums compose gives (a name outside the set fails there, before the runner sees it).
    cfg.run = dataclasses.replace(cfg.run, use_tune=use_tune, from_stage=_stage(from_stage),
                                  until_stage=_stage(until_stage), keep_serving=False,
                                  **({"stages": [Stage(s) for s in stages]} if stages is not None else {}))
    return cfg


def _stage(name: str | None) -> Stage | None:
    return None if name is None else Stage(name)


def install(monkeypatch) -> dict:
    """Replace the expensive stage functions where the runner looks them up; returns a dict the fakes record
    their calls in (`evals`: how many evaluations ran, `served`: the versions deployed)."""
    import llm_platform.data.pipeline as pipeline
    import llm_platform.evaluate.run as eval_run
    import llm_platform.runner.stages as stages
    import llm_platform.serve.app as serve_app
    import llm_platform.train.launcher as launcher
    import llm_platform.tune.driver as driver

    calls: dict = {"evals": 0, "served": []}

    def counted_eval(cfg, storage_root, *, connect=None):
        calls["evals"] += 1
        return run_eval(cfg, storage_root, connect=connect)

    def recorded_deploy(cfg, storage_root=None, storage_settings=None):
        url = deploy(cfg, storage_root, storage_settings)
        calls["served"].append(registry.resolve(cfg.model, storage_root).version)
        return url

    monkeypatch.setattr(pipeline, "build_dataset", build_dataset)
    monkeypatch.setattr(pipeline, "resolve_dataset", resolve_dataset)
    monkeypatch.setattr(launcher, "launch", launch)
    monkeypatch.setattr(driver, "run_sweep", run_sweep)
    monkeypatch.setattr(eval_run, "run_eval", counted_eval)
    monkeypatch.setattr(serve_app, "deploy", recorded_deploy)
    monkeypatch.setattr(stages, "sample_query", lambda url, prompt, key_env: {"prompt": prompt, "completion": "ok"})
    return calls


def _dataset_uri(cfg, root: str) -> str:
    return layout.dataset(root, cfg.name, "fake")


def build_dataset(cfg, tok, root: str, *, connect=None, **_):
    uri = _dataset_uri(cfg, root)
    manifest = storage.join(uri, "manifest.json")
    reused = storage.exists(manifest)
    if not reused:
        storage.write_json(manifest, {"name": cfg.name})
    return SimpleNamespace(uri=uri, reused=reused)


def resolve_dataset(cfg, tok, root: str) -> str | None:
    uri = _dataset_uri(cfg, root)
    return uri if storage.exists(storage.join(uri, "manifest.json")) else None


def launch(model, train, scaling, dataset_uri: str, storage_root: str, *, run_name: str | None = None,
           callbacks=None, extra_lineage: dict | None = None, connect=None, prices=None):
    """A finished run: export/config.json and lineage.json (last), reused when it finished with this config."""
    from llm_platform.train.launcher import TrainResult

    run_name = run_name or f"{model.name}-{train.max_steps}"
    run_uri = layout.run(storage_root, run_name)
    export_uri = storage.join(run_uri, "export")
    config_record = {"model": as_dict(model), "train": as_dict(train), "scaling": as_dict(scaling)}
    lineage_uri = storage.join(run_uri, "lineage.json")
    if storage.exists(lineage_uri):
        lineage = storage.read_json(lineage_uri)
        if lineage["run"]["config"] == config_record:
            return TrainResult(run_uri=run_uri, export_uri=export_uri, checkpoint_uri=None,
                               metrics=lineage["run"]["metrics"], lineage=lineage, reused=True)
    metrics = {"val/loss": PERPLEXITY[train.max_steps] / 10, "val/perplexity": PERPLEXITY[train.max_steps]}
    storage.write_json(storage.join(export_uri, "config.json"), {"model_type": "gpt2", "max_steps": train.max_steps})
    lineage = {"kind": "run", "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
               "dataset": {"uri": dataset_uri}, "run": {"name": run_name, "uri": run_uri, "config": config_record,
                                                        "metrics": metrics},
               "sweep": None, **(extra_lineage or {})}
    storage.write_json(lineage_uri, lineage)
    return TrainResult(run_uri=run_uri, export_uri=export_uri, checkpoint_uri=None, metrics=metrics, lineage=lineage)


def run_sweep(tune_cfg, model, train, scaling, dataset_uri: str, storage_root: str, *, register: bool = True,
              callbacks=None, prices=None):
    """A one-trial sweep whose winner is registered by the real `register_winner`; sweep.json last."""
    from llm_platform.tune.driver import SweepResult, register_winner
    from llm_platform.tune.summary import FINISHED, TrialRecord

    sweep_uri = layout.sweep(storage_root, tune_cfg.name)
    fingerprint = storage.fingerprint({"tune": {k: v for k, v in as_dict(tune_cfg).items() if k != "resume"},
                                       "model": as_dict(model), "train": as_dict(train), "dataset": dataset_uri})
    record_uri = storage.join(sweep_uri, "sweep.json")
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        if record["fingerprint"] != fingerprint:
            raise ConfigError(f"sweep {sweep_uri} already finished with another config: choose another tune.name")
        return SweepResult(name=tune_cfg.name, uri=sweep_uri, record=record)
    trial_id = "t0001"
    result = launch(model, train, scaling, dataset_uri, storage_root, run_name=f"{tune_cfg.name}-{trial_id}",
                    extra_lineage={"sweep": {"name": tune_cfg.name, "uri": sweep_uri, "trial_id": trial_id}})
    winner = TrialRecord(trial_id=trial_id, params={}, status=FINISHED, run_uri=result.run_uri,
                         export_uri=result.export_uri,
                         reports=[{"training_iteration": 1, "step": train.max_steps, **result.metrics}])
    version = register_winner(storage_root, tune_cfg.register_as or model.name, winner, tune_cfg, sweep_uri) \
        if register else None
    record = {"name": tune_cfg.name, "uri": sweep_uri, "fingerprint": fingerprint,
              "winner": {"trial_id": trial_id, "run_uri": result.run_uri, "export_uri": result.export_uri},
              "model_version": ({"name": version.name, "version": version.version, "uri": version.uri}
                                if version else None)}
    storage.write_json(record_uri, record)
    return SweepResult(name=tune_cfg.name, uri=sweep_uri, trials=[winner], winner=winner, model_version=version,
                       record=record)


def run_eval(cfg: EvalConfig, storage_root: str, *, connect=None):
    """The evaluation record `evaluate.run.run_eval` writes, with the real baseline loading and gate."""
    from llm_platform.evaluate import gate, scoring
    from llm_platform.evaluate.run import EvalResult

    mv = scoring.resolve(cfg.model, storage_root)
    baseline = gate.load_baseline(storage_root, mv.name, cfg.compare_to, cfg.name) if cfg.compare_to else None
    metrics = {"val/perplexity": float(mv.lineage["run"]["metrics"]["val/perplexity"])}
    result = None
    if baseline is not None:
        result = gate.compare(metrics, baseline[0], cfg.gate.guard_metrics, cfg.gate.max_regression_pct, baseline[1])
    model_info = {"name": mv.name, "version": mv.version, "uri": mv.uri}
    out_uri = cfg.output_uri or layout.evaluation(storage_root, mv.name, mv.version, cfg.name)
    storage.write_json(storage.join(out_uri, "metrics.json"), {
        "model": model_info, "name": cfg.name, "metrics": metrics, "skipped": {},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "model_registered_at": mv.lineage.get("registered_at"), "dataset": mv.lineage.get("dataset"),
        "config": as_dict(cfg), "gate": result.to_dict() if result else None})
    return EvalResult(output_uri=out_uri, model=model_info, metrics=metrics, gate=result)


def deploy(cfg, storage_root=None, storage_settings=None) -> str:
    registry.resolve(cfg.model, storage_root)  # as the real app: LATEST must point at a complete version
    return ENDPOINT


def latest(root: str, name: str = "debug") -> str | None:
    """The version LATEST points at, or None."""
    try:
        return registry.latest(root, name).version
    except registry.RegistryError:
        return None
