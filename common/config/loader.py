"""Load a ``Config`` from TOML, ``key=value`` overrides or Flower's flat run config;
every error names the key (and the file) and what was expected."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w

from common.config.schema import (
    Config,
    ConfigError,
)

_INT64 = (-(2**63), 2**63 - 1)
"""Integers must fit in 64 bits: TOML and Flower's run config (ConfigRecord) carry no larger ones."""


def _show(raw: Any, limit: int = 80) -> str:
    """``repr(raw)`` cut to ``limit`` characters, for error messages about hostile values."""
    try:
        text = repr(raw)
    except ValueError:  # an int of more than 4300 digits has no repr
        text = f"<integer of {raw.bit_length()} bits>"
    return text if len(text) <= limit else text[:limit] + "..."


def _has_surrogate(text: str) -> bool:
    """Lone surrogates (from undecodable command-line bytes) cannot be written to config.toml."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_scalar(key: str, raw: Any, typ: Any, meta: typing.Mapping[str, Any]) -> Any:
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
        raise ConfigError(f"{key}: expected {expected}, got {_show(raw)}") from None
    ints = value if origin is tuple else (value,)
    if int in (typ, *typing.get_args(typ)) and any(not _INT64[0] <= x <= _INT64[1] for x in ints):
        raise ConfigError(f"{key}: expected integers of at most 64 bits, got {_show(raw)}")
    if typ is str and _has_surrogate(value):
        raise ConfigError(f"{key}: expected valid UTF-8 text, got {_show(raw)} (undecodable bytes)")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {_show(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):  # NaN fails both
        raise ConfigError(f"{key}: expected a value in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
    if typ is float and not meta.get("infinite") and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _parse_scalar(f"{prefix}{name}", value, typ, names[name].metadata)
    return cls(**kwargs)


def _unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or "" in key.split("."):
            raise ConfigError(f"{_show(key)}: expected a dotted key such as dp.target_epsilon")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is a value, not a table")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``; values stay strings and are typed by the schema."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. dp.target_epsilon=4")
        out[key.strip()] = value.strip()
    return out


def from_flat(flat: typing.Mapping[str, Any]) -> Config:
    """Build and validate a Config from dotted keys (Flower run_config, CLI overrides)."""
    return _build(Config, _unflatten(flat), "").validate()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- TOML file <- ``key=value`` overrides, validated; errors name file and key."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: configuration file not found") from None
        except OSError as exc:  # a directory, no permission
            raise ConfigError(f"{p}: cannot read the configuration file ({exc.strerror or exc})") from None
        # TOMLDecodeError and UnicodeDecodeError are ValueErrors, as is an integer of more than
        # 4300 digits; deeply nested arrays or tables exhaust the parser's recursion.
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{p}: not valid TOML ({str(exc)[:200]})") from None
    data = _merge(data, _unflatten(parse_overrides(overrides or [])))
    try:
        return _build(Config, data, "").validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def dump_toml(cfg: Config) -> str:
    """The resolved configuration with every default written out (the run directory's config.toml)."""
    return tomli_w.dumps(cfg.to_dict())
