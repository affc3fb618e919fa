"""lm-evaluation-harness (`lm_eval`, the `harness` extra) in the eval stage: its tasks against the model under test.

In process, lm-eval's `hf` model loads the version's HF folder (safetensors only; `eval.harness.device`/`dtype`).
Through `eval.endpoint`, its `local-completions` client sends token ids to our `/v1/completions`: loglikelihood and
multiple-choice tasks ask for `echo` + `logprobs` with `max_tokens=1` and read the prompt tokens' logprobs,
generation tasks ask for greedy completions; with `eval.harness.apply_chat_template` its `local-chat-completions`
client sends chats to `/v1/chat/completions` instead (generation tasks only: chat answers carry no prompt logprobs).
Either way lm-eval tokenizes with the version's own tokenizer folder, so nothing about the model comes from a hub.
Tasks are lm-eval's built-in YAMLs (their datasets download where a hub is reachable) or a folder of our own.

Scores become `harness/<task>/<metric>`, or `harness/<task>/<metric>/<filter>` for a filter other than lm-eval's
`none`; standard errors and sample counts go to the report's harness table, not to the metrics the gate compares.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llm_platform import storage
from llm_platform.config.evaluate import HarnessConfig
from llm_platform.errors import ConfigError, StageError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'llm-platform[harness]'"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@dataclass
class HarnessTasks:
    """Validated task names and the index that knows them (from `prepare`)."""

    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    folder: str | None  # eval.harness.include_path as an absolute local folder
    downloaded: bool = False  # `folder` is a temporary copy of an s3:// folder, removed after the run


@dataclass
class HarnessResult:
    """What one harness run produced."""

    metrics: dict[str, float]
    lower_is_better: list[str]  # metric names whose regression is an increase (lm-eval's higher_is_better=False)
    rows: list[dict] = field(default_factory=list)  # the report's table: task, metric, filter, value, stderr, n
    mode: str = ""
    lm_eval_version: str = ""


def require_lm_eval():
    """The `lm_eval` module, or a ConfigError that says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"eval.harness.tasks is set but lm-evaluation-harness is not installed: "
                          f"{INSTALL_HINT}") from None
    return lm_eval


def prepare(cfg: HarnessConfig) -> HarnessTasks:
    """Check the install, fetch `include_path` and resolve every task name, before any model loads.

    Raises:
        ConfigError: lm_eval missing, no folder at `include_path`, or a name lm-eval does not know.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    folder = _task_folder(cfg.include_path) if cfg.include_path else None
    downloaded = bool(cfg.include_path and storage.is_remote(cfg.include_path))
    names = list(cfg.tasks)
    if cfg.include_builtin is None:
        # The built-in index reads ~15k YAML files; skip it when the folder has every task asked for.
        manager = TaskManager(include_path=folder, include_defaults=False) if folder else None
        if manager is None or any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=folder, include_defaults=True)
    else:
        manager = TaskManager(include_path=folder, include_defaults=cfg.include_builtin)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        places = ["lm-eval's built-in tasks"] if cfg.include_builtin is not False else []
        places += [f"eval.harness.include_path={cfg.include_path}"] if folder else []
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        suggest = "; ".join(f"{n}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
        if downloaded and folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"eval.harness.tasks: no task, group or tag named {', '.join(unknown)} in "
                          f"{' or '.join(places) or 'nothing (eval.harness.include_builtin=false, no include_path)'}"
                          + (f" ({suggest})" if suggest else ""))
    return HarnessTasks(names=names, manager=manager, folder=folder, downloaded=downloaded)


def _task_folder(uri: str) -> str:
    """A local folder with the task YAMLs and their data (an s3:// folder is downloaded to a temporary one)."""
    if not storage.isdir(uri):
        raise ConfigError(f"eval.harness.include_path: no folder at {uri}")
    if storage.is_remote(uri):
        return storage.download_dir(uri, tempfile.mkdtemp(prefix="llmp-harness-tasks-"))
    return os.path.abspath(storage.filesystem(uri)[1])


def _tokenizer_folder(model_uri: str) -> str:
    """The version's config and tokenizer files, locally; for s3:// without the weights (the endpoint has them)."""
    if not storage.is_remote(model_uri):
        return os.path.abspath(storage.filesystem(model_uri)[1])
    local = tempfile.mkdtemp(prefix="llmp-harness-tokenizer-")
    for name in storage.listdir(model_uri):
        if not name.endswith(WEIGHT_SUFFIXES) and not storage.isdir(storage.join(model_uri, name)):
            storage.write_bytes(os.path.join(local, name), storage.read_bytes(storage.join(model_uri, name)))
    return local


def context_length(folder: str) -> int | None:
    """Positions the model accepts, from its config.json; None when it names none (T5's relative positions)."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    config = storage.read_json(path)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _eos_token(folder: str) -> str | None:
    path = os.path.join(folder, "tokenizer_config.json")
    eos = storage.read_json(path).get("eos_token") if os.path.exists(path) else None
    return eos.get("content") if isinstance(eos, dict) else eos


def _has_chat_template(folder: str) -> bool:
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(path) and storage.read_json(path).get("chat_template"):
        return True
    return any(os.path.exists(os.path.join(folder, n)) for n in ("chat_template.jinja", "chat_template.json"))


def model_spec(cfg: HarnessConfig, folder: str, *, endpoint: str | None, endpoint_model: str,
               timeout_s: float) -> tuple[str, dict[str, Any], str]:
    """lm-eval's model name and arguments for in-process or endpoint mode, and a label for the report.

    Args:
        folder: the version's files, local and absolute (only config and tokenizer files in endpoint mode).
    """
    if endpoint:
        args: dict[str, Any] = {"model": endpoint_model, "num_concurrent": cfg.num_concurrent,
                                "max_retries": cfg.max_retries, "timeout": max(1, math.ceil(timeout_s))}
        length = cfg.max_length_tokens or context_length(folder)
        if length:
            # lm-eval keeps prompts to length-1 tokens plus the one it asks for, within the server's context check.
            args["max_length"] = length
        base = endpoint.rstrip("/")
        if cfg.apply_chat_template:
            # No tokenizer on this path (the server applies the template), so name the EOS stop string here.
            eos = _eos_token(folder)
            return "local-chat-completions", {**args, "base_url": f"{base}/chat/completions",
                                              **({"eos_string": eos} if eos else {})}, \
                f"endpoint {base}/chat/completions (lm-eval local-chat-completions)"
        args.update(base_url=f"{base}/completions", tokenizer=folder, tokenizer_backend="huggingface",
                    tokenized_requests=True)
        return "local-completions", args, f"endpoint {base}/completions (lm-eval local-completions)"
    args = {"pretrained": folder, "tokenizer": folder, "device": cfg.device, "dtype": cfg.dtype,
            "trust_remote_code": False,
            # Passed through to from_pretrained: weights only from safetensors, as everywhere else in the stage.
            "use_safetensors": True}
    if cfg.max_length_tokens:
        args["max_length"] = cfg.max_length_tokens
    return "hf", args, f"in process (lm-eval hf, {cfg.device}, {cfg.dtype})"


def run_harness(cfg: HarnessConfig, tasks: HarnessTasks, model_uri: str, *, endpoint: str | None = None,
                endpoint_model: str = "", timeout_s: float = 60.0, batch_size: int = 8,
                seed: int = 0) -> HarnessResult:
    """Run `tasks` with `lm_eval.simple_evaluate` and turn its results into metrics and report rows.

    Args:
        cfg: the `eval.harness` node.
        tasks: from `prepare`.
        model_uri: the version's HF folder (local or s3://).
        endpoint: `eval.endpoint` (`http://host:8000/v1`); None runs in process.
        endpoint_model: model name the endpoint serves.
        timeout_s: timeout of one endpoint request, in seconds.
        batch_size: prompts per forward pass in process, prompts per request through the endpoint.
        seed: seeds lm-eval's python, numpy, torch and few-shot sampling.
    """
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate

    from llm_platform import registry

    # Absolute paths: lm-eval runs with the task folder as working directory (see `_working_dir`).
    folder = _tokenizer_folder(model_uri) if endpoint else os.path.abspath(registry.materialize(model_uri))
    # Temporary copies to remove afterwards: a downloaded task folder, an s3:// version's tokenizer files.
    temporary = [tasks.folder] if tasks.downloaded and tasks.folder else []
    temporary += [folder] if endpoint and storage.is_remote(model_uri) else []
    model, args, mode = model_spec(cfg, folder, endpoint=endpoint, endpoint_model=endpoint_model,
                                   timeout_s=timeout_s)
    if endpoint:
        check_endpoint(endpoint.rstrip("/"), endpoint_model, timeout_s)
    elif cfg.apply_chat_template and not _has_chat_template(folder):
        # The server falls back to a default template; lm-eval's hf model would fail deep in transformers instead.
        raise ConfigError(f"eval.harness.apply_chat_template=true but the tokenizer in {model_uri} has no chat "
                          f"template (run through eval.endpoint, whose server has a default one, or set it false)")
    if model == "local-chat-completions":
        batch_size = 1  # one conversation per chat request
    log.info("lm-eval %s on %s: %s", getattr(lm_eval, "__version__", "?"), ", ".join(tasks.names), mode)
    try:
        with _working_dir(tasks.folder):
            results = simple_evaluate(
                model=model, model_args=args, tasks=tasks.names, task_manager=tasks.manager,
                num_fewshot=cfg.num_fewshot, limit=cfg.limit, batch_size=batch_size,
                apply_chat_template=cfg.apply_chat_template, bootstrap_iters=cfg.bootstrap_iters,
                gen_kwargs={"max_gen_toks": cfg.max_gen_tokens} if cfg.max_gen_tokens else None,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed)
    except NotImplementedError as e:
        if model != "local-chat-completions":
            raise
        # local-chat-completions has no prompt logprobs, so loglikelihood tasks cannot run through chat.
        raise ConfigError(f"eval.harness.apply_chat_template=true through eval.endpoint runs generation tasks "
                          f"only; {', '.join(tasks.names)} needs log-likelihoods ({e})") from None
    finally:
        for path in temporary:
            shutil.rmtree(path, ignore_errors=True)
    metrics, lower, rows = to_metrics(results or {})
    return HarnessResult(metrics=metrics, lower_is_better=lower, rows=rows, mode=mode,
                         lm_eval_version=_version())


def check_endpoint(base: str, model: str, timeout_s: float) -> None:
    """One `GET /models` first, so that a wrong URL, key or model name fails in one line, not after lm-eval's retries.

    lm-eval sends `OPENAI_API_KEY` as the Bearer key, so that is the key checked here.
    """
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{base}/models",
                                     headers={"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            served = [m.get("id") for m in json.load(reply).get("data") or []]
    except urllib.error.HTTPError as e:
        hint = " (lm-eval sends OPENAI_API_KEY as the key)" if e.code == 401 else ""
        raise StageError(f"eval.endpoint={base}: GET /models answered {e.code}{hint}") from None
    except OSError as e:
        raise StageError(f"eval.endpoint={base}: not reachable ({e})") from None
    if served and model not in served:
        raise ConfigError(f"eval.endpoint_model={model!r} is not served at {base} (it serves {', '.join(served)})")


@contextlib.contextmanager
def _working_dir(folder: str | None) -> Iterator[None]:
    """The task folder as the working directory while lm-eval loads and runs the tasks.

    Ugly but deliberate: `datasets.load_dataset` resolves a task YAML's relative `data_files` against the working
    directory, and this is what lets a task folder name its data files relative to itself wherever it was copied
    to (an s3:// folder lands in a temporary one). The stage runs nothing else in this process meanwhile.
    """
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" for a stderr it did not compute
    return float(value) if math.isfinite(value) else None


def to_metrics(results: dict) -> tuple[dict[str, float], list[str], list[dict]]:
    """`simple_evaluate`'s results as (metrics, lower-is-better names, report rows).

    lm-eval keys a score as `"<metric>,<filter>"` under `results[task]` (and groups' aggregates under
    `groups[group]`), with `"<metric>_stderr,<filter>"` beside it and the direction in `higher_is_better`.
    """
    metrics: dict[str, float] = {}
    lower: list[str] = []
    rows: dict[str, dict] = {}
    directions = results.get("higher_is_better") or {}
    samples = results.get("n-samples") or {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for key, raw in values.items():
                if "," not in key:
                    continue  # alias, samples
                metric, filt = key.split(",", 1)
                value = _number(raw)
                if metric.endswith("_stderr") or value is None:
                    continue
                name = f"harness/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
                metrics[name] = value
                higher = (directions.get(task) or {}).get(metric, True)
                if higher is False and name not in lower:
                    lower.append(name)
                rows[name] = {"task": task, "metric": metric, "filter": filt, "value": value,
                              "stderr": _number(values.get(f"{metric}_stderr,{filt}")),
                              "samples": (samples.get(task) or {}).get("effective"),
                              "higher_is_better": higher is not False}
    return metrics, lower, [rows[k] for k in sorted(rows)]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "?"
