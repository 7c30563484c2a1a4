"""Hostile split manifests (manifest.json): the audit's ground truth.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from .conftest import JSON_VALUES, Scratch, fuzz, listing

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def manifest_doc(synth_small) -> tuple[dict[str, Any], str]:
    from common.config import SplitSettings
    from common.split.manifest import make_manifest

    m = make_manifest(synth_small, SplitSettings(num_clients=2, partition="iid"), 1)
    return m.to_json(), m.fingerprint


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) into a JSON document."""
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    return [prefix] + [p for k, v in children for p in _paths(v, (*prefix, k))]


def _resolve(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


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
    (lambda d: d.update(version=True), r"version: expected 2, got True"),
    (lambda d: d["config"].update(alpha=10**400), r"config: split\.alpha: expected float, got 1000"),
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
