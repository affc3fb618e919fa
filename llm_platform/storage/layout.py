"""Where each artifact lives under `storage.root`: the one module that spells the storage layout out.

    datasets/<name>/<fingerprint>/       the data stage's output (manifest.json last)
    corpora/sample-n<N>-s<seed>/         the built-in sample corpus
    runs/<run_name>/                     a training run (checkpoints, metrics, export/, lineage.json last)
    sweeps/<sweep_name>/                 a Tune sweep
    registry/<model>/<version>/          registered model versions (LATEST beside them)
    evals/<model>/<version>/<name>/      an evaluation (metrics.json, reports)
    status/last_run.json                 the last `llm-platform run`

Every stage asks here rather than joining folder names itself (docs/ARCHITECTURE.md, "Storage layout").
"""

from __future__ import annotations

from llm_platform.storage.uri import join


def datasets(root: str) -> str:
    return join(root, "datasets")


def dataset(root: str, name: str, fingerprint: str) -> str:
    return join(root, "datasets", name, fingerprint)


def sample_corpus(root: str, num_documents: int, seed: int) -> str:
    return join(root, "corpora", f"sample-n{num_documents}-s{seed}", "sample.jsonl")


def runs(root: str) -> str:
    return join(root, "runs")


def run(root: str, run_name: str) -> str:
    return join(root, "runs", run_name)


def sweeps(root: str) -> str:
    return join(root, "sweeps")


def sweep(root: str, sweep_name: str) -> str:
    return join(root, "sweeps", sweep_name)


def registry(root: str) -> str:
    return join(root, "registry")


def registered_model(root: str, name: str) -> str:
    return join(root, "registry", name)


def evaluation(root: str, model: str, version: str, eval_name: str) -> str:
    return join(root, "evals", model, version, eval_name)


def eval_metrics(root: str, model: str, version: str, eval_name: str) -> str:
    return join(evaluation(root, model, version, eval_name), "metrics.json")


def last_run_status(root: str) -> str:
    return join(root, "status", "last_run.json")
