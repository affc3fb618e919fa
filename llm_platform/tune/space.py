"""The search space: a small YAML syntax over dotted config keys, checked against the config schema.

    tune:
      space:
        train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}   # or nested: train: {optimizer: {lr: {...}}}
        train.optimizer.warmup_steps: {randint: [0, 10]}      # integers, upper bound excluded
        train.optimizer.weight_decay: {uniform: [0.0, 0.2]}
        train.optimizer.schedule: {choice: [cosine, linear]}
        model.hidden_size: {grid: [32, 64]}                   # every value, in every sample
        train.optimizer.grad_clip: 1.0                        # a plain value: fixed for every trial
      # the same specs as strings (handy on the command line): "loguniform(1e-4, 1e-2)", "grid(32, 64)"

Parsing and validation are plain Python (unit-tested without Ray); `to_param_space` turns the result into Ray Tune
domains, nested the way the trial function reads them (`{"train": {"optimizer": {"lr": Domain}}}`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import yaml

from llm_platform.config.model import ModelConfig
from llm_platform.config.root import PlatformConfig
from llm_platform.config.train import ScalingConfig, TrainConfig
from llm_platform.config.tune import TuneConfig
from llm_platform.errors import ConfigError
from llm_platform.train.plan import SweepSize

KINDS = ("loguniform", "uniform", "choice", "randint", "grid")
TUNABLE_GROUPS = ("model", "train", "scaling")
"""What a trial's `launch` receives; other groups (data, serve...) would not change a trial."""
_STRING_SPEC = re.compile(r"^\s*(loguniform|uniform|choice|randint|grid)\s*\((.*)\)\s*$", re.S)
# YAML 1.1 (PyYAML) reads `1e-4` as a string: its floats need a dot (`1.0e-4`). Numbers in a string spec follow this.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class Dimension:
    """One axis of the search space."""

    key: str
    """Dotted config key, e.g. `train.optimizer.lr`."""
    kind: str
    """loguniform, uniform, choice, randint, grid, or fixed (a plain value)."""
    args: tuple
    """(lower, upper) for the ranges; the values for choice and grid; (value,) for fixed."""

    @property
    def values(self) -> list:
        """Every value a discrete dimension can take (ranges give their bounds)."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)


def parse_space(spec: dict[str, Any] | None, schema: type = PlatformConfig) -> list[Dimension]:
    """Parse and validate a search space.

    Args:
        spec: `tune.space`: dotted keys (or nested groups) -> a distribution spec or a plain value.
        schema: the root dataclass the keys must exist in.

    Raises:
        ConfigError: naming the key for an unknown key, a key outside model/train/scaling, an unknown
            distribution, bad bounds, or values of the wrong type.
    """
    dims = [_parse_one(key, value, schema) for key, value in _flatten(dict(spec or {}))]
    if not dims:
        raise ConfigError("tune.space is empty: give at least one key, e.g. tune.space={train.optimizer.lr: "
                          "{loguniform: [1e-4, 1e-2]}} (see conf/tune/debug.yaml)")
    return dims


def _flatten(spec: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """`{"train": {"optimizer": {"lr": {...}}}}` and `{"train.optimizer.lr": {...}}` both as
    `("train.optimizer.lr", {...})`."""
    out = []
    for key, value in spec.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not (len(value) == 1 and next(iter(value)) in KINDS):
            if not value:
                raise ConfigError(f"tune.space.{full} is empty")
            out += _flatten(value, full + ".")
        else:
            out.append((full, value))
    return out


def _parse_one(key: str, value: Any, schema: type) -> Dimension:
    hint = field_type(key, schema)
    where = f"tune.space.{key}"
    if isinstance(value, str) and _STRING_SPEC.match(value):
        kind, inner = _STRING_SPEC.match(value).groups()  # type: ignore[union-attr]
        try:
            parsed = [float(a) if isinstance(a, str) and _NUMBER.match(a) else a for a in yaml.safe_load(f"[{inner}]")]
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: cannot read the arguments of {value!r}: {e}") from None
        value = {kind: parsed}
    args: tuple[Any, ...]
    if isinstance(value, dict):
        (kind, given), = value.items()
        if not isinstance(given, (list, tuple)):
            raise ConfigError(f"{where}.{kind} needs a list, got {given!r}")
        args = tuple(given)
    else:
        kind, args = "fixed", (value,)
    if kind in ("loguniform", "uniform", "randint"):
        if len(args) != 2:
            raise ConfigError(f"{where}.{kind} needs [lower, upper], got {list(args)}")
        lower, upper = args
        numeric = (int,) if kind == "randint" else (int, float)
        if not all(isinstance(a, numeric) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}.{kind} bounds must be {'integers' if kind == 'randint' else 'numbers'}, "
                              f"got {list(args)}")
        if not lower < upper:
            raise ConfigError(f"{where}.{kind} needs lower < upper, got {list(args)}")
        if kind == "loguniform" and lower <= 0:
            raise ConfigError(f"{where}.loguniform needs a positive lower bound, got {lower}")
        if kind != "randint" and _accepts(hint, 1) and not _accepts(hint, 0.5):
            raise ConfigError(f"{where}: {key} is an integer; use randint, choice or grid instead of {kind}")
        args = (float(lower), float(upper)) if kind != "randint" else (int(lower), int(upper))
        samples = [lower, upper] if kind != "randint" else [lower, upper - 1]
    elif kind in ("choice", "grid"):
        if not args:
            raise ConfigError(f"{where}.{kind} needs at least one value")
        samples = list(args)
    elif kind == "fixed":
        samples = list(args)
    else:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(KINDS)}")
    for sample in samples:
        if not _accepts(hint, sample):
            raise ConfigError(f"{where}: value {sample!r} does not fit {key} ({_type_name(hint)})")
    return Dimension(key=key, kind=kind, args=args)


def field_type(key: str, schema: type = PlatformConfig) -> Any:
    """The type hint of a dotted key in the schema; a ConfigError names a key that does not exist."""
    parts = key.split(".")
    if parts[0] not in TUNABLE_GROUPS:
        groups = [f.name for f in dataclasses.fields(schema)]
        if parts[0] not in groups:
            raise ConfigError(f"tune.space: unknown config key {key!r} (groups: {', '.join(groups)})")
        raise ConfigError(f"tune.space: {key!r} cannot change a trial; tune keys under "
                          f"{', '.join(TUNABLE_GROUPS)}")
    node: Any = schema
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"tune.space: unknown config key {key!r} ({'.'.join(parts[:i])} has no sub-keys)")
        hints = typing.get_type_hints(node)
        if part not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(node))
            raise ConfigError(f"tune.space: unknown config key {key!r} ({'.'.join(parts[:i]) or 'root'} has: "
                              f"{known})")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"tune.space: {key!r} is a group, not a value; name one of its keys")
    return node


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a YAML value fits a (simple) field type: int, float, str, bool, Optional, list, Any."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):  # a choice key (config/choices.py)
        return value in {m.value for m in hint}
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return True  # anything more exotic is left to the trial's own config checks


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(m.value for m in hint)
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's `param_space`: nested dicts of Tune domains (and fixed values)."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
        "fixed": lambda a: a[0],
    }
    space: dict[str, Any] = {}
    for dim in dims:
        set_dotted(space, dim.key, make[dim.kind](dim.args))
    return space


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """`tree["a"]["b"] = value` for `key="a.b"`, creating the dicts on the way."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def flatten_params(config: dict, keys: list[str]) -> dict[str, Any]:
    """A trial's nested config as `{dotted key: value}` for the space's keys."""
    out = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


@dataclass(frozen=True)
class TrialConfig:
    """What a trial's `launch` receives: the typed TUNABLE_GROUPS, pickled as they are to the trial's actor."""

    model: ModelConfig
    train: TrainConfig
    scaling: ScalingConfig


def apply_params(base: TrialConfig, params: dict[str, Any]) -> TrialConfig:
    """`base` with a trial's dotted params (`train.optimizer.lr`) applied onto its dataclasses (config/merge.py):
    a choice's string becomes its Enum member, a key the schema lacks is refused naming it."""
    from llm_platform.config.merge import merge

    changes: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        group, _, rest = key.partition(".")
        if group not in TUNABLE_GROUPS or not rest:
            raise ConfigError(f"tune.space: {key!r} cannot change a trial; tune keys under "
                              f"{', '.join(TUNABLE_GROUPS)}")
        changes.setdefault(group, {})[rest] = value
    return dataclasses.replace(base, **{group: merge(getattr(base, group), node, prefix=f"{group}.")
                                        for group, node in changes.items()})


def sweep_size(tune: TuneConfig) -> SweepSize:
    """The trials of `tune` (samples x each grid axis) and how many run at once, for `llm-platform plan`; a space
    over keys that change each trial's tokens is refused (the plan does not model them)."""
    trials = tune.num_samples
    for dim in parse_space(tune.space):
        if dim.kind == "grid":
            trials *= len(dim.values)
        elif dim.key in ("train.max_steps", "train.micro_batch_size", "train.grad_accum_steps"):
            raise ConfigError(f"plan.sweep=true: tune.space.{dim.key} changes each trial's tokens, which the "
                              f"plan does not model: set plan.token_budget instead")
    return SweepSize(trials, max(1, min(trials, tune.max_concurrent_trials)))
