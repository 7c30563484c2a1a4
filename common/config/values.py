"""How one configuration value is checked: its type, its allowed choices, its range.

Shared by the loader (values parsed from TOML, ``--set`` or Flower's run config) and by every
schema section's constructor (sections built in code), so that both are held to one set of rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


def choice(default: str, choices: tuple[str, ...], doc: str = "") -> Any:
    """A string field that must be one of ``choices`` (defined next to the code implementing them)."""
    return field(default=default, metadata={"choices": choices, "doc": doc})


def num(default: float, lo: float | None = None, hi: float | None = None, doc: str = "",
        infinite: bool = False) -> Any:
    """A number in [lo, hi]; floats must be finite unless ``infinite`` (the value means something)."""
    return field(default=default, metadata={"min": lo, "max": hi, "doc": doc, "infinite": infinite})


_INT64 = (-(2**63), 2**63 - 1)
"""Integers must fit in 64 bits: TOML and Flower's run config (ConfigRecord) carry no larger ones."""


def show_value(raw: Any, limit: int = 80) -> str:
    """``repr(raw)`` cut to ``limit`` characters, for error messages about hostile values."""
    try:
        text = repr(raw)
    except ValueError:  # an int of more than 4300 digits has no repr, nor has a container holding one
        text = (f"<integer of {raw.bit_length()} bits>" if isinstance(raw, int)
                else f"<{type(raw).__name__} holding an integer too large to print>")
    return text if len(text) <= limit else text[:limit] + "..."


def _has_surrogate(text: str) -> bool:
    """Lone surrogates (from undecodable command-line bytes) cannot be written to config.toml."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_value(key: str, raw: Any, typ: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Coerce ``raw`` (TOML value or string) to ``typ``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(raw, bool):
                value: Any = raw
            elif isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = raw.lower() in ("true", "1", "yes")
            else:
                raise ValueError
        elif typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(raw)
        elif typ is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        elif typ is str:
            if not isinstance(raw, str):
                raise ValueError
            value = raw
        elif origin is tuple:
            elem = typing.get_args(typ)[0]
            if not isinstance(raw, (str, list, tuple)):
                raise ValueError
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            if any(isinstance(x, bool) or (elem is int and isinstance(x, float)) for x in items):
                raise ValueError
            value = tuple(elem(x) for x in items)
            if not value or (elem is int and min(value) < 1):
                raise ValueError
        else:  # pragma: no cover - a new field type without a parser is a programming error
            raise TypeError(f"{key}: unsupported config type {typ}")
    except (ValueError, TypeError, OverflowError):  # OverflowError: float() of an int beyond 1e308
        expected = getattr(typ, "__name__", str(typ))
        if origin is tuple:
            expected = ("comma-separated integers >= 1" if typing.get_args(typ)[0] is int
                        else "comma-separated numbers")
        raise ConfigError(f"{key}: expected {expected}, got {show_value(raw)}") from None
    ints = value if origin is tuple else (value,)
    if int in (typ, *typing.get_args(typ)) and any(not _INT64[0] <= x <= _INT64[1] for x in ints):
        raise ConfigError(f"{key}: expected integers of at most 64 bits, got {show_value(raw)}")
    if typ is str and _has_surrogate(value):
        raise ConfigError(f"{key}: expected valid UTF-8 text, got {show_value(raw)} (undecodable bytes)")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {show_value(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):  # NaN fails both
        raise ConfigError(f"{key}: expected a value in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
    if typ is float and not meta.get("infinite") and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Section:
    """A configuration section: on construction every field is checked (and numbers coerced, e.g.
    numpy integers to int) as ``parse_value`` checks values read from a file, so that a section
    built in code (a library call, a test) cannot hold a value a configuration file could not."""

    SECTION: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as TOML and JSON hold them."""
        return {f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple)
                else getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            typ = hints[f.name]
            if not dataclasses.is_dataclass(typ):
                value = parse_value(f"{self.SECTION}.{f.name}", getattr(self, f.name), typ, f.metadata)
                object.__setattr__(self, f.name, value)
