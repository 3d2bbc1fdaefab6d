"""Configuration: dataclass defaults < a `[stage]` table in a TOML file < explicit CLI flags.

Every stage has one frozen dataclass whose defaults are the only defaults. `build_config` merges the
three layers and the dataclass's `__post_init__` validates the result once. The resolved config is
stored in each manifest (`to_dict`), so an artifact can be re-made from its manifest alone.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from llmctl.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file, turning parse errors into a ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", "check the --config path") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", "fix the file's syntax") from None


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Coerce TOML/JSON values to the field's declared type where the conversion is lossless."""
    hints = typing.get_type_hints(cls)
    hint = hints.get(name)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is tuple and isinstance(value, list):
        return tuple(value)
    return value


def build_config(
    cls: type[T], toml: dict[str, Any] | None = None, section: str | None = None, **flags: Any
) -> T:
    """Build a config dataclass from defaults, a TOML table and CLI flags (in rising priority).

    Args:
        cls: The frozen config dataclass.
        toml: The parsed TOML document, or None.
        section: Table of `toml` that holds this stage's keys (e.g. "pretrain"). Top-level keys
            that are fields of `cls` (such as `seed`) apply too, below the section's.
        **flags: CLI values; None means "not given" and leaves the lower layers in force.

    Returns:
        The validated config.

    Raises:
        ConfigError: An unknown key, or a value `__post_init__` rejects.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if toml:
        top = {k: v for k, v in toml.items() if not isinstance(v, dict) and k in names}
        values.update(top)
        if section is not None:
            table = toml.get(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] in the config file must be a table")
            unknown = sorted(set(table) - names)
            if unknown:
                raise ConfigError(
                    f"unknown key(s) in [{section}]: {', '.join(unknown)}",
                    f"valid keys: {', '.join(sorted(names))}",
                )
            values.update(table)
    values.update({k: v for k, v in flags.items() if v is not None})
    values = {k: _coerce(cls, k, v) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"bad config for {cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists, Paths strings)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless `cond`; for use in `__post_init__`."""
    if not cond:
        raise ConfigError(message)
