"""The one pattern for names that become folders in storage: `data.name`, `train.run_name`, registry model names.

A name is 1 to 128 characters: letters, digits, `.`, `_` and `-`, starting with a letter or a digit, and never
holding `..`. So it is always one path segment, the same on a local disk and on S3, and it cannot climb out of its
folder (`datasets/<name>/`, `runs/<run_name>/`, `registry/<model>/`), whoever wrote the config or the request.
"""

from __future__ import annotations

import re

from llm_platform.errors import ConfigError

PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"


def is_valid(name: object) -> bool:
    """True when `name` matches PATTERN and holds no `..`."""
    return isinstance(name, str) and bool(PATTERN.fullmatch(name)) and ".." not in name


def check(name: object, field: str, error: type[Exception] = ConfigError) -> str:
    """`name` itself when valid; else `error` (a ConfigError by default) naming `field` and the rule."""
    if not is_valid(name):
        raise error(f"{field}={name!r}: not a valid name ({RULE})")
    return name  # type: ignore[return-value]
