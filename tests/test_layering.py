"""The packages' layering (docs/architecture.md): ``common/`` is the library every step builds on and
imports none of the apps, the audit or the workflow; the ClientApp and the ServerApp talk only
through Flower messages, never by importing each other; a member may run the audit's attacks on its
own data (the self-audit), the server never; only ``workflow/`` composes everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "attacks", "workflow")
FORBIDDEN = {
    "common": {"client", "server", "attacks", "workflow"},
    "client": {"server", "workflow"},  # attacks: a member's self-audit of its own data (per-member layout)
    "server": {"client", "attacks", "workflow"},
    "attacks": {"client", "server", "workflow"},
    "workflow": set(),
}


def imported_packages(source: str) -> set[str]:
    """Top-level names of every module ``source`` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imports_by_file() -> dict[Path, set[str]]:
    return {path: imported_packages(path.read_text(encoding="utf-8"))
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def test_the_scanner_sees_imports_inside_functions() -> None:
    source = "import os\nfrom common.config import Config\n\ndef f():\n    from server import app\n    import client.app\n"
    assert imported_packages(source) == {"os", "common", "server", "client"}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    found = imports_by_file()
    files = [p for p in found if p.relative_to(ROOT).parts[0] == package]
    assert files, f"{package}/ has no Python files: the layout changed, update this test and the docs"
    violations = [f"{p.relative_to(ROOT)} imports {sorted(found[p] & FORBIDDEN[package])}"
                  for p in files if found[p] & FORBIDDEN[package]]
    assert not violations, "\n".join(violations)


def test_only_workflow_composes_the_apps() -> None:
    """The console entry and the simulation live in workflow/, which imports both apps."""
    found = imports_by_file()
    workflow = set().union(*(names for p, names in found.items() if p.relative_to(ROOT).parts[0] == "workflow"))
    assert {"common", "client", "server", "attacks"} <= workflow


def test_common_root_holds_only_the_wire_format() -> None:
    assert sorted(p.name for p in (ROOT / "common").glob("*.py")) == ["__init__.py", "wire.py"]
