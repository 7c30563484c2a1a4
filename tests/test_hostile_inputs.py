"""Hostile inputs: property-based fuzzing of everything facefl reads from outside the process.

Each section takes a valid artefact (configuration, split manifest, safetensors checkpoint, MOTE
gallery, CKKS ciphertexts and key contexts, npz archive, data set trees, Flower payloads), damages
it the way an attacker, a flipped bit or an interrupted copy would, and checks three properties:

* the reader returns a valid object or raises the module's documented error (ConfigError,
  ValueError and its subclasses CiphertextError / HEKeyError / SampleError, FileNotFoundError):
  never a crash (segfault, MemoryError, AttributeError, RecursionError, ...);
* the message names the file, key or client at fault;
* nothing is left behind: a failed read leaves its directory as it was, an interrupted write
  leaves neither the file nor a temporary file, and ``facefl run`` with a bad configuration
  creates no run directory.

Examples are derandomised and no example database is kept, so every run (and CI) tries the same
inputs; the whole file takes well under a minute on one core.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import typing
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures_faces import (
    make_celeba,
    make_fairface,
    make_imagefolder,
    make_lfw,
    make_utkface,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from test_config import LEAVES, _leaf_strategy

from common.config import Config, ConfigError, dump_toml, from_flat, load_config

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[1]

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


def listing(root: Path) -> list[str]:
    """Every file and directory under ``root`` with its size: what a failed read must not change."""
    return sorted(f"{p.relative_to(root)}:{p.stat().st_size if p.is_file() else 'dir'}" for p in root.rglob("*"))


class Scratch:
    """A fresh directory per example under one pytest temporary directory (hypothesis reruns a
    test body many times; function-scoped ``tmp_path`` would be shared by all of them)."""

    def __init__(self, base: Path) -> None:
        self.base, self.count = base, 0

    def new(self) -> Path:
        self.count += 1
        path = self.base / f"ex{self.count:05d}"
        path.mkdir()
        return path


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    return Scratch(tmp_path)


HUGE_INTS = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**400, 10**5000, -(10**5000)])
HOSTILE_TEXT = st.sampled_from(["", " ", ",", "1,,2", "nan", "inf", "-inf", "1e999", "9" * 5000, "\udcff",
                                "\x00", "0x10", "true", "[1]", "é" * 3, "a=b"])
HOSTILE_SCALARS = st.one_of(st.integers(), HUGE_INTS, st.floats(), st.booleans(), st.none(), st.text(max_size=12),
                            HOSTILE_TEXT, st.binary(max_size=6), st.datetimes())
HOSTILE_VALUES = st.one_of(HOSTILE_SCALARS, st.lists(HOSTILE_SCALARS, max_size=3),
                           st.dictionaries(st.text(max_size=4), HOSTILE_SCALARS, max_size=2))


# =============================================================================================
# configuration: flat keys (Flower's run config, --set), TOML files, the facefl CLI
# =============================================================================================

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


# =============================================================================================
# split manifest (manifest.json): the audit's ground truth
# =============================================================================================

@pytest.fixture(scope="module")
def manifest_doc(synth_small) -> tuple[dict[str, Any], str]:
    from common.split.manifest import SplitConfig, make_manifest

    m = make_manifest(synth_small, SplitConfig(num_clients=2, partition="iid", seed=1))
    return m.to_json(), m.fingerprint


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) into a JSON document."""
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    return [prefix] + [p for k, v in children for p in _paths(v, (*prefix, k))]


def _resolve(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


JSON_VALUES = st.one_of(st.integers(), st.sampled_from([-1, 2**63, 10**300]), st.floats(), st.booleans(), st.none(),
                        st.text(max_size=8), st.just([]), st.just({}), st.lists(st.integers(-3, 3), max_size=3))


@st.composite
def mutated_manifest(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """Keys deleted, values replaced by other JSON types, ids duplicated within or across roles
    and clients, codes negated, unknown keys added, the fingerprint changed."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        how = draw(st.sampled_from(["delete", "replace", "duplicate", "negate", "unknown", "fingerprint"]))
        try:
            parent, node = (_resolve(doc, path[:-1]), _resolve(doc, path)) if path else (None, doc)
        except (KeyError, IndexError, TypeError):
            continue
        if how == "delete" and path:
            del parent[path[-1]]
        elif how == "replace" and path:
            parent[path[-1]] = draw(JSON_VALUES)
        elif how == "duplicate" and isinstance(node, list) and node:
            other = draw(st.sampled_from([p for p in _paths(doc) if p and isinstance(_resolve(doc, p), list)]))
            _resolve(doc, other).append(draw(st.sampled_from(node)))
        elif how == "negate" and isinstance(node, int) and not isinstance(node, bool) and path:
            parent[path[-1]] = -node - 1
        elif how == "unknown" and isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        elif how == "fingerprint":
            doc["fingerprint"] = draw(st.text("0123456789abcdef", min_size=64, max_size=64))
    return doc


MANIFEST_KEYS = ("<root>", "version", "source", "fingerprint", "num_samples", "config", "counts", "samples",
                 "identities", "clients", "client_summary", "manifest fingerprint")


def check_manifest_file(path: Path, fingerprint: str) -> None:
    """Load with the expected fingerprint: a manifest whose invariants hold, or a ValueError that
    names the file and the key at fault; the directory is left as it was."""
    from common.split.manifest import ROLES, Manifest

    before = listing(path.parent)
    try:
        m = Manifest.load(path, expect_fingerprint=fingerprint)
    except ValueError as exc:
        event("rejected: " + str(exc)[len(str(path)) + 2:][:14])
        head = re.escape(f"{path}: ")
        assert re.match(rf"{head}({'|'.join(map(re.escape, MANIFEST_KEYS))}|not valid JSON)", str(exc)), str(exc)[:300]
    else:
        event("loaded")
        sample_roles = [s for r in ROLES for s in m.samples[r]]
        assert len(sample_roles) == len(set(sample_roles)) == m.num_samples
        on_clients = [s for c in m.clients for s in c]
        assert len(on_clients) == len(set(on_clients)) and set(on_clients) == set(m.samples["member"])
        assert all(i >= 0 for r in ROLES for i in m.identities[r])
        assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert listing(path.parent) == before


@fuzz(120)
@given(data=st.data())
def test_mutated_manifest_loads_or_names_the_key(manifest_doc, data: st.DataObject, scratch: Scratch) -> None:
    doc, fingerprint = manifest_doc
    path = scratch.new() / "manifest.json"
    path.write_text(json.dumps(data.draw(mutated_manifest(doc), label="manifest")))
    check_manifest_file(path, fingerprint)


@fuzz(60)
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
       tail=st.sampled_from([b"", b"\xff", b"[" * 100000, b"9" * 5000, b"NaN"]), alone=st.booleans())
def test_damaged_manifest_bytes_name_the_file(manifest_doc, cut: int, flips: list[tuple[int, int]], tail: bytes,
                                              alone: bool, scratch: Scratch) -> None:
    """Truncated, bit-flipped or padded files, or nothing but bad UTF-8, deep nesting or a
    5000-digit number (Python's json raises RecursionError and a ValueError naming no file)."""
    doc, fingerprint = manifest_doc
    raw = bytearray(json.dumps(doc).encode())
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    path = scratch.new() / "manifest.json"
    path.write_bytes(tail if alone else bytes(raw[: max(1, len(raw) - cut % len(raw))]) + tail)
    check_manifest_file(path, fingerprint)


@pytest.mark.parametrize(("tamper", "problem"), [
    (lambda d: d["identities"]["aux"].append(-1), r"identities\.aux: invalid entry -1"),
    (lambda d: d.update(version=True), r"version: expected 1, got True"),
    (lambda d: d["config"].update(alpha=10**400), r"config: SplitConfig\.alpha: expected a finite number"),
    (lambda d: d["samples"]["probe"].append(d["samples"]["member"][0]), r"samples\.probe: .* is listed twice"),
])
def test_manifest_regressions(manifest_doc, tmp_path: Path, tamper: Callable[[dict], None], problem: str) -> None:
    """Negative identity codes and a boolean version used to load; a huge integer for a float
    field raised OverflowError."""
    from common.split.manifest import Manifest

    doc = copy.deepcopy(manifest_doc[0])
    tamper(doc)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + problem):
        Manifest.load(path)


def test_reading_a_directory_as_json_names_it(tmp_path: Path) -> None:
    from common.split.manifest import Manifest

    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: cannot read")):
        Manifest.load(tmp_path)


# =============================================================================================
# safetensors checkpoints and MOTE galleries
# =============================================================================================

SPEC_KW = {"width": 4, "blocks": (1,), "embedding_dim": 8, "image_size": 32, "attribute_head": False}


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, torch.Tensor]]:
    from common.nn.build import build_model
    from common.nn.checkpoint import save_checkpoint
    from common.nn.face_model import ModelSpec

    state = build_model(ModelSpec(**SPEC_KW), 0).state_dict()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", state,
                           {"round": 3, "spec": ModelSpec(**SPEC_KW).to_dict()})
    return path.read_bytes(), state


def _split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


ST_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "C64", "F8_E4M3", "XYZ"])
FACEFL_META = st.one_of(st.text(max_size=10), st.sampled_from(["[1]", "3", "null", "[" * 5000, "9" * 5000, "{}",
                                                               '{"spec": 1}', "\udcff"]))


@st.composite
def damaged_checkpoint(draw: st.DrawFn, raw: bytes) -> bytes:
    """Truncated, bit-flipped, a header length that lies, or a header whose tensor entries
    (dtype, shape, offsets) or metadata are changed while the data stay as they were."""
    how = draw(st.sampled_from(["truncate", "flip", "length", "tensor", "metadata"]))
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flip":
        out = bytearray(raw)
        for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                       max_size=6)):
            out[pos] ^= mask
        return bytes(out)
    if how == "length":
        (n,) = struct.unpack("<Q", raw[:8])
        lie = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, n - 1, n + 1, 2**63, 2**64 - 1])))
        return struct.pack("<Q", lie) + raw[8:]
    header, data = _split_safetensors(raw)
    if how == "tensor":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename"]))
        if field == "dtype":
            header[name]["dtype"] = draw(ST_DTYPES)
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-1, 2**40), max_size=4))
        elif field == "data_offsets":
            header[name]["data_offsets"] = draw(st.lists(st.integers(-1, len(data) + 8), min_size=2, max_size=2))
        elif field == "drop":
            del header[name]
        else:
            header[draw(st.text(max_size=8))] = header.pop(name)
    else:
        meta = header.setdefault("__metadata__", {})
        if draw(st.booleans()):
            meta["facefl"] = draw(FACEFL_META)
        else:
            meta.pop("facefl", None)
    blob = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + data


@fuzz(150)
@given(data=st.data())
def test_damaged_checkpoint_loads_or_names_the_file(checkpoint_bytes, data: st.DataObject, scratch: Scratch) -> None:
    """A checkpoint either loads into the model it claims to be (same tensors, shapes, dtypes:
    ``check_state``) or raises ValueError naming the file; the directory is left as it was."""
    from common.nn.build import build_model
    from common.nn.checkpoint import check_state, load_checkpoint
    from common.nn.face_model import ModelSpec

    raw, reference = checkpoint_bytes
    path = scratch.new() / "model.safetensors"
    path.write_bytes(data.draw(damaged_checkpoint(raw), label="file"))
    before = listing(path.parent)
    try:
        state, meta = load_checkpoint(path)
        check_state(path, state, reference)
    except ValueError as exc:
        event("rejected: " + str(exc)[len(str(path)) + 2:][:20])
        assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    else:
        event("loaded")
        assert isinstance(meta, dict)
        build_model(ModelSpec(**SPEC_KW), 0).load_state_dict(state, strict=True)
    assert listing(path.parent) == before


def test_check_state_names_the_tensor(checkpoint_bytes, tmp_path: Path) -> None:
    """What ``load_state_dict`` would turn into a RuntimeError (shape) or silently cast (dtype)."""
    from common.nn.checkpoint import check_state

    _, reference = checkpoint_bytes
    name = next(k for k, v in reference.items() if v.is_floating_point())
    for bad, problem in (({**reference, name: reference[name].double()}, "torch.float64"),
                         ({**reference, name: reference[name].flatten()[:1]}, r"\(1,\)"),
                         ({k: v for k, v in reference.items() if k != name}, "missing")):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: ") + f".*{problem}"):
            check_state(tmp_path, bad, reference)


GALLERY_K, GALLERY_DIM = 3, 8


@pytest.fixture(scope="module")
def gallery_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a valid 3-identity gallery, as ``MoteGallery.save`` writes them."""
    from common.mote.gallery import MoteGallery
    from common.mote.networks import _param_shapes
    from common.nn.checkpoint import load_checkpoint

    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(GALLERY_K, *s, generator=gen) for n, s in _param_shapes(GALLERY_DIM).items()}
    path = tmp_path_factory.mktemp("gallery") / "gallery.safetensors"
    MoteGallery(np.array([4, 9, 2]), params, np.array([0.0, 0.5, 1.0]), seed=5, info={"b": 0.5}).save(path)
    return load_checkpoint(path)


TENSOR_DAMAGE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transpose": lambda t: t.T.contiguous() if t.ndim > 1 else t[:1], "extra-dim": lambda t: t.unsqueeze(-1).contiguous(),
    "trim": lambda t: t[:-1].contiguous(), "int": lambda t: t.to(torch.int32), "double": lambda t: t.double(),
    "nan": lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "scalar": lambda t: torch.tensor(1.0)}


@st.composite
def damaged_gallery(draw: st.DrawFn, parts: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> tuple[dict, dict]:
    state, meta = dict(parts[0]), copy.deepcopy(parts[1])
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(state)))
            how = draw(st.sampled_from(["drop", "transpose", "extra-dim", "trim", "int", "double", "nan", "scalar"]))
            t = state.pop(name)
            if how != "drop":
                state[name] = TENSOR_DAMAGE[how](t)
        else:
            key = draw(st.sampled_from(["identity_ids", "balancing_factor", "seed", "info", "format", "version",
                                        "embedding_dim"]))
            meta[key] = draw(st.one_of(JSON_VALUES, st.just([4, 4, 2]), st.just([4, 9]), st.just([0.0, 2.0, 0.5]),
                                       st.just([4.5, 9, 2]), st.just(["a", "b", "c"])))
    return state, meta


@fuzz(100)
@given(data=st.data())
def test_damaged_gallery_loads_and_scores_or_names_the_file(gallery_parts, data: st.DataObject,
                                                            scratch: Scratch) -> None:
    """A stolen-and-returned or corrupted gallery file: it loads and scores every probe against
    every identity, or raises ValueError naming the file (never an error deep inside torch)."""
    from common.mote.gallery import MoteGallery
    from common.nn.checkpoint import save_checkpoint

    state, meta = data.draw(damaged_gallery(gallery_parts), label="gallery")
    path = save_checkpoint(scratch.new() / "gallery.safetensors", state, meta)
    try:
        gallery = MoteGallery.load(path)
    except ValueError as exc:
        event("rejected: " + str(exc)[len(str(path)) + 2:][:20])
        assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    else:
        event("loaded")
        scores = gallery.scores(np.ones((2, gallery.dim), dtype=np.float32))
        assert scores.shape == (2, len(gallery)) and np.isfinite(scores).all()


# =============================================================================================
# CKKS ciphertexts (what a client sends the server) and key contexts
# =============================================================================================

N_VALUES = 2100  # 2 ciphertexts of 2048 and 53 slots at N = 4096


@pytest.fixture(scope="module")
def he_setup(he_contexts) -> dict[str, Any]:
    from common.he.ckks import encrypt_weighted

    keys, secret, public, _ = he_contexts
    values = np.random.default_rng(0).normal(size=N_VALUES)
    return {"keys": keys, "secret": secret, "public": public,
            "good": encrypt_weighted(secret, values, 3), "other": encrypt_weighted(secret, values, 5)}


def _proto_fields(raw: bytes) -> dict[int, bytes]:
    """Field number -> encoded field (tag included) of a serialised TenSEAL CKKSVector: 1 the slot
    count, 2 the ciphertext, 3 the scale (a valid vector has exactly these, once each)."""
    from common.he.ckks import _varint

    out, i = {}, 0
    while i < len(raw):
        start = i
        tag, i = _varint(raw, i)
        n, i = _varint(raw, i) if tag & 7 == 2 else (8, i)
        out[tag >> 3] = raw[start:i + n]
        i += n
    return out


@st.composite
def hostile_ciphertexts(draw: st.DrawFn, good: Any) -> tuple[np.ndarray, np.ndarray]:
    """A client's (blob, lengths): one ciphertext bit-flipped, truncated, replaced by random bytes
    or by a crafted protobuf (no ciphertext, two, a lying size field), parts dropped, duplicated
    or swapped, or a length table that lies (negative, zero, int64 sums that wrap around, wrong
    dtype or shape)."""
    parts = list(good.split("good"))
    k = draw(st.integers(0, len(parts) - 1))
    how = draw(st.sampled_from(["flip", "truncate", "random", "proto", "order", "lengths", "dtype"]))
    if how == "flip":
        part = bytearray(parts[k])
        for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(part) - 1), st.integers(1, 255)), min_size=1,
                                       max_size=5)):
            part[pos] ^= mask
        parts[k] = bytes(part)
    elif how == "truncate":
        parts[k] = parts[k][: draw(st.integers(1, len(parts[k]) - 1))]
    elif how == "random":
        parts[k] = draw(st.binary(min_size=1, max_size=300))
    elif how == "proto":
        fields = _proto_fields(parts[k])
        ciphertext, other = fields[2], _proto_fields(parts[1 - k])[2]
        body = draw(st.sampled_from([[], [ciphertext], [ciphertext, ciphertext], [ciphertext, other], [other]]))
        size = draw(st.sampled_from([fields[1], b"\n\x03\xff\xff\x03", b"\n\x01\x00"]))
        scale = draw(st.sampled_from([fields[3], b"", fields[3] * 2, b"\x19" + struct.pack("<d", 2.0**41),
                                      b"\x19" + struct.pack("<d", np.nextafter(2.0**40, 0))]))
        parts[k] = size + b"".join(body) + scale
    elif how == "order":
        parts = draw(st.sampled_from([parts[::-1], parts[:1], parts + parts[-1:], []]))
    if how == "lengths":
        lengths = np.array(draw(st.one_of(
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
            st.just([2**63 - 1, 2**63 - 1, 2 + sum(map(len, parts))]),  # wraps to the blob's size
            st.just([len(parts[0]) - 10, len(parts[1]) + 10]), st.just([0, sum(map(len, parts))]))), dtype=np.int64)
        blob = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
        return blob, lengths
    packed = good.pack(parts) if parts else type(good)(np.zeros(0, np.uint8), np.zeros(0, np.int64))
    if how == "dtype":
        return draw(st.sampled_from([(packed.blob.astype(np.int64), packed.lengths),
                                     (packed.blob, packed.lengths.astype(np.int32)),
                                     (packed.blob, packed.lengths.astype(np.float64)),
                                     (packed.blob.reshape(1, -1), packed.lengths)]))
    return packed.blob, packed.lengths


@fuzz(150)
@given(data=st.data())
def test_hostile_ciphertexts_are_refused_naming_the_client(he_setup, data: st.DataObject) -> None:
    """The server parses every client's ciphertexts with its public context before adding them:
    a bad payload is a CiphertextError naming the client. What parses is added to an honest
    client's ciphertexts, and the key holder decrypts the sum or gets a CiphertextError; none of
    it crashes TenSEAL (a vector without ciphertext used to pass and then segfault when added)."""
    from common.he.ckks import (
        CiphertextError,
        Ciphertexts,
        EncryptedSum,
        decrypt_mean,
        parse,
    )

    blob, lengths = data.draw(hostile_ciphertexts(he_setup["good"]), label="payload")
    try:
        vectors = parse(he_setup["public"], Ciphertexts(blob, lengths), N_VALUES, "client 7 (node 9)")
    except CiphertextError as exc:
        event("refused: " + str(exc)[20:50])
        assert str(exc).startswith("client 7 (node 9): "), str(exc)[:300]
        return
    event("parsed")
    total = EncryptedSum(he_setup["public"], N_VALUES)
    total.add(parse(he_setup["public"], he_setup["other"], N_VALUES, "honest"), 5)
    total.add(vectors, 3)
    try:
        mean = decrypt_mean(he_setup["secret"], total.serialize(), N_VALUES, 8, "sum")
    except CiphertextError as exc:
        assert str(exc).startswith("sum: ")
    else:
        assert mean.shape == (N_VALUES,)


def test_length_table_whose_int64_sum_wraps_is_refused(he_setup) -> None:
    """Lengths 2^63-1, 2^63-1, size+2 sum to the blob's size modulo 2^64: the framing used to pass."""
    from common.he.ckks import CiphertextError, Ciphertexts

    blob = he_setup["good"].blob
    lengths = np.array([2**63 - 1, 2**63 - 1, blob.size + 2], dtype=np.int64)
    assert int(lengths.sum()) == blob.size  # what the old check compared
    with pytest.raises(CiphertextError, match="^c: ciphertext lengths"):
        Ciphertexts(blob, lengths).split("c")


def test_vector_without_ciphertext_is_refused_before_tenseal_touches_it(he_setup, tmp_path: Path) -> None:
    """TenSEAL parses a CKKSVector protobuf with a slot count but no ciphertext; adding it to
    a sum segfaults the server (checked in a child process), so ``parse`` must refuse it."""
    from common.he.ckks import CiphertextError, Ciphertexts, parse

    parts = he_setup["good"].split("good")
    empty = [_proto_fields(p)[1] for p in parts]
    with pytest.raises(CiphertextError, match="^client 3: ciphertext 0 holds 0 ciphertexts"):
        parse(he_setup["public"], Ciphertexts.pack(empty), N_VALUES, "client 3")
    script = ("import sys, tenseal as ts; ctx = ts.context_from(open(sys.argv[1], 'rb').read()); "
              "good = ts.ckks_vector_from(ctx, open(sys.argv[2], 'rb').read()); "
              "good.add_(ts.ckks_vector_from(ctx, open(sys.argv[3], 'rb').read()))")
    (tmp_path / "good.bin").write_bytes(parts[0])
    (tmp_path / "empty.bin").write_bytes(empty[0])
    proc = subprocess.run([sys.executable, "-c", script, str(he_setup["keys"] / "public-context.bin"),
                           str(tmp_path / "good.bin"), str(tmp_path / "empty.bin")],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0  # -11 (SIGSEGV) with tenseal 0.3.18: why the guard exists


@fuzz(40)
@given(data=st.data())
def test_damaged_key_files_name_the_file(he_setup, data: st.DataObject, scratch: Scratch) -> None:
    """A damaged secret or public context (or a public context whose key.json is damaged) is an
    HEKeyError naming the file, or a context of the right kind (secret for clients, public with
    a 64-hex fingerprint for the server)."""
    import tenseal as ts

    from common.he.keys import (
        KEY_INFO_FILE,
        PUBLIC_FILE,
        SECRET_FILE,
        HEKeyError,
        load_public_context,
        load_secret_context,
    )

    directory = scratch.new()
    for name in (SECRET_FILE, PUBLIC_FILE, KEY_INFO_FILE):
        shutil.copy(he_setup["keys"] / name, directory / name)
    target = directory / data.draw(st.sampled_from([SECRET_FILE, PUBLIC_FILE, KEY_INFO_FILE]), label="file")
    raw = bytearray(target.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "random"]), label="how")
    if how == "flip":
        for pos, mask in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                            max_size=4)):
            raw[pos] ^= mask
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    target.write_bytes(bytes(raw))
    for load, path in ((load_secret_context, directory / SECRET_FILE), (load_public_context, directory / PUBLIC_FILE)):
        try:
            got = load(path)
        except HEKeyError as exc:
            assert str(exc).startswith((f"{path}: ", f"{directory / KEY_INFO_FILE}: ")), str(exc)[:300]
        else:
            ctx = got[0] if isinstance(got, tuple) else got
            assert ctx.has_secret_key() == (load is load_secret_context)
            assert isinstance(got, ts.Context) or re.fullmatch("[0-9a-f]{64}", got[1])
            assert ctx.global_scale > 0  # a CKKS context with a scale, usable for encryption


def test_context_without_global_scale_is_refused(tmp_path: Path) -> None:
    """A BFV context, or CKKS without a scale, used to load and fail later on every client's
    ciphertexts with 'no global scale'."""
    import tenseal as ts

    from common.he.keys import HEKeyError, load_secret_context

    path = tmp_path / "secret-context.bin"
    path.write_bytes(ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 49],
                                encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC).serialize(save_secret_key=True))
    with pytest.raises(HEKeyError, match=re.escape(f"{path}: not a CKKS context with a global scale")):
        load_secret_context(path)


# =============================================================================================
# npz archives (data cache, `facefl data synth` output, audit arrays) and the no-pickle rule
# =============================================================================================

@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from common.data.dataset import FaceDataset

    ds = FaceDataset(images=np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3), identity=[0, 0, 1, 1],
                     gender=[0, 0, 1, 1], group=[0, 1, 0, -1], age=[0, 1, 2, -1], labels={"smiling": [0, 1, 1, -1]},
                     sample_ids=["a", "b", "c", "d"], source="test", group_names=("g0", "g1"))
    return ds.save_npz(tmp_path_factory.mktemp("npz") / "data.npz").read_bytes()


def _npy(shape: tuple[int, ...], descr: str, payload: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy stream whose header declares ``shape`` / ``descr`` whatever ``payload`` holds."""
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(out, header)
    return out.getvalue() + payload


NPY_MEMBERS = st.one_of(
    st.builds(_npy, st.sampled_from([(10**12,), (2**40, 2**20), (0,), (3,), (-1,), (4, 8, 8, 3)]),
              st.sampled_from(["<f8", "|u1", "<i8", "<U5", "|O", "<c16", "|b1"]), st.binary(max_size=64),
              st.sampled_from([(1, 0), (2, 0)])),
    st.binary(max_size=64), st.just(b"\x93NUMPY\x03\x00"), st.just(b"\x93NUMPY\x01\x00\xff\xff"))


@st.composite
def damaged_npz(draw: st.DrawFn, raw: bytes) -> bytes:
    """Bytes flipped or cut, or the archive rebuilt with a member replaced by a crafted .npy
    (a header declaring terabytes, pickled objects, bad versions), dropped, or stored with an
    unknown compression method."""
    how = draw(st.sampled_from(["flip", "truncate", "member", "drop", "method"]))
    if how in ("flip", "truncate"):
        out = bytearray(raw)
        if how == "truncate":
            return bytes(out[: draw(st.integers(0, len(out) - 1))])
        for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(out) - 1), st.integers(1, 255)), min_size=1,
                                       max_size=6)):
            out[pos] ^= mask
        return bytes(out)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    # header.npy's JSON: test_npz_header_of_the_wrong_shape_names_the_file
    name = draw(st.sampled_from(sorted(n for n in members if n != "header.npy")))
    if how == "drop":
        del members[name]
    elif how == "member":
        members[name] = draw(NPY_MEMBERS)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    out = bytearray(buffer.getvalue())
    if how == "method":  # the local header's compression method of the first member
        out[8:10] = struct.pack("<H", draw(st.sampled_from([1, 12, 14, 99, 0xFFFF])))
    return bytes(out)


@fuzz(120)
@given(data=st.data())
def test_damaged_npz_loads_or_names_the_file(npz_bytes: bytes, data: st.DataObject, scratch: Scratch) -> None:
    """``load_npz`` and ``FaceDataset.load_npz`` return arrays / a data set or raise ValueError
    naming the file; a header declaring more bytes than the member holds is refused before
    numpy allocates it (a 60-byte member used to ask for 7 TiB: MemoryError)."""
    from common.data.dataset import FaceDataset
    from common.runs.io import load_npz

    path = scratch.new() / "data.npz"
    path.write_bytes(data.draw(damaged_npz(npz_bytes), label="file"))
    before = listing(path.parent)
    try:
        arrays = load_npz(path)
    except ValueError as exc:
        event("refused: " + str(exc)[len(str(path)) + 2:][:24])
        assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    else:
        event("loaded")
        assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
        assert sum(a.nbytes for a in arrays.values()) < 10**6
        try:
            FaceDataset.load_npz(path).fingerprint()
        except ValueError as exc:
            assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    assert listing(path.parent) == before


def test_array_header_declaring_terabytes_is_refused_before_allocation(tmp_path: Path) -> None:
    """A few bytes whose .npy header declares 10^12 float64 (8 TB): numpy would allocate first
    and fail with MemoryError (or succeed and swap); the size check refuses it, naming the place,
    also when the zip directory claims the member is that large."""
    from flwr.app import Array, ArrayRecord

    from common.runs.io import load_npz
    from common.wire import record_to_numpy

    bomb = _npy((10**12,), "<f8", b"\0" * 16)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as zf:
        zf.writestr("images.npy", bomb)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bomb.npz'}: member 'images.npy'") + ".*declares"):
        load_npz(tmp_path / "bomb.npz")
    record = ArrayRecord({"fc.weight": Array(dtype="float64", shape=(3,), stype="numpy.ndarray", data=bomb)})
    with pytest.raises(ValueError, match="array 'fc.weight'.*declares"):
        record_to_numpy(record)
    # The zip directory's sizes are claims too: 4 GB claimed for a 100-byte member.
    raw = bytearray((tmp_path / "bomb.npz").read_bytes())
    central = raw.rfind(b"PK\x01\x02")
    raw[22:26] = raw[central + 24:central + 28] = struct.pack("<I", 0xFFFFFFF0)
    (tmp_path / "bomb.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bomb.npz'}: member 'images.npy'") + ".*declares"):
        load_npz(tmp_path / "bomb.npz")


class _Touch:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_pickled_arrays_are_never_unpickled(tmp_path: Path) -> None:
    """Every ``np.load`` in facefl (and Flower's Array.numpy) passes allow_pickle=False: an npz
    or wire payload holding a pickle is refused, and the pickle never runs."""
    from flwr.app import Array, ArrayRecord

    from common.runs.io import load_npz
    from common.wire import record_to_numpy

    marker = tmp_path / "unpickled"
    payload = np.array([_Touch(marker)], dtype=object)
    np.savez(tmp_path / "evil.npz", x=payload)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'evil.npz'}: ")):
        load_npz(tmp_path / "evil.npz")
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    record = ArrayRecord({"weights": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())})
    with pytest.raises(ValueError, match="array 'weights'"):
        record_to_numpy(record)
    assert not marker.exists()


def test_no_code_path_unpickles() -> None:
    """Source check: no pickle / torch.load / np.load(allow_pickle=True) in facefl's packages."""
    offenders = []
    for path in sorted(p for pkg in ("common", "client", "server", "attacks") for p in (ROOT / pkg).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\bimport pickle\b|\bpickle\.load", r"allow_pickle\s*=\s*True",
                        r"torch\.load\((?![^)]*weights_only=True)", r"np\.load\((?![^)]*allow_pickle=False)"):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


@pytest.mark.parametrize("change", [[1], 3, {"source": 3}, {"source": ["a"]}, {"group_names": 5}, {"labels": 5},
                                    {"identity_names": 7}],
                         ids=["list", "number", "source-int", "source-list", "group-names-int", "labels-int",
                              "identity-names-int"])
def test_npz_header_of_the_wrong_shape_names_the_file(npz_bytes: bytes, tmp_path: Path, change: Any) -> None:
    """The archive's JSON header replaced (list, number) or one of its fields given another type."""
    from common.data.dataset import FaceDataset
    from common.runs.io import atomic_save_npz, load_npz

    path = tmp_path / "data.npz"
    path.write_bytes(npz_bytes)
    arrays = load_npz(path)
    header = json.loads(arrays["header"].tobytes())
    header = {**header, **change} if isinstance(change, dict) else change
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    atomic_save_npz(path, **arrays)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")):
        FaceDataset.load_npz(path).fingerprint()


# =============================================================================================
# data set trees: UTKFace, CelebA, FairFace, LFW, ImageFolder + attributes.csv
# =============================================================================================

TREES: dict[str, Callable[[Path], Any]] = {"utkface": make_utkface, "celeba": make_celeba, "fairface": make_fairface,
                                          "lfw": make_lfw, "imagefolder": make_imagefolder}
IMAGE_SUFFIXES = (".jpg", ".png")


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trees")
    for name, make in TREES.items():
        make(base / name)
    return {name: base / name for name in TREES}


CELL_TOKENS = st.sampled_from(["\x00", "\ufeff", '"', '"unclosed', ",", "\n", "\r", "9" * 5000, "-1", "#", "é",
                               " ", "\t", "Male", "female", "more than 99999", "20-9999", "0" * 30,
                               "# group_names: " + "[" * 5000, "# group_names: [1]", '# group_names: ["a","a"]',
                               "# group_names: " + "9" * 5000, "x" * 200000])


BIG_NUMBERS = st.sampled_from(["9" * 5000, "9" * 5000 + "-9", "more than " + "9" * 5000, "9" * 19])


@st.composite
def damaged_tree(draw: st.DrawFn, root: Path) -> None:
    """In place: an annotation file with a hostile field, text inserted, lines cut, repeated or swapped,
    or bytes that are not UTF-8; or an image bit-flipped, truncated, emptied or replaced by a
    directory."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    texts = [p for p in files if p.suffix not in IMAGE_SUFFIXES]
    target = draw(st.sampled_from(texts if texts and draw(st.integers(0, 3)) else files))  # mostly annotations
    if target.suffix in IMAGE_SUFFIXES:
        how = draw(st.sampled_from(["flip", "truncate", "empty", "directory"]))
        raw = bytearray(target.read_bytes())
        if how == "flip":
            for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                           max_size=8)):
                raw[pos] ^= mask
        elif how == "truncate":
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
        elif how == "empty":
            raw = bytearray()
        target.unlink()
        if how == "directory":
            target.mkdir()
        else:
            target.write_bytes(bytes(raw))
        return
    lines = target.read_text(encoding="utf-8").splitlines(keepends=True) or [""]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["cell", "insert", "cut", "repeat", "swap", "replace"]))
        if how == "cell":  # one CSV field or whitespace-separated value
            sep = "," if "," in lines[i] else " "
            cells = lines[i].rstrip("\n").split(sep)
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.one_of(CELL_TOKENS, BIG_NUMBERS, st.text(max_size=8)))
            lines[i] = sep.join(cells) + "\n"
        elif how == "insert":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.one_of(CELL_TOKENS, st.text(max_size=8))) + lines[i][at:]
        elif how == "cut" and len(lines) > 1:
            del lines[i]
        elif how == "repeat":
            lines.insert(i, lines[i])
        elif how == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = draw(CELL_TOKENS) + "\n"
    tail = draw(st.sampled_from([b"", b"\xff", b"\x80\n"]))  # not UTF-8
    target.write_bytes("".join(lines).encode("utf-8", "surrogatepass") + tail)


@fuzz(120)
@given(data=st.data())
def test_damaged_data_set_loads_or_names_the_path(trees: dict[str, Path], data: st.DataObject,
                                                  scratch: Scratch) -> None:
    """Every loader, strict or lenient, returns a data set or raises ValueError (SampleError is
    one) / FileNotFoundError naming a path in the tree, and writes nothing into it."""
    from common.data.sources import load_source

    name = data.draw(st.sampled_from(sorted(TREES)), label="source")
    root = scratch.new() / name
    shutil.copytree(trees[name], root)
    data.draw(damaged_tree(root), label="damage")
    options = {"gender_csv": root / "genders.csv"} if name == "lfw" else {}
    before = listing(root)
    try:
        ds = load_source(name, root, image_size=16, strict=data.draw(st.booleans(), label="strict"), **options)
    except (ValueError, FileNotFoundError) as exc:
        event(f"{name}: refused")
        assert str(root) in str(exc), str(exc)[:300]
    else:
        event(f"{name}: loaded")
        assert len(ds) > 0 and ds.images.shape[1:] == (16, 16, 3)
    assert listing(root) == before


@pytest.mark.parametrize(("source", "file", "row", "problem"), [
    ("imagefolder", "attributes.csv", "anna/a1.png,female,light," + "9" * 5000 + ",1,0\n", "unknown age"),
    ("imagefolder", "attributes.csv", "# group_names: " + "[" * 5000 + "\n", "bad group_names comment"),
    ("fairface", "fairface_label_train.csv", "train/1.jpg," + "9" * 5000 + "-1,Male,White,True\n", "unknown age"),
    ("celeba", "identity_CelebA.txt", "000001.jpg " + "9" * 5000 + "\n", "at most 18 digits"),
])
def test_oversized_numbers_in_annotations_name_the_file(trees: dict[str, Path], tmp_path: Path, source: str,
                                                        file: str, row: str, problem: str) -> None:
    """Numbers beyond Python's 4300-digit int() limit used to raise a ValueError naming nothing
    (and deep JSON a RecursionError); the hostile value is echoed cut short."""
    from common.data.sources import load_source

    root = tmp_path / source
    shutil.copytree(trees[source], root)
    path = root / file
    key = re.split(r"[ ,]", row)[0]  # the image's file name, or '#' for a comment line
    lines = [line for line in path.read_text().splitlines(keepends=True) if not line.startswith(key + row[len(key)])]
    lines.insert(0 if key == "#" else 1, row)  # a comment first, a row in place of the image's own row
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=problem) as info:
        load_source(source, root, image_size=16)
    assert str(root) in str(info.value) and len(str(info.value)) < 1000


def test_annotation_file_that_is_a_directory_is_named(trees: dict[str, Path], tmp_path: Path) -> None:
    from common.data.sources import load_source

    root = tmp_path / "fairface"
    shutil.copytree(trees["fairface"], root)
    (root / "fairface_label_val.csv").unlink()
    (root / "fairface_label_val.csv").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{root / 'fairface_label_val.csv'}: cannot read")):
        load_source("fairface", root, image_size=16)


# =============================================================================================
# Flower payloads decoded by common/wire.py (a client's reply, a node's configuration)
# =============================================================================================

@fuzz(80)
@given(payload=st.one_of(NPY_MEMBERS, st.binary(max_size=80)), declared=st.sampled_from([(3,), (10**9,), ()]))
def test_hostile_array_payload_is_refused_naming_the_key(payload: bytes, declared: tuple[int, ...]) -> None:
    """An ArrayRecord entry is decoded to an array no larger than the bytes received, or refused
    with a ValueError naming the entry (never MemoryError, EOFError, BadZipFile or an NpzFile)."""
    from flwr.app import Array, ArrayRecord

    from common.wire import record_to_numpy

    record = ArrayRecord({"conv.weight": Array(dtype="float64", shape=declared, stype="numpy.ndarray", data=payload)})
    try:
        arrays = record_to_numpy(record)
    except ValueError as exc:
        assert str(exc).startswith("array 'conv.weight': "), str(exc)[:300]
    else:
        assert arrays["conv.weight"].nbytes <= len(payload)


@fuzz(80)
@given(data=st.data())
def test_hostile_gallery_reply_is_refused_naming_the_client(gallery_parts, data: st.DataObject) -> None:
    """A client's MOTE gallery reply is a gallery the server can merge and score, or a ValueError
    naming the client (a misshapen second layer used to pass and fail inside torch.cat)."""
    from common import wire
    from common.mote.gallery import MoteGallery

    state, meta = data.draw(damaged_gallery(gallery_parts), label="gallery")
    arrays = {k: v.numpy() for k, v in state.items()}
    for key in ("identity_ids", "balancing_factor"):
        try:
            arrays[key] = np.asarray(meta.get(key))
        except (ValueError, OverflowError):
            arrays[key] = np.zeros(0)
        if arrays[key].dtype == object:
            arrays[key] = arrays[key].astype(str)
    try:
        gallery = wire.record_to_gallery(wire.numpy_to_record(arrays), seed=0, who="client 2")
    except ValueError as exc:
        event("refused")
        assert str(exc).startswith("client 2: "), str(exc)[:300]
    else:
        event("accepted")
        state, meta = gallery_parts
        honest = MoteGallery(np.array(meta["identity_ids"]) + 10**6, state, np.array(meta["balancing_factor"]), 0)
        merged = MoteGallery.concat([gallery, honest], seed=0) if gallery.dim == honest.dim else gallery
        assert np.isfinite(merged.scores(np.ones((2, merged.dim), dtype=np.float32))).all()


@pytest.mark.parametrize("node_config", [{}, {"partition-id": "zero"}, {"partition-id": 1.5}, {"partition-id": True},
                                         {"partition-id": 5}, {"partition-id": 0, "num-partitions": "2"},
                                         {"partition-id": -1}])
def test_bad_node_config_names_the_keys(node_config: dict[str, Any]) -> None:
    from common.wire import partition_of

    with pytest.raises(ValueError, match=r"^node config: .*partition-id"):
        partition_of(node_config, 2)


# =============================================================================================
# interrupted writes leave nothing behind
# =============================================================================================

def _npz_blob() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.arange(100))
    return buffer.getvalue()


WRITERS: dict[str, Callable[[], bytes]] = {
    "json": lambda: (json.dumps({"round": 3, "values": list(range(50))}) + "\n").encode(),
    "safetensors": lambda: safetensors_bytes({"w": torch.arange(64.0)}, metadata={"facefl": "{}"}),
    "npz": _npz_blob,
}


@fuzz(60)
@given(kind=st.sampled_from(sorted(WRITERS)), cut=st.floats(0, 1), existed=st.booleans(),
       depth=st.integers(0, 2), error=st.sampled_from([RuntimeError, OSError, KeyboardInterrupt]))
def test_interrupted_write_leaves_no_file_and_no_temp_file(kind: str, cut: float, existed: bool, depth: int,
                                                           error: type[BaseException], scratch: Scratch) -> None:
    """A write that dies half-way inside ``atomic_path`` (an exception, Ctrl-C) leaves the tree
    as it was: the old file intact if there was one, no new file, no temporary file, and no
    directory that the write had created."""
    from common.runs.io import atomic_path

    root = scratch.new()
    dest = root.joinpath(*[f"new{i}" for i in range(depth)], f"out.{kind}")
    if existed:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"old contents")
    before = listing(root)
    blob = WRITERS[kind]()
    with pytest.raises(error), atomic_path(dest) as tmp:
        tmp.write_bytes(blob[: int(cut * len(blob))])
        raise error("interrupted")
    assert listing(root) == before
    if existed:
        assert dest.read_bytes() == b"old contents"


def test_failed_writers_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real writers: JSON that cannot be serialised, a checkpoint whose rename fails, an npz
    of pickled objects; each raises and the directory is unchanged."""
    import common.runs.io
    from common.nn.checkpoint import save_checkpoint
    from common.runs.io import atomic_save_npz, atomic_write_json

    before = listing(tmp_path)
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "runs" / "status.json", {"status": {1, 2}})
    with pytest.raises(TypeError):
        atomic_save_npz(tmp_path / "audit" / "scores.npz", x=np.array([object()]))
    def disk_full(src: Path, dst: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(common.runs.io.os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "models" / "round-001.safetensors", {"w": torch.zeros(3)}, {"round": 1})
    assert listing(tmp_path) == before


def test_load_model_names_the_file_for_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    """A checkpoint whose tensors or spec do not fit: ValueError naming the file, not torch's RuntimeError."""
    from common.nn.build import build_model, load_model
    from common.nn.checkpoint import save_checkpoint
    from common.nn.face_model import ModelSpec

    small, wide = ModelSpec(width=8, blocks=(1, 1), embedding_dim=16, image_size=32), \
        ModelSpec(width=16, blocks=(1, 1), embedding_dim=16, image_size=32)
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(small, 0).state_dict(), {"spec": small.to_dict()})
    assert load_model(path)[0].spec == small
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_model(path, wide)
    bad = save_checkpoint(tmp_path / "nospec.safetensors", build_model(small, 0).state_dict(), {"spec": [1, 2]})
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_model(bad)
