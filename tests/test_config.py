"""The configuration: defaults, TOML + ``--set`` merging, flat and TOML round trips, and errors
that name the key and what was expected."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from common.config import (
    Config,
    ConfigError,
    dump_toml,
    from_flat,
    load_config,
    parse_overrides,
)


def _leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, type, field) of every scalar setting, found from the dataclass tree itself."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += _leaves(typ, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", typ, f))
    return out


LEAVES = _leaves()


# --- defaults ------------------------------------------------------------------------------

def test_defaults_are_valid_and_what_load_config_returns() -> None:
    cfg = Config()
    assert cfg.validate() is cfg
    assert load_config() == cfg
    assert load_config(None, []) == cfg


def test_flat_form_holds_only_scalars_under_every_dotted_key() -> None:
    flat = Config().to_flat()
    assert set(flat) == {key for key, _, _ in LEAVES}
    for key, value in flat.items():
        assert isinstance(value, (bool, int, float, str)), (key, value)
    assert flat["model.blocks"] == ",".join(map(str, Config().model.blocks))  # tuples travel as comma strings


def test_config_error_is_a_value_error() -> None:
    # The CLI reports ValueErrors as "facefl: error: ..." instead of a traceback.
    assert issubclass(ConfigError, ValueError)


# --- merging --------------------------------------------------------------------------------

def test_toml_file_and_overrides_merge_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('seed = 7\n[data]\nidentities = 50\nimage_size = 32\n'
                    '[train]\nepochs = 3\nmargin = "cosface"\n[dp]\nmode = "sample"\ntarget_epsilon = 4.0\n')
    cfg = load_config(path, ["train.epochs=5", "dp.delta=1e-6", "model.blocks=2,1"])
    assert cfg.seed == 7
    assert (cfg.data.identities, cfg.data.image_size) == (50, 32)
    assert cfg.train.epochs == 5  # override beats the file
    assert cfg.train.margin == "cosface"  # the file's other keys in the same table survive
    assert (cfg.dp.mode, cfg.dp.target_epsilon, cfg.dp.delta) == ("sample", 4.0, 1e-6)
    assert cfg.model.blocks == (2, 1)
    # Everything else keeps its default.
    defaults = Config()
    assert cfg.data.images_per_identity == defaults.data.images_per_identity
    assert cfg.split == defaults.split
    assert cfg.train.batch_size == defaults.train.batch_size


def test_later_override_of_the_same_key_wins() -> None:
    assert load_config(None, ["train.epochs=2", "train.epochs=9"]).train.epochs == 9


def test_override_values_are_typed_by_the_schema() -> None:
    cfg = load_config(None, ["data.strict=no", "train.augment=TRUE", "dp.max_grad_norm=2", " train.lr = 0.01 "])
    assert cfg.data.strict is False and cfg.train.augment is True
    assert cfg.dp.max_grad_norm == 2.0 and isinstance(cfg.dp.max_grad_norm, float)
    assert cfg.train.lr == 0.01


def test_parse_overrides_keeps_everything_after_the_first_equals_sign() -> None:
    assert parse_overrides(["data.path=/a=b", "seed=3"]) == {"data.path": "/a=b", "seed": "3"}


def test_infinite_target_epsilon_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(None, ["dp.mode=sample", "dp.target_epsilon=inf", "dp.noise_multiplier=1.2"])
    assert math.isinf(cfg.dp.target_epsilon) and not cfg.dp_calibrated()
    path = tmp_path / "inf.toml"
    path.write_text('[dp]\nmode = "sample"\ntarget_epsilon = inf\nnoise_multiplier = 0.9\n')
    assert math.isinf(load_config(path).dp.target_epsilon)
    # ... and survives both round trips.
    assert from_flat(cfg.to_flat()) == cfg
    (tmp_path / "dump.toml").write_text(dump_toml(cfg))
    assert load_config(tmp_path / "dump.toml") == cfg


def test_finite_target_epsilon_means_calibrated_noise() -> None:
    assert load_config(None, ["dp.mode=sample", "dp.target_epsilon=3"]).dp_calibrated()
    cfg = load_config(None, ["dp.mode=sample", "dp.target_epsilon=0", "dp.noise_multiplier=1.1"])
    assert not cfg.dp_calibrated() and cfg.dp.noise_multiplier == 1.1


# --- round trips ----------------------------------------------------------------------------

def _leaf_strategy(key: str, typ: Any, f: dataclasses.Field) -> st.SearchStrategy:
    meta = f.metadata
    lo, hi = meta.get("min"), meta.get("max")
    if meta.get("choices"):
        return st.sampled_from(meta["choices"])
    if typ is bool:
        return st.booleans()
    if typ is int:
        lo = 0 if lo is None else int(lo)
        return st.integers(lo, lo + 40 if hi is None else int(hi))
    if typ is float:
        return st.floats(0.0 if lo is None else lo, 1e6 if hi is None else hi, allow_nan=False,
                         allow_infinity=False)
    if typ is str:
        return st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
    if typing.get_origin(typ) is tuple:
        return st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
    raise AssertionError(f"{key}: no strategy for config type {typ}")  # a new field type needs one


# Cross-field rules are kept true by construction where that is cheap; the rest are filtered.
_CONSTRAINED = {
    "data.image_size": st.sampled_from([32, 48, 64, 80, 96, 112, 128]),
    "train.attribute": st.sampled_from(["gender", "smiling"]),
}


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """A valid config differing from the defaults in a random handful of keys."""
    keys = draw(st.lists(st.sampled_from(LEAVES), max_size=8, unique_by=lambda leaf: leaf[0]))
    flat: dict[str, Any] = Config().to_flat()
    for key, typ, f in keys:
        value = draw(_CONSTRAINED[key] if key in _CONSTRAINED else _leaf_strategy(key, typ, f))
        flat[key] = ",".join(map(str, value)) if isinstance(value, tuple) else value
    if draw(st.booleans()):  # identity fractions that sum to 1
        w = draw(st.lists(st.integers(0, 10), min_size=4, max_size=4).filter(lambda w: sum(w) > 0))
        for name, x in zip(("member", "nonmember", "aux", "probe"), w):
            flat[f"split.{name}"] = x / sum(w)
    if flat["data.source"] != "synthfaces" and not flat["data.path"]:
        flat["data.path"] = "/data/faces"
    try:
        return from_flat(flat)
    except ConfigError:
        assume(False)
        raise


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs())
def test_flat_round_trip(cfg: Config) -> None:
    assert from_flat(cfg.to_flat()) == cfg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs())
def test_dump_toml_reloads_to_an_equal_config(cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("dump") / "config.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def test_dump_toml_writes_every_default() -> None:
    text = dump_toml(Config())
    for key, _, _ in LEAVES:
        section, _, name = key.rpartition(".")
        if section:
            assert f"[{section}]" in text, section
        assert re.search(rf"^{re.escape(name)} = ", text, re.MULTILINE), key


# --- errors name the key and what was expected ----------------------------------------------

@pytest.mark.parametrize(("overrides", "key", "expected"), [
    (["dp.epsilon=3"], "dp.epsilon", "unknown key (known: accountant, "),
    (["nosuch.key=3"], "nosuch", "unknown key"),
    (["train.epochs=abc"], "train.epochs", "expected int, got 'abc'"),
    (["train.epochs=2.5"], "train.epochs", "expected int"),
    (["train.lr=fast"], "train.lr", "expected float, got 'fast'"),
    (["data.strict=maybe"], "data.strict", "expected bool, got 'maybe'"),
    (["model.blocks=1,x"], "model.blocks", "expected comma-separated integers"),
    (["model.blocks="], "model.blocks", "expected comma-separated integers"),
    (["train.epochs=0"], "train.epochs", "expected a value in [1, inf], got 0"),
    (["dp.delta=2"], "dp.delta", "expected a value in [0.0, 1.0], got 2.0"),
    (["data.image_size=256"], "data.image_size", "expected a value in [32, 128]"),
    (["train.lr=-0.1"], "train.lr", "expected a value in [0.0, inf]"),
    (["train.lr=nan"], "train.lr", "expected a value in [0.0, inf], got nan"),
    (["data.male_fraction=nan"], "data.male_fraction", "expected a value in [0.0, 1.0], got nan"),
    (["train.margin=softmax"], "train.margin", "expected one of arcface, cosface, got 'softmax'"),
    (["dp.mode=central"], "dp.mode", "expected one of "),
    (["data.image_size=40"], "data.image_size", "expected a multiple of 16, got 40"),
    (["data.source=celeba"], "data.path", "required for data.source='celeba'"),
    (["train.task=attribute", "train.attribute=age"], "train.attribute", "expected one of ('gender', 'smiling')"),
    (["dp.mode=sample", "dp.target_epsilon=inf", "dp.noise_multiplier=0"], "dp.noise_multiplier", "expected > 0"),
    (["dp=3"], "dp", "expected a table, got '3'"),
    (["seed.x=1"], "seed", "expected int"),
])
def test_bad_value_names_key_and_expectation(overrides: list[str], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert message.startswith(f"{key}:") or f" {key}:" in message or f"{key} " in message, message
    assert expected in message, message


def test_fractions_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match=r"split\.member \+ split\.nonmember \+ split\.aux \+ split\.probe "
                                          r"must sum to 1.*'member': 0\.5"):
        load_config(None, ["split.member=0.5"])
    # Rebalanced fractions are fine.
    cfg = load_config(None, ["split.member=0.5", "split.aux=0.3"])
    assert (cfg.split.member, cfg.split.aux) == (0.5, 0.3)


def test_value_where_a_table_is_expected_in_overrides() -> None:
    with pytest.raises(ConfigError, match=r"dp\.mode\.x: 'mode' is a value, not a table"):
        from_flat({"dp.mode": "off", "dp.mode.x": 1})


@pytest.mark.parametrize("item", ["dp.target_epsilon", "=4", " =4", ""])
def test_malformed_override_is_named(item: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(item)) + ".*expected KEY=VALUE"):
        load_config(None, [item])


def test_bad_toml_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("seed = = 1\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": not valid TOML"):
        load_config(path)
    path.write_bytes(b"seed = 1\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nope.toml")) + ": configuration file not found"):
        load_config(tmp_path / "nope.toml")


def test_bad_value_in_toml_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[train]\nbatch_size = "big"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: train.batch_size: expected int, got 'big'"
    path.write_text("[train]\nbatch_size = true\n")  # TOML booleans are not integers
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int, got True"):
        load_config(path)
    path.write_text("[data]\nstrict = 1\n")  # ... nor integers booleans
    with pytest.raises(ConfigError, match=r"data\.strict: expected bool, got 1"):
        load_config(path)
    path.write_text('data = "synthfaces"\n')
    with pytest.raises(ConfigError, match=r"data: expected a table"):
        load_config(path)
