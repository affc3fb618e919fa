"""Typed config schemas, registered in Hydra's ConfigStore as the schema of every primary config.

Only entry points (`llm_platform.commands`) import Hydra; library code receives plain dataclass instances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_platform.config.root import PlatformConfig

SCHEMA_NAME = "platform_schema"


def conf_dir() -> Path:
    """The `conf/` tree: `LLM_PLATFORM_CONF` if set; else the copy inside an installed wheel (`llm_platform/conf`,
    see setup.py); else the repository's `conf/` beside the package (a checkout, an editable install, a Ray job's
    uploaded working_dir)."""
    import os

    from llm_platform.errors import ConfigError

    env = os.environ.get("LLM_PLATFORM_CONF")
    package = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else [package / "conf", package.parent / "conf"]
    for path in candidates:
        if (path / "base.yaml").is_file():
            return path
    where = "LLM_PLATFORM_CONF" if env else "the installed package"
    raise ConfigError(f"config tree not found at {' or '.join(map(str, candidates))} (from {where}): set "
                      f"LLM_PLATFORM_CONF to the project's conf/ folder, or reinstall the package")


def register() -> None:
    """Register the root schema once; primary configs list `platform_schema` first in their defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=PlatformConfig)


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a composed DictConfig that its dataclass schema does not declare.

    Struct mode refuses `data.sq_len=1`, but Hydra's `+data.sq_len=1` (the form its own error hint suggests) adds
    the key anyway, and `OmegaConf.to_object` then sets it as a stray attribute that nothing reads.
    """
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):  # a dict field: any key is fine (tune.space), its typed values checked
        return [k for key in node.keys() if isinstance(child := node._get_node(key), DictConfig)
                and not child._is_none() for k in unknown_keys(child, f"{prefix}{key}.")]
    declared = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node.keys():
        if key not in declared:
            found.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def to_object(cfg: Any) -> PlatformConfig:
    """A composed DictConfig as the typed dataclass tree (interpolations resolved), its keys checked against the
    schema and its local paths made absolute (`config.paths`)."""
    from omegaconf import OmegaConf

    from llm_platform.config.merge import suggest
    from llm_platform.config.paths import make_absolute
    from llm_platform.errors import ConfigError

    stray = unknown_keys(cfg)
    if stray:
        raise ConfigError("; ".join(f"unknown config key {key}{suggest(PlatformConfig, key, '')}" for key in stray)
                          + ": the schema (llm_platform/config/) has no such field")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, PlatformConfig), type(obj)
    return make_absolute(obj)


# Dict-valued keys whose entries users name themselves (`data.mixture.web.weight=0.7`): Hydra's struct mode refuses
# a new entry unless the override is written `++key=...`, so `open_overrides` writes it so.
NAMED_ENTRY_KEYS = ("data.mixture",)


def open_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides of NAMED_ENTRY_KEYS written as forced merges of a nested dict, so an entry the user
    names is added, not refused, and built as its typed schema (`data.mixture.web.weight=0.7` ->
    `++data.mixture={web: {weight: 0.7}}`; OmegaConf would create `web` as an untyped dict from the dotted form)."""
    out = []
    for override in overrides:
        plain = override.lstrip("+")
        key, eq, value = plain.partition("=")
        base = next((k for k in NAMED_ENTRY_KEYS if eq and (key == k or key.startswith(k + "."))), None)
        if base is None:
            out.append(override)
            continue
        for part in reversed(key[len(base):].split(".")[1:]):
            value = f"{{{part}: {value}}}"
        out.append(f"++{base}={value}")
    return out


def compose(stage: str, overrides: list[str] | None = None) -> PlatformConfig:
    """Compose a stage's primary config outside Hydra's CLI (tests, `run`, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=stage, overrides=open_overrides(list(overrides or [])))
    return to_object(cfg)


def as_dict(node: Any) -> dict:
    """A dataclass config node as a plain dict, for records whose output is a dict (lineage and sweep JSON, a
    fingerprint, a metrics tracker's params). Never for a Ray boundary: the typed node itself pickles, and
    `config.merge.merge` applies changes onto it."""
    import dataclasses

    return dataclasses.asdict(node)
