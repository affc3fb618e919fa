"""Changes applied onto a typed config node, checked against its schema: the one way a dict becomes config below
the entry points (a Tune trial's parameters, a RayService's `build_app` args from its manifest).

    merge(TrainConfig(...), {"optimizer.lr": 0.01, "optimizer.schedule": "linear"}, prefix="train.")
        -> TrainConfig(optimizer=OptimizerConfig(lr=0.01, schedule=Schedule.linear, ...), ...)

OmegaConf does the work, as it does for Hydra at compose time: a key the dataclass does not declare is refused, a
value is converted to the field's type (an Enum member from its string, a float from an int) or refused, and the
result is the dataclass again, so what crosses a Ray boundary is the typed object, never a dict rebuilt by hand.
Errors name the full key (`prefix` + the key inside the node) as the user writes it: `train.optimizer.schedule`.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from llm_platform.errors import ConfigError

T = TypeVar("T")


def nest(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested dicts (`{"a.b": 1, "a": {"c": 2}}` -> `{"a": {"b": 1, "c": 2}}`); values kept as is.

    Only the keys of `changes` itself are split: a key inside a nested mapping is a name of its own (a LoRA adapter
    `tuned.v2` under `engine.vllm.lora_adapters`, a mixture source), dots and all."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {part} is given both a value and sub-keys")
        node[leaf] = _deep_update(node[leaf], value) if isinstance(node.get(leaf), dict) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    """`value` with its mappings as plain dicts (keys untouched)."""
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _deep_update(node: dict[str, Any], value: Any) -> Any:
    """`value` merged into the dict `node` (a mapping over a mapping merges key by key; anything else replaces)."""
    if not isinstance(value, Mapping):
        return value
    for k, v in value.items():
        node[k] = _deep_update(node[k], v) if isinstance(node.get(k), dict) else _plain(v)
    return node


def merge(base: T, changes: Mapping[str, Any], *, prefix: str = "") -> T:
    """A copy of `base`, a config dataclass instance, with `changes` applied.

    Args:
        base: the typed node (a dataclass instance) the changes apply onto; it is not modified.
        changes: dotted keys relative to the node (`optimizer.lr`) or nested dicts (`{"optimizer": {"lr": ...}}`).
        prefix: where the node sits in the whole config (`train.`), for the key named in errors.

    Raises:
        ConfigError: naming the full key of the first unknown key or of a value its field's type refuses.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    nested = nest(changes)
    _check_groups(type(base), nested, prefix)
    node = OmegaConf.structured(base)
    try:
        merged = OmegaConf.merge(node, OmegaConf.create(nested))
    except ConfigKeyError as e:
        key = f"{prefix}{e.full_key}"
        raise ConfigError(f"unknown config key {key}{suggest(type(base), str(e.full_key), prefix)}: the schema "
                          f"(llm_platform/config/) has no such field") from None
    except OmegaConfBaseException as e:  # ValidationError and its kin: a value the field's type refuses
        raise ConfigError(_bad_value(type(base), str(e.full_key), prefix, e)) from None
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, type(base)), type(obj)
    return typing.cast(T, obj)


def field_hint(schema: type, key: str) -> Any:
    """The type hint of dotted `key` in dataclass `schema`, or None past a dict field or an unknown name."""
    node: Any = schema
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def suggest(schema: type, key: str, prefix: str) -> str:
    """` (did you mean train.optimizer.lr?)` for `optimizer.lrr`, or nothing."""
    import difflib

    *parents, name = key.split(".")
    node = field_hint(schema, ".".join(parents)) if parents else schema
    if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
        return ""
    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(node)], n=1)
    return f" (did you mean {prefix}{'.'.join([*parents, close[0]])}?)" if close else ""


def _check_groups(schema: type, nested: dict[str, Any], prefix: str) -> None:
    """Refuse a plain value given to a group (`train.optimizer=3`): OmegaConf's own error would not name the key."""
    hints = typing.get_type_hints(schema)
    for key, value in nested.items():
        hint = hints.get(key)
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix}{key}={value!r}: {prefix}{key} is a group; set its keys ({prefix}{key}.<name>)")
        _check_groups(hint, value, f"{prefix}{key}.")


def _bad_value(schema: type, key: str, prefix: str, error: Exception) -> str:
    """`train.optimizer.schedule='cosin': must be one of cosine, linear, constant`, or OmegaConf's own reason."""
    hint = field_hint(schema, key)
    value = getattr(error, "value", None)  # older OmegaConf errors do not carry it; the message then names it
    shown = f"={value!r}" if value is not None else ""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"{prefix}{key}{shown}: must be one of {', '.join(str(m.value) for m in hint)}"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{prefix}{key}{shown}: {reason}"
