"""The console is for people: a line when a stage starts and ends, progress for long work, the summary tables.

Everything else (Ray's, Ray Data's, Ray Train's and Serve's own INFO lines, what workers and replicas print) goes
to a log file whose path is printed once. `-v` (or `verbose=true`) puts all of it back on the console.

Ray installs its own console handlers on its loggers (`ray`, `ray.data`, `ray.serve`, ...) when it starts or is
imported, and those loggers do not propagate to the root logger; `adopt_ray_loggers()` therefore runs again after
each point where Ray may have added one (cluster.connect, Serve's start).
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("llm_platform")

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ray's loggers that come with console handlers of their own.
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


class _State:
    verbose = True  # until setup() runs (library use, tests): change nothing
    file_handler: logging.Handler | None = None
    path: str | None = None


def _console_filter(record: logging.LogRecord) -> bool:
    """Our own lines (INFO and up) and anyone's errors reach the console; the rest only the log file."""
    return record.name.startswith("llm_platform") or record.levelno >= logging.ERROR


def verbose() -> bool:
    return _State.verbose


def progress_enabled() -> bool:
    """Progress bars on an interactive terminal (or with -v); a log file or CI gets the start/end lines only."""
    return _State.verbose or sys.stdout.isatty()


def setup(stage: str, *, verbose: bool, log_dir: str) -> str | None:
    """Send everything to `<log_dir>/<stage>-<time>.log` and keep the console quiet unless `verbose`.

    Returns the log file's path (printed once), or None when verbose (the console has it all).
    """
    _State.verbose = verbose
    # Library warnings about our own calls' arguments are for us, not the user; they stay in the log file.
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    _State.file_handler, _State.path = handler, path
    if not verbose:
        for h in root.handlers:
            if h is not handler:
                h.addFilter(_console_filter)
        # Progress bars of transformers / huggingface_hub / tqdm (shard writes, downloads) only on a terminal.
        if not progress_enabled():
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TQDM_DISABLE", "1")
    log.info("logs: %s%s", path, "" if verbose else " (-v shows them here)")
    return path


def adopt_ray_loggers() -> None:
    """Ray's own loggers also write to our log file; unless verbose, their console handlers show errors only.

    Called once Ray is up (cluster.connect). Ray Data installs its console handler when first imported, so it is
    imported here first: a later import would add a handler this function never saw.
    """
    handler = _State.file_handler
    if handler is None:
        return
    try:
        from ray.data import DataContext
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        DataContext = None  # type: ignore[misc,assignment]  # the optional-import idiom: None when absent
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            continue  # propagates to the root logger, whose console handler filters it
        if handler not in logger.handlers:
            logger.addHandler(handler)
        if not _State.verbose:
            for h in logger.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.setLevel(logging.ERROR)
    if DataContext is not None and not _State.verbose:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = progress_enabled()
        ctx.enable_operator_progress_bars = False  # one bar per phase, not one per operator
