"""Where a `model.pretrained` reference lives, and a local copy of it.

A reference is a local HF-format folder, an `s3://` URI of one, `registry:<name>[/<version>]`, or a Hugging Face Hub
id (`org/name`). Hub ids work only where the cluster can reach the Hub (and with `HF_TOKEN` for gated models); they
are downloaded once per node into the Hub cache, safetensors weights and JSON/tokenizer files only. Tests never use
the Hub.
"""

from __future__ import annotations

import json
import os
import re

from llm_platform import storage
from llm_platform.errors import ConfigError, StageError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Hub download fetches: weights as safetensors only (never pickles), configs and tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def is_hub_id(ref: str) -> bool:
    """`org/name` that is not an existing local path, a URI or a registry reference."""
    return bool(_HUB_ID.match(ref)) and not os.path.exists(ref) and "://" not in ref


def locate(ref: str, storage_root: str | None) -> str:
    """The storage URI (local path or s3://) of the referenced HF folder; Hub ids are downloaded first."""
    from llm_platform import registry

    if ref.startswith(registry.PREFIX) and storage_root is None:
        raise ConfigError(f"model.pretrained={ref!r}: a registry reference needs the storage root (storage.root)")
    if is_hub_id(ref):
        return _hub_download(ref)
    try:
        return registry.resolve(ref, storage_root or ".").uri
    except StageError as e:
        raise ConfigError(f"model.pretrained={ref!r}: {e}") from None


def materialize(ref: str, storage_root: str | None) -> str:
    """A local folder holding the referenced model (s3:// copies are cached per URI)."""
    from llm_platform import registry

    return registry.materialize(locate(ref, storage_root))


def read_config(ref: str, storage_root: str | None) -> dict:
    """The referenced checkpoint's config.json, without copying its weights."""
    uri = locate(ref, storage_root)
    return json.loads(storage.read_text(storage.join(uri, "config.json")))


def _hub_download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line naming the key
        raise ConfigError(f"model.pretrained={repo_id!r} is not a local folder, s3:// URI or registry reference, "
                          f"and the Hugging Face Hub could not provide it ({type(e).__name__}: {e})") from None
