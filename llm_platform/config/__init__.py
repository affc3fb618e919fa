"""Typed config schemas, registered in Hydra's ConfigStore as the schema of every primary config.

Only entry points (`llm_platform.commands`) import Hydra; library code receives plain dataclass instances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from llm_platform.config.root import PlatformConfig

T = TypeVar("T")
SCHEMA_NAME = "platform_schema"


def conf_dir() -> Path:
    """The `conf/` tree: `LLM_PLATFORM_CONF` if set, else the one beside the package (a checkout or editable install)."""
    import os

    env = os.environ.get("LLM_PLATFORM_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not path.is_dir():
        raise FileNotFoundError(
            f"config tree not found at {path}: set LLM_PLATFORM_CONF to the project's conf/ folder"
        )
    return path


def register() -> None:
    """Register the root schema once; primary configs list `platform_schema` first in their defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=PlatformConfig)


def to_object(cfg: Any) -> PlatformConfig:
    """A composed DictConfig as the typed dataclass tree (interpolations resolved)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, PlatformConfig), type(obj)
    return obj


def compose(stage: str, overrides: list[str] | None = None) -> PlatformConfig:
    """Compose a stage's primary config outside Hydra's CLI (tests, `run`, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=stage, overrides=list(overrides or []))
    return to_object(cfg)


def as_dict(node: Any) -> dict:
    """A dataclass config node as a plain dict (what Ray workers receive)."""
    import dataclasses

    return dataclasses.asdict(node)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a dataclass config node from `as_dict` output, nested dataclasses included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        kwargs[f.name] = value
    return cls(**kwargs)  # type: ignore[call-arg]
