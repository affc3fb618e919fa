"""The model registry in storage: numbered versions of HF-format models with lineage, and a LATEST pointer.

Layout under `<root>/registry/<model>/`:
    v0001/ ... vNNNN/   config.json  model.safetensors  tokenizer files  lineage.json (written last)
    LATEST              the current version's name, replaced atomically (one object write)

A version folder counts only once its lineage.json exists, so an interrupted registration is never listed. A
registration claims its number first with a create-only write of `vNNNN/.claim` (an exclusive create locally, a
conditional PUT `If-None-Match: *` on S3), so concurrent registrations never share a number: the loser takes the
next one. Model names follow `llm_platform.names`; versions are `v` and 4+ digits, so neither a reference
(`registry:<name>/<version>`) nor LATEST can point outside `registry/<model>/`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from typing import Any

from llm_platform import storage
from llm_platform.errors import StageError
from llm_platform.storage import layout, names

PREFIX = "registry:"
LATEST = "LATEST"
LINEAGE = "lineage.json"
_VERSION = re.compile(r"^v(\d{4,})$")
CLAIM = ".claim"
# How many numbers one `register` tries when other registrations keep taking them first.
_CLAIM_ATTEMPTS = 100


class RegistryError(StageError):
    """A model or version that cannot be found, or a bad name."""


@dataclass
class ModelVersion:
    """One registered (or directly referenced) model."""

    name: str
    version: str
    uri: str
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict((self.lineage.get("run") or {}).get("metrics") or {})


def _model_uri(root: str, name: str) -> str:
    names.check(name, "registry model name", RegistryError)
    return layout.registered_model(root, name)


def _check_version(name: str, version: str) -> str:
    if not _VERSION.fullmatch(version):
        raise RegistryError(f"{version!r} is not a version of model {name!r}: versions look like v0001")
    return version


def _versions(root: str, name: str) -> list[str]:
    base = _model_uri(root, name)
    found = [v for v in storage.listdir(base) if _VERSION.match(v)]
    complete = [v for v in found if storage.exists(storage.join(base, v, LINEAGE))]
    return sorted(complete, key=lambda v: int(_VERSION.match(v).group(1)))  # type: ignore[union-attr]


def model_names(root: str) -> list[str]:
    """Registered model names."""
    return [n for n in storage.listdir(layout.registry(root)) if names.is_valid(n)]


def get(root: str, name: str, version: str) -> ModelVersion:
    """A version by name; raises RegistryError naming what is missing or malformed."""
    uri = storage.join(_model_uri(root, name), _check_version(name, version))
    lineage_uri = storage.join(uri, LINEAGE)
    if not storage.exists(lineage_uri):
        known = ", ".join(_versions(root, name)) or "none"
        raise RegistryError(f"model {name!r} has no version {version!r} in {root} (versions: {known})")
    return ModelVersion(name=name, version=version, uri=uri, lineage=storage.read_json(lineage_uri))


def list_versions(root: str, name: str | None = None) -> list[ModelVersion]:
    """Every complete version of one model (or of all models), oldest first."""
    names = [name] if name else model_names(root)
    return [get(root, n, v) for n in names for v in _versions(root, n)]


def latest(root: str, name: str) -> ModelVersion:
    """The version LATEST points at."""
    pointer = storage.join(_model_uri(root, name), LATEST)
    if not storage.exists(pointer):
        known = ", ".join(model_names(root)) or "none"
        raise RegistryError(f"model {name!r} is not in the registry at {root} (models: {known})")
    return get(root, name, storage.read_text(pointer).strip())


def promote(root: str, name: str, version: str) -> ModelVersion:
    """Point LATEST at an existing, complete version of this model (one atomic object write)."""
    mv = get(root, name, version)  # refuses anything but a vNNNN with lineage.json under registry/<name>/
    storage.write_text(storage.join(_model_uri(root, name), LATEST), version + "\n")
    return mv


def register(root: str, name: str, model_uri: str, lineage: dict[str, Any], *,
             make_latest: bool = True) -> ModelVersion:
    """Copy an HF-format model folder into a new version, write its lineage last, then move LATEST.

    Args:
        root: storage root.
        name: registry model name.
        model_uri: the folder to copy (local or s3://), e.g. a run's `export/`.
        lineage: the model's lineage record; `kind`, `model` and `created_at` are filled in here.
        make_latest: also point LATEST at the new version.
    """
    if not storage.exists(storage.join(model_uri, "config.json")):
        raise RegistryError(f"{model_uri} is not an HF-format model folder (no config.json)")
    version = _claim_version(root, name)
    uri = storage.join(_model_uri(root, name), version)
    # File by file, streaming: server-side on S3, chunked between local and S3; memory does not grow with the model.
    storage.copy_dir(model_uri, uri, skip=(LINEAGE,))
    record = dict(lineage)
    record.update({
        "kind": "model_version",
        "model": {"name": name, "version": version, "uri": uri},
        "registered_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "source_uri": model_uri,
    })
    record.setdefault("created_at", record["registered_at"])
    storage.write_json(storage.join(uri, LINEAGE), record)
    if make_latest:
        promote(root, name, version)
    return ModelVersion(name=name, version=version, uri=uri, lineage=record)


def _claim_version(root: str, name: str) -> str:
    """The next free version number, taken with a create-only write so that no concurrent `register` gets it too.

    Numbers of incomplete (interrupted) versions are skipped, not reused, so a half copy is never mixed in.
    """
    base = _model_uri(root, name)
    existing = [int(_VERSION.match(v).group(1)) for v in storage.listdir(base) if _VERSION.match(v)]  # type: ignore
    number = (max(existing) + 1) if existing else 1
    for _ in range(_CLAIM_ATTEMPTS):
        version = f"v{number:04d}"
        if storage.write_new(storage.join(base, version, CLAIM), b""):
            return version
        number += 1  # another registration claimed it between our listing and our write
    raise RegistryError(f"model {name!r}: could not claim a version number after {_CLAIM_ATTEMPTS} tries")


def resolve(ref: str, root: str) -> ModelVersion:
    """`registry:<name>[/<version>]`, a local path or an s3:// URI of an HF-format folder, as a ModelVersion."""
    if ref.startswith(PREFIX):
        spec = ref[len(PREFIX):].strip("/")
        name, _, version = spec.partition("/")
        return get(root, name, version) if version and version != "latest" else latest(root, name)
    if not storage.exists(storage.join(ref, "config.json")):
        raise RegistryError(f"model {ref!r} not found: expected `registry:<name>[/<version>]` or an HF-format folder "
                            f"with config.json")
    lineage_uri = storage.join(ref, LINEAGE)
    lineage = storage.read_json(lineage_uri) if storage.exists(lineage_uri) else {}
    model = lineage.get("model") or {}
    name = model.get("name") or os.path.basename(ref.rstrip("/")) or "model"
    return ModelVersion(name=name, version=model.get("version", "path"), uri=ref, lineage=lineage)


def materialize(uri: str, cache_dir: str | None = None) -> str:
    """A local folder with the model's files. s3:// URIs are downloaded into a cache keyed by their content (a
    re-uploaded model is fetched again), atomically (concurrent replicas never read a half-written copy), by
    default in this user's private temporary folder."""
    if not storage.is_remote(uri):
        return storage.filesystem(uri)[1]
    return storage.download_cached(uri, cache_dir or storage.private_cache_dir("llmp-models"))
