"""Local paths in a config made absolute on the driver, before anything crosses into Ray.

Ray runs Train workers, Tune trials, Data tasks and Serve replicas in working directories of their own, so a
relative `storage.root` (the default, `.llm-platform/storage`) or `train.checkpoint.resume_from` would name another
folder in each of them: a trial would not find its dataset and rank 0's `metrics.jsonl` would land under Ray's temp
folder.
Entry points call `make_absolute` on the composed config (`config.to_object` does), so everything below them
only ever sees absolute paths or URIs.
"""

from __future__ import annotations

import os
from typing import Any

# Keys whose value is a local path or a URI (`s3://...`, `file://...`): a plain path is made absolute.
LOCAL_PATH_KEYS = (
    "storage.root",
    "log_dir",
    "cluster.temp_dir",
    "data.sources",
    "train.dataset",
    "train.checkpoint.resume_from",
    "eval.dataset_uri",
    "eval.tasks_uri",
    "eval.output_uri",
    "eval.bias.pairs_uri",
    "eval.human.ratings_uri",
    "eval.human.export_uri",
    "eval.explain.output_uri",
    "eval.harness.include_path",
    "serve.auth.api_key_file",
    "data.filters.decontamination.harness_include_path",
    "data.filters.c4.bad_words_uri",
)
# Keys that also take names that are not paths (`registry:<name>`, a Hugging Face Hub id such as
# `meta-llama/Llama-3.2-1B`, an MLflow server): made absolute only when the value is clearly a local path (starts
# with `.`, `/` or `~`, or `file:`) or names something that exists here.
MAYBE_PATH_KEYS = (
    "model.pretrained",
    "tokenizer.path",  # `${model.pretrained}` under tokenizer=model: a Hub id or registry: reference too
    "eval.model",
    "eval.human.compare_model",
    "serve.model",
    "train.mlflow_tracking_uri",
    "data.filters.decontamination.sources",  # task files, or `harness:<task>` names
)


def _has_scheme(value: str) -> bool:
    return "://" in value or value.startswith("registry:")


def absolute(value: str, *, only_if_local: bool = False) -> str:
    """`value` with a relative local path made absolute against the current directory; URIs are unchanged."""
    if not value:
        return value
    if value.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(value[len("file://"):]))
    if value.startswith("file:"):
        return "file:" + os.path.abspath(os.path.expanduser(value[len("file:"):]))
    if _has_scheme(value):
        return value
    if only_if_local and not (value.startswith((".", "/", "~")) or os.path.exists(value)):
        return value
    return os.path.abspath(os.path.expanduser(value))


def _parent_and_field(cfg: Any, key: str) -> tuple[Any, str]:
    *parents, name = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    if not hasattr(node, name):  # a renamed key must not silently drop out of this list
        raise AttributeError(f"config/paths.py names {key!r}, which the schema does not have")
    return node, name


def make_absolute(cfg: Any) -> Any:
    """Make every local path of a `PlatformConfig` absolute, in place; returns `cfg`."""
    for keys, only_if_local in ((LOCAL_PATH_KEYS, False), (MAYBE_PATH_KEYS, True)):
        for key in keys:
            node, name = _parent_and_field(cfg, key)
            value = getattr(node, name)
            if isinstance(value, str):
                setattr(node, name, absolute(value, only_if_local=only_if_local))
            elif isinstance(value, list):
                setattr(node, name, [absolute(v, only_if_local=only_if_local) if isinstance(v, str) else v
                                     for v in value])
    for source in cfg.data.mixture.values():  # data.mixture.<name>.sources, like data.sources
        source.sources = [absolute(v) for v in source.sources]
    return cfg
