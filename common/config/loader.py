"""Load a ``Config`` from TOML, ``key=value`` overrides or Flower's flat run config;
every error names the key (and the file) and what was expected."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w

from common.config.schema import Config, flatten
from common.config.values import ConfigError, parse_value, show_value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {show_value(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        known = ", ".join(sorted(names))
        if not unknown[0]:  # a table given as a value whose keys include "" (hostile run configs do that)
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: an empty key name (known: {known})")
        key = unknown[0] if len(unknown[0]) <= 80 else unknown[0][:80] + "..."  # a hostile file's 5000-digit key
        raise ConfigError(f"{prefix}{key}: unknown key (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = parse_value(f"{prefix}{name}", value, typ, names[name].metadata)
    return cls(**kwargs)


def parse_section(cls: type, data: dict[str, Any]) -> Any:
    """One section (e.g. ``SplitSettings``) from a mapping read from a file, checked key by key."""
    return _build(cls, data, f"{cls.SECTION}.")


def _unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or "" in key.split("."):
            raise ConfigError(f"{show_value(key)}: expected a dotted key such as dp.target_epsilon")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is a value, not a table")
        if isinstance(value, dict):  # flat keys carry values; a table would replace a whole section
            raise ConfigError(f"{key}: expected a value, got a table {show_value(value)} (flat keys name one value "
                              "each, e.g. dp.target_epsilon)")
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


PRESETS = Path(__file__).parent / "presets"
"""Named sets of overrides shipped with facefl (``quick.toml``: test-sized; ``demo.toml``: the demo)."""


def preset(name: str) -> list[str]:
    """The ``key=value`` overrides of ``presets/<name>.toml``, to put after a configuration file
    (so that a preset's sizes win over the file's) and before command-line overrides."""
    path = PRESETS / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise ConfigError(f"preset {name!r}: unknown (known: {known})")
    flat: dict[str, Any] = {}
    flatten(tomllib.loads(path.read_text(encoding="utf-8")), "", flat)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flat.items()]


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
