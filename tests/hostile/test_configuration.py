"""Hostile configuration: flat keys (Flower's run config, --set), TOML files, the facefl CLI.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_config import LEAVES, _leaf_strategy

from common.config import Config, ConfigError, dump_toml, from_flat, load_config

from .conftest import ROOT, Scratch, fuzz, listing

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


HUGE_INTS = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400, 10**5000, -(10**5000)])
HOSTILE_TEXT = st.sampled_from(["", " ", ",", "1,,2", "nan", "inf", "-inf", "1e999", "9" * 5000, "\udcff",
                                "\x00", "0x10", "true", "[1]", "é" * 3, "a=b"])
HOSTILE_SCALARS = st.one_of(st.integers(), HUGE_INTS, st.floats(), st.booleans(), st.none(), st.text(max_size=12),
                            HOSTILE_TEXT, st.binary(max_size=6), st.datetimes())
HOSTILE_VALUES = st.one_of(HOSTILE_SCALARS, st.lists(HOSTILE_SCALARS, max_size=3),
                           st.dictionaries(st.text(max_size=4), HOSTILE_SCALARS, max_size=2))
LEAF = {key: (typ, f.metadata) for key, typ, f in LEAVES}
VALID = {key: _leaf_strategy(key, typ, f) for key, typ, f in LEAVES}
KNOWN_KEYS = st.sampled_from(sorted(LEAF))
ODD_KEYS = st.one_of(st.text(max_size=12), KNOWN_KEYS.map(lambda k: k + ".x"), KNOWN_KEYS.map(lambda k: k + "."),
                     KNOWN_KEYS.map(lambda k: k.replace(".", "..")),
                     st.sampled_from(["", ".", ".seed", "dp.epsilon", "nosuch.key", "dp", "he.enabled.x"]))


def _blamed(keys: typing.Collection[str]) -> set[str]:
    """What an error about these keys may start with: a key, one of its dotted prefixes, its repr."""
    out = set()
    for key in keys:
        parts = key.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} | {key, repr(key)[:40]}
    return out


def assert_names_a_key(message: str, mutated: typing.Collection[str]) -> None:
    """The message starts with a mutated key (or its table), or, when a known key was changed,
    with the key of the cross-field rule that failed (``dp.target_epsilon=0`` blames
    ``dp.noise_multiplier``); hostile values are cut short, so the message stays readable."""
    partners = set(LEAF) if any(key in LEAF for key in mutated) else set()
    candidates = sorted(_blamed(mutated) | partners, key=len, reverse=True)
    assert any(message.startswith((c + ":", c + " +"))
               or (c.startswith("'") and message.startswith(c)) for c in candidates if c), message[:300]
    assert len(message) < 1000, message[:300]


def assert_sane(cfg: Config, directory: Path) -> None:
    """A configuration that loaded is one every component can use: every int fits Flower's 64-bit
    ints, floats are finite (target_epsilon may be inf), and the flat form and config.toml
    (UTF-8) both read back to the same configuration."""
    for key, value in cfg.to_flat().items():
        if isinstance(value, int) and not isinstance(value, bool):
            assert -(2**63) <= value < 2**63, key
        if isinstance(value, float) and key != "dp.target_epsilon":
            assert math.isfinite(value), key
    assert from_flat(cfg.to_flat()) == cfg
    path = directory / "config.toml"
    path.write_bytes(dump_toml(cfg).encode("utf-8"))
    assert load_config(path) == cfg


@st.composite
def flat_mutations(draw: st.DrawFn) -> dict[str, Any]:
    """One to three keys set: known keys to valid or hostile values, malformed or unknown keys."""
    out = {}
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)):  # mostly known keys
            key = draw(KNOWN_KEYS)
            out[key] = draw(st.one_of(VALID[key], HOSTILE_VALUES))
        else:
            out[draw(ODD_KEYS)] = draw(HOSTILE_VALUES)
    return out


@fuzz(150)
@given(mutations=flat_mutations())
def test_flat_config_loads_or_names_the_key(mutations: dict[str, Any], scratch: Scratch) -> None:
    """Flower's run config and wire messages carry flat keys: any mix of known, unknown and
    malformed keys with values of any type either loads sanely or raises ConfigError naming it."""
    try:
        cfg = from_flat({**Config().to_flat(), **mutations})
    except ConfigError as exc:
        event("rejected")
        assert_names_a_key(str(exc), mutations)
    else:
        event("loaded")
        assert_sane(cfg, scratch.new())


@pytest.mark.parametrize(("mutations", "start"), [
    ({"dp": {"": 1}}, "dp: expected a value, got a table"),  # found by the fuzzer above (random seeds)
    ({"dp": {"\xe6S": 1}}, "dp: expected a value, got a table"),
    ({"dp": 10**5000}, "dp: expected a table, got <integer of 16610 bits>"),
    ({"dp": 10**400}, "dp: expected a table, got 1000"),
    ({"dp": {"x": 10**5000}}, "dp: expected a value, got a table <dict holding an integer too large to print>"),
])
def test_a_section_given_as_one_flat_value_is_refused_naming_it(mutations: dict[str, Any], start: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_flat({**Config().to_flat(), **mutations})
    assert str(info.value).startswith(start) and len(str(info.value)) < 1000, str(info.value)[:300]
    assert_names_a_key(str(info.value), mutations)


def test_an_empty_key_in_a_toml_table_is_named(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[dp]\n"" = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"job.toml: dp: an empty key name \(known: accountant"):
        load_config(path)


def _bad_values(typ: Any, meta: typing.Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """Values the schema must refuse for a field of type ``typ`` with ``meta`` (range, choices)."""
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    wrong_type = st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), max_size=2))
    if typ is bool:
        return st.one_of(wrong_type, st.integers(), st.floats(), st.sampled_from(["maybe", "", "2", "on"]))
    if typ is str:
        bad = st.one_of(wrong_type, st.integers(), st.floats(), st.booleans(), st.just("\udcff"))
        return st.one_of(bad, st.text(max_size=10).filter(lambda s: s not in choices)) if choices else bad
    if typ is int:
        out = [wrong_type, st.booleans(), HUGE_INTS, st.floats().filter(lambda x: not x.is_integer()),
               st.sampled_from(["abc", "", "1.5", "0x10", "1e3", "9" * 5000])]
        if lo is not None:
            out.append(st.integers(max_value=int(lo) - 1))
        if hi is not None:
            out.append(st.integers(min_value=int(hi) + 1, max_value=2**62))
        return st.one_of(out)
    if typ is float:
        out = [wrong_type, st.booleans(), st.just(float("nan")), st.just(10**400),
               st.sampled_from(["abc", "", "1,5", "one"])]
        if lo is not None:
            out += [st.floats(max_value=lo, exclude_max=True), st.just(-math.inf)]
        if hi is not None:
            out.append(st.floats(min_value=hi, exclude_min=True))
        if not meta.get("infinite"):
            out.append(st.just(math.inf))
        return st.one_of(out)
    elem = typing.get_args(typ)[0]  # tuple[int, ...] or tuple[float, ...]
    out = [st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
           st.binary(min_size=1, max_size=3), st.sampled_from(["", "x", "1,x", ",", "nan"])]
    if elem is int:
        out += [st.lists(st.integers(max_value=0), min_size=1, max_size=3), st.just([2**63]), st.just([1.5])]
    else:
        out += [st.just([10**400]), st.lists(st.floats(min_value=1, exclude_min=True), min_size=1, max_size=3)]
    return st.one_of(out)


@fuzz(150)
@given(data=st.data())
def test_bad_value_names_its_key(data: st.DataObject) -> None:
    """A value of the wrong type, out of range, NaN, infinite where not allowed, a huge integer
    or undecodable text is refused with a ConfigError that starts with exactly that key."""
    key = data.draw(KNOWN_KEYS, label="key")
    value = data.draw(_bad_values(*LEAF[key]), label="value")
    with pytest.raises(ConfigError) as info:
        from_flat({**Config().to_flat(), key: value})
    assert str(info.value).startswith(f"{key}:"), str(info.value)[:300]
    assert len(str(info.value)) < 1000


DEFAULT_TOML = dump_toml(Config())
TOML_TOKENS = st.sampled_from(["nan", "inf", "-inf", "1e999", "9" * 30, "9" * 5000, "[[[[", "[" * 3000 + "]" * 3000,
                               "{a = 1}", "true", '"x"', "1979-05-27T07:32:00Z", "0x7fffffffffffffff", "[1, 2]",
                               '""', '"\\udcff"', "= =", "[dp]", "[[dp]]", "'''", "\x00"])


@st.composite
def mutated_toml(draw: st.DrawFn) -> bytes:
    """The default config.toml with a value replaced by a hostile token, text inserted or cut,
    a line repeated, or bytes that are not UTF-8."""
    lines = DEFAULT_TOML.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["value", "insert", "cut", "repeat"]))
        if how == "value" and " = " in lines[i]:
            lines[i] = lines[i].split(" = ")[0] + " = " + draw(TOML_TOKENS) + "\n"
        elif how == "insert":
            lines.insert(i, draw(st.one_of(st.text(max_size=20), TOML_TOKENS)) + draw(st.sampled_from(["", "\n"])))
        elif how == "cut":
            del lines[i:i + draw(st.integers(1, 3))]
        else:
            lines.insert(i, lines[i])
    return "".join(lines).encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"", b"\xff\xfe", b"\n\x80"]))


@fuzz(120)
@given(text=mutated_toml())
def test_toml_file_loads_or_names_the_file(text: bytes, scratch: Scratch) -> None:
    """A damaged TOML file (bad syntax, bad UTF-8, deep nesting, 5000-digit numbers, NaN, values
    of the wrong type) loads sanely or raises ConfigError starting with the file's path."""
    directory = scratch.new()
    path = directory / "job.toml"
    path.write_bytes(text)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        event("rejected: " + str(exc)[len(str(path)) + 2:][:14])
        assert str(exc).startswith(f"{path}: "), str(exc)[:300]
        assert len(str(exc)) < 1000 + len(str(path))
    else:
        event("loaded")
        assert_sane(cfg, directory)


def test_a_huge_unknown_key_is_named_briefly(scratch: Scratch) -> None:
    """Found by the fuzzer above: a bare key of 5000 digits was echoed whole in the error."""
    path = scratch.new() / "job.toml"
    path.write_text("9" * 5000 + "seed = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"job\.toml: 9{80}\.\.\.: unknown key") as err:
        load_config(path)
    assert len(str(err.value)) < 400 + len(str(path))


@fuzz(100)
@given(items=st.lists(st.one_of(st.text(max_size=16), st.tuples(KNOWN_KEYS, st.one_of(HOSTILE_TEXT, st.text(max_size=8)))
                                .map("=".join)), min_size=1, max_size=3))
def test_cli_overrides_load_or_name_the_item(items: list[str], scratch: Scratch) -> None:
    """``--set`` items are free text: each loads, or the error names the item or its key."""
    try:
        cfg = load_config(None, items)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("override "):  # no '=' or no key: the item itself is quoted
            assert any(message.startswith(f"override {item!r}: expected KEY=VALUE") for item in items), message
        else:
            assert_names_a_key(message, [item.partition("=")[0].strip() for item in items])
    else:
        assert_sane(cfg, scratch.new())


@pytest.mark.parametrize(("argv", "key"), [
    (["--set", "dp.mode=bogus"], "dp.mode"),
    (["--set", "nosuch.key=1"], "nosuch"),
    (["--set", "train.lr=1e999"], "train.lr"),
    (["--set", "seed=99999999999999999999"], "seed"),
    (["--set", "data.path=\udcff"], "data.path"),  # what Python makes of undecodable argv bytes
    (["--set", "model.blocks"], "model.blocks"),
    ([Path("broken.toml")], "broken.toml"),
], ids=["bad-choice", "unknown-key", "infinite", "huge-int", "undecodable", "no-equals", "bad-toml"])
def test_facefl_run_with_a_bad_config_fails_naming_the_key_and_creates_nothing(
        argv: list[Any], key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """In process (the real command is run once below): exit status 2, the key in the message,
    and the --out tree exactly as it was (no run directory, no temp file)."""
    from workflow import cli

    monkeypatch.setattr(cli, "_quiet_libraries", lambda verbose: None)  # keep the session's warning filters
    out = tmp_path / "runs"
    (out / "run-earlier").mkdir(parents=True)
    (tmp_path / "broken.toml").write_text("[train]\nlr = = 1\n")
    before = listing(tmp_path)
    code = cli.main(["run", *[str(tmp_path / a) if isinstance(a, Path) else a for a in argv], "--out", str(out)])
    assert code == 2
    assert key in capsys.readouterr().err
    assert listing(tmp_path) == before


@pytest.mark.timeout(180)
def test_facefl_command_exits_non_zero_on_a_bad_config_file(tmp_path: Path) -> None:
    """The real ``facefl run`` process with an unknown key in its TOML file: a non-zero exit
    status, the file and key on stderr, and no new directory under --out."""
    config = tmp_path / "job.toml"
    config.write_text("seed = 3\n[dp]\nepsilon = 4\n")
    out = tmp_path / "runs"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "workflow.cli", "run", str(config), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode != 0
    assert f"{config}: dp.epsilon: unknown key" in proc.stderr, proc.stderr[-2000:]
    assert list(out.iterdir()) == []
