"""Static checks of docker/: the Dockerfile, .dockerignore, compose.yml and compose.yml merged with
the TLS override compose.tls.yml.

No Docker engine runs on the development machines, so nothing here builds or starts a container.
What can be checked without one is what matters most: the image installs every dependency at the
version pinned in requirements.lock, which is what this checkout is tested with, and runs unprivileged; no key reaches the build context or
the server side; every flag in a service's command exists in the installed Flower binary (compose
files in Flower's own repository change flags every few releases); the TLS variant is complete;
the SuperNodes cover partitions 0..N-1 exactly once; each SuperNode reads only its own member's
images (a volume of its own, written by a one-shot ``facefl data synth --members`` service) and the
SuperLink none.

The TLS variant is an override file, so it is merged here with the subset of Compose's merge
rules that the files use (scalars and ``command`` replaced, ``volumes`` merged by target path,
mappings merged recursively); any other sequence in the override fails the test instead of being
merged wrongly.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import flwr
import pytest
import torch
import yaml
from flwr.common.config import parse_config_args
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from support.flower import BIN, flwr_env

from client.he_client import SECRET_KEY_NODE_CONFIG
from client.member_data import DATA_PATH_NODE_CONFIG, DATA_SOURCE_NODE_CONFIG
from common.data.datadir import member_dir_names
from common.he.keys import KEY_INFO_FILE, PUBLIC_FILE, SECRET_FILE
from common.runs.rundir import CLIENT_STATE_NODE_CONFIG
from workflow.cli import build_parser

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = ROOT / "requirements.lock"
SETUP = ROOT / "scripts" / "setup.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BASE = "compose.yml"
TLS = "compose.tls.yml"
VARIANTS = [(BASE,), (BASE, TLS)]

SUPERLINK, SUPERNODE = "flower-superlink", "flower-supernode"
FACEFL = "facefl"
MEMBER_DATA = "member-data"  # the one-shot service that writes each member's images
NUM_NODES = 3
# The files gen-certs.sh writes; ca.key must never be mounted, server.key only on the SuperLink.
CERT_FILES = {"ca.crt", "ca.key", "server.pem", "server.key"}
SERVER_SIDE_FILES = {PUBLIC_FILE, KEY_INFO_FILE, "ca.crt", "server.pem", "server.key"}
TLS_PATH_FLAGS = {SUPERLINK: {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"},
                  SUPERNODE: {"--root-certificates", "--auth-supernode-private-key"}}
SECURITY_FLAGS = {"--insecure", "--enable-supernode-auth"} | set().union(*TLS_PATH_FLAGS.values())


# --------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, f"{DOCKERFILE}: ends inside a continued line"
    return out


def args_of(instruction: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == instruction]


# --------------------------------------------------------------------------- requirements.lock

def locked() -> dict[str, str]:
    """{canonical name: version} pinned in requirements.lock (written by scripts/lock.py)."""
    out: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip() and not name.strip().endswith("]"), f"{LOCK}: {line!r} is not name==version"
            out[canonicalize_name(name.strip())] = version.strip()
    assert out, f"{LOCK}: no pins"
    return out


def installed_version(name: str) -> str | None:
    """The installed public version (a local label such as torch's +cpu dropped), or None."""
    try:
        return Version(metadata.version(name)).public
    except metadata.PackageNotFoundError:
        return None


@dataclass
class PipInstall:
    """One `pip install` of a shell command, its options sorted out."""
    where: str
    targets: list[str] = field(default_factory=list)  # positional and -e arguments
    requirement_files: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)  # --index-url and --extra-index-url
    flags: set[str] = field(default_factory=set)

    @property
    def installs_dependencies(self) -> bool:
        """False only for `pip install --no-deps .`: the project itself, nothing it depends on."""
        return not (self.targets == ["."] and not self.requirement_files and "--no-deps" in self.flags)


_VALUE_OPTIONS = {"-c": "constraints", "--constraint": "constraints", "-r": "requirement_files",
                  "--requirement": "requirement_files", "-e": "targets", "--editable": "targets",
                  "-i": "indexes", "--index-url": "indexes", "--extra-index-url": "indexes"}


def pip_installs(command: str, where: str) -> list[PipInstall]:
    """Every `pip install` (also `python -m pip install`, `pip3 install`) in a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            segments.append([])
        else:
            segments[-1].append(token)
    out = []
    for tokens in segments:
        starts = [i for i in range(len(tokens) - 1)
                  if PurePosixPath(tokens[i]).name in ("pip", "pip3") and tokens[i + 1] == "install"]
        if not starts:
            continue
        install = PipInstall(where)
        args = iter(tokens[starts[0] + 2:])
        for arg in args:
            option, eq, value = arg.partition("=")
            if option in _VALUE_OPTIONS:
                value = value if eq else next(args, "")
                assert value, f"{where}: {option} without a value in {command!r}"
                getattr(install, _VALUE_OPTIONS[option]).append(value)
            elif re.fullmatch(r"-[cr]\S+", arg):  # -cFILE, -rFILE
                getattr(install, _VALUE_OPTIONS[arg[:2]]).append(arg[2:])
            elif arg.startswith("-"):
                install.flags.add(option)
            elif arg in (">", ">>", "<"):
                break
            else:
                install.targets.append(arg)
        out.append(install)
    return out


def dockerfile_pip_installs() -> list[PipInstall]:
    return [inst for i, run in enumerate(args_of("RUN"))
            for inst in pip_installs(run, f"{DOCKERFILE}: RUN #{i + 1}")]


def setup_pip_installs() -> list[PipInstall]:
    return [inst for n, line in enumerate(SETUP.read_text(encoding="utf-8").splitlines(), 1)
            if not line.lstrip().startswith("#")
            for inst in pip_installs(line, f"{SETUP}:{n}")]


def test_dockerfile_pins_the_base_image_flwr_and_torch():
    (base,) = args_of("FROM")  # one stage
    major, minor = sys.version_info[:2]
    assert re.fullmatch(rf"python:{major}\.{minor}\.\d+-slim-bookworm", base), (
        f"{DOCKERFILE}: FROM {base!r}: expected an exact python:{major}.{minor}.N-slim-bookworm tag (the "
        f"Python of the tested .venv: tenseal ships cp{major}{minor} wheels)")
    lock = locked()
    # The image's versions are the lock's (every dependency install is constrained by it, see
    # test_lock_dockerfile_and_installed_versions_agree), and the lock's are the tested ones.
    torch_version = torch.__version__.split("+")[0]
    assert lock.get("flwr") == flwr.__version__, (
        f"{LOCK}: flwr {lock.get('flwr')}, installed {flwr.__version__}: run .venv/bin/python scripts/lock.py")
    assert lock.get("torch") == torch_version, (
        f"{LOCK}: torch {lock.get('torch')}, installed {torch_version}: run .venv/bin/python scripts/lock.py")
    # pip fails on a lock that pyproject.toml's ranges exclude; flwr needs its simulation extra (ray).
    for dep in map(Requirement, PYPROJECT["project"]["dependencies"]):
        name = canonicalize_name(dep.name)
        assert name in lock and dep.specifier.contains(lock[name], prereleases=True), (
            f"pyproject.toml requires {dep}, {LOCK.name} pins {name}=={lock.get(name)}")
        if name == "flwr":
            assert "simulation" in dep.extras, f"pyproject.toml: {dep}: the image needs flwr[simulation]"
    # torch first, from the CPU index, at the lock's version: a PyPI torch is a multi-GB CUDA build.
    deps = [inst for inst in dockerfile_pip_installs() if inst.installs_dependencies]
    assert deps, f"{DOCKERFILE}: no pip install of dependencies"
    first = deps[0]
    assert first.targets in (["torch"], [f"torch=={torch_version}"]) and not first.requirement_files, (
        f"{first.where}: the first dependency install must be torch alone, found {first.targets}")
    assert first.indexes == [CPU_INDEX] and "requirements.lock" in first.constraints, (
        f"{first.where}: torch must come from --index-url {CPU_INDEX} only, constrained by requirements.lock")
    runs = " ".join(args_of("RUN"))
    torch_pins = re.findall(r"\btorch\s*==\s*([\w.+]+)", runs)
    assert set(torch_pins) <= {torch_version}, (
        f"{DOCKERFILE}: torch pinned to {torch_pins}, the lock and the tested .venv have {torch_version}")


def test_dockerfile_runs_unprivileged_without_runtime_installs():
    users = args_of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{DOCKERFILE}: needs a final non-root USER"
    env = " ".join(args_of("ENV"))
    assert re.search(r"\bFLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\b", env), (
        f"{DOCKERFILE}: set FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (else the SuperLink's SuperExec "
        "runs `uv sync` per run and pulls a CUDA torch)")


def copy_sources() -> list[str]:
    sources = []
    for args in args_of("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        sources += parts[:-1]
    return sources


def package_folders() -> set[str]:
    """The top-level packages pyproject.toml installs (``[tool.setuptools.packages.find] include``)."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = {pattern.rstrip("*").rstrip(".") for pattern in include}
    assert folders and all(re.fullmatch(r"\w+", f) for f in folders), f"pyproject.toml: packages {include}"
    return folders


def test_dockerfile_copies_only_the_package_sources():
    assert not args_of("ADD"), f"{DOCKERFILE}: use COPY (ADD fetches URLs and unpacks archives)"
    # Exactly: the build inputs, the lock, and every package `pip install .` installs (a missing one
    # builds an image whose `facefl` entry point fails to import).
    packages = package_folders()
    expected = {"pyproject.toml", "README.md", "requirements.lock"} | packages
    sources = copy_sources()
    assert len(sources) == len(set(sources)) and set(sources) == expected, (
        f"{DOCKERFILE}: COPY sources {sources}, expected exactly {sorted(expected)}")
    for script, target in PYPROJECT["project"].get("scripts", {}).items():
        assert target.split(".")[0].split(":")[0] in packages, (
            f"pyproject.toml: console script {script} = {target!r} is not in a copied package {sorted(packages)}")
    ignore = dockerignore_patterns()
    for src in sources:
        assert (ROOT / src).exists(), f"{DOCKERFILE}: COPY {src}: not in the repository"
        assert not ignored(src, ignore), f"{DOCKERFILE}: COPY {src}: excluded by .dockerignore, the build would fail"


def test_lock_dockerfile_and_installed_versions_agree():
    lock = locked()
    # The tested .venv is the lock (a local label such as torch's +cpu is ignored: ==X matches X+cpu).
    wrong = {name: (version, installed_version(name)) for name, version in lock.items()
             if installed_version(name) != Version(version).public}
    assert not wrong, (f"{LOCK}: (locked, installed) differ for {wrong}: reinstall with bash scripts/setup.sh "
                       "or regenerate with .venv/bin/python scripts/lock.py")
    assert {"flwr", "torch", "opacus", "tenseal"} <= set(lock), f"{LOCK}: lacks {sorted({'flwr', 'torch', 'opacus', 'tenseal'} - set(lock))}"
    # The Dockerfile: the lock is copied before, and constrains, every install of dependencies.
    installs = [inst for inst in dockerfile_pip_installs() if inst.installs_dependencies]
    assert installs, f"{DOCKERFILE}: no pip install of dependencies"
    for inst in installs:
        assert inst.constraints == ["requirements.lock"], (
            f"{inst.where}: every pip install of dependencies needs -c requirements.lock, found {inst.constraints}")
    workdir, copied_in = "/", None
    for word, args in dockerfile_instructions():
        if word == "WORKDIR":
            workdir = str(PurePosixPath(workdir, args))
        elif word == "COPY":
            *srcs, dest = [a for a in args.split() if not a.startswith("--")]
            if "requirements.lock" in srcs:
                assert dest in (".", "./", "requirements.lock", "./requirements.lock"), (
                    f"{DOCKERFILE}: COPY requirements.lock {dest}: copy it into the WORKDIR the installs run in")
                copied_in = workdir
        elif word == "RUN" and any(i.installs_dependencies for i in pip_installs(args, DOCKERFILE.name)):
            assert copied_in == workdir, (
                f"{DOCKERFILE}: RUN {args[:60]}...: requirements.lock is not copied into {workdir} before it")
    # flwr's version comes from the lock only.
    runs = " ".join(args_of("RUN"))
    pins = re.findall(r"\bflwr(?:\[[^\]]*\])?\s*(?:===|==|~=|>=|<=|!=|<|>)\s*[\w.*]+", runs)
    assert not pins, f"{DOCKERFILE}: pins flwr itself ({pins}); the version must come from requirements.lock"
    # Image tags: the compose files and the Dockerfile's build command name the locked flwr.
    tag_suffix = f"flwr{lock['flwr']}"
    images = {str(svc.get("image")) for files in VARIANTS for svc in project(files)["services"].values()}
    assert len(images) == 1 and next(iter(images)).endswith(tag_suffix), (
        f"compose files: images {images}: one image, its tag ending in {tag_suffix} (the lock's flwr)")
    build_tags = re.findall(r"\s-t\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert build_tags and all(t.endswith(tag_suffix) for t in build_tags), (
        f"{DOCKERFILE}: the build command's tag {build_tags} must end in {tag_suffix}")
    # scripts/setup.sh: torch first at the lock's version, every install constrained by the lock,
    # and a lock change reinstalls (the lock is part of the stamp's hash).
    setup = setup_pip_installs()
    assert len(setup) >= 2 and setup[0].targets == [f"torch=={lock['torch']}"], (
        f"{SETUP}: the first install must be torch=={lock['torch']}, found {[i.targets for i in setup]}")
    assert any(t.startswith(".[dev]") for i in setup for t in i.targets), f"{SETUP}: installs no .[dev]"
    for inst in setup:
        assert inst.constraints == ["requirements.lock"], f"{inst.where}: install with -c requirements.lock"
    stamp_lines = [ln for ln in SETUP.read_text(encoding="utf-8").splitlines()
                   if re.match(r"\s*want=", ln) and "sha256sum" in ln]
    assert len(stamp_lines) == 1 and "requirements.lock" in stamp_lines[0] and "pyproject.toml" in stamp_lines[0], (
        f"{SETUP}: the install stamp must hash pyproject.toml and requirements.lock, found {stamp_lines}")


# --------------------------------------------------------------------------- .dockerignore

def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    # The emulation below covers '*', '**' and '?' only: keep the file within that.
    bad = [p for p in patterns if p.startswith("!") or "[" in p or "\\" in p]
    assert not bad, f"{path}: exceptions and character classes are not checked by this test: {bad}"
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded when it, or a directory above it, matches a pattern."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    regexes = [_pattern_regex(p) for p in patterns]
    return any(rx.fullmatch(prefix) for rx in regexes for prefix in prefixes)


def test_dockerignore_keeps_keys_outputs_and_environments_out():
    patterns = dockerignore_patterns()
    excluded = [
        "docker/he-keys/secret-context.bin", "keys/secret-context.bin", "he-keys/key.json",
        "docker/certs/ca.key", "docker/certs/server.key", "docker/certs/server.pem", "certs/ca.crt",
        "docker/auth-keys/supernode-0", "docker/auth-keys/supernode-0.pub", "common/leftover.bin",
        "runs/run-1/models/final.safetensors", "runs/run-1/manifest.json", "state.db", ".flwr/config.toml",
        ".cache/facefl/synth.npz", ".venv/bin/python", "common/__pycache__/config.cpython-311.pyc",
        "facefl.egg-info/PKG-INFO", ".git/HEAD", ".pytest_cache/v/cache", ".hypothesis/examples/x",
    ]
    leaked = [p for p in excluded if not ignored(p, patterns)]
    assert not leaked, f".dockerignore lets these into the build context: {leaked}"


def test_only_python_sources_of_the_packages_reach_the_image():
    """Python sources, and the data files pyproject.toml declares as package data (e.g. presets)."""
    patterns = dockerignore_patterns()
    package_data = [_pattern_regex(f"{pkg.replace('.', '/')}/{glob}")
                    for pkg, globs in PYPROJECT["tool"]["setuptools"].get("package-data", {}).items()
                    for glob in globs]
    shipped = [f.relative_to(ROOT).as_posix() for src in copy_sources() if (ROOT / src).is_dir()
               for f in (ROOT / src).rglob("*") if f.is_file()]
    shipped = [p for p in shipped if not ignored(p, patterns)]
    assert any(p.endswith(".py") for p in shipped)
    odd = [p for p in shipped if not p.endswith(".py") and not any(rx.fullmatch(p) for rx in package_data)]
    assert not odd, (f"files that COPY would put into the image besides Python sources and pyproject.toml's "
                     f"package data: {odd}")


def test_every_package_source_and_package_data_file_reaches_the_image():
    """No .dockerignore rule meant for run outputs or keys may drop a source file (e.g. a rule for
    ``runs/`` dropping ``common/runs/``), nor the package data pyproject.toml declares."""
    patterns = dockerignore_patterns()
    package_data = [_pattern_regex(f"{pkg.replace('.', '/')}/{glob}")
                    for pkg, globs in PYPROJECT["tool"]["setuptools"].get("package-data", {}).items()
                    for glob in globs]
    needed = [f.relative_to(ROOT).as_posix() for src in copy_sources() if (ROOT / src).is_dir()
              for f in (ROOT / src).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    needed = [p for p in needed if p.endswith(".py") or any(rx.fullmatch(p) for rx in package_data)]
    assert any(p.startswith("common/runs/") for p in needed)
    dropped = [p for p in needed if ignored(p, patterns)]
    assert not dropped, f".dockerignore drops these sources from the build context: {dropped}"


# --------------------------------------------------------------------------- compose files

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any, where: str) -> Any:
    """Compose's ``${VAR:-default}`` with every variable unset: every variable needs a default, so
    that the files work without a .env file."""
    if isinstance(value, dict):
        return {k: interpolate(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            assert m.group(2) is not None, f"{where}: ${{{m.group(1)}}} has no default"
            return m.group(2)
        out = _VAR.sub(sub, value)
        assert "$" not in out, f"{where}: {value!r}: only ${{VAR:-default}} is interpolated here"
        return out
    return value


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / name).read_text(encoding="utf-8"))
    return interpolate({k: v for k, v in data.items() if not k.startswith("x-")}, name)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    named_volume: bool
    read_only: bool


def mounts(service: dict[str, Any], where: str) -> list[Mount]:
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            named = not source.startswith((".", "/", "~"))
            out.append(Mount(source, target, named, "ro" in mode))
        else:
            assert entry.get("type") in ("bind", "volume"), f"{where}: mount type {entry.get('type')!r}"
            out.append(Mount(entry["source"], entry["target"], entry["type"] == "volume",
                             bool(entry.get("read_only"))))
    return out


def _target(entry: str | dict[str, Any]) -> str:
    return entry.split(":")[1] if isinstance(entry, str) else entry["target"]


def merge_service(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    """Compose's merge of one service: scalars and ``command`` replaced, ``volumes`` merged by
    target, mappings merged recursively. Other sequences have rules of their own: refused."""
    out = dict(base)
    for key, value in override.items():
        if key not in out or key == "command" or not isinstance(value, (dict, list)):
            out[key] = value
        elif key == "volumes":
            by_target = {_target(e): e for e in out[key]}
            by_target.update({_target(e): e for e in value})
            out[key] = list(by_target.values())
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = merge_service(out[key], value, f"{where}.{key}")
        else:
            raise AssertionError(f"{where}.{key}: Compose's merge rule for this key is not emulated here")
    return out


def project(files: tuple[str, ...]) -> dict[str, Any]:
    """The services and volumes of ``docker compose -f docker/F1 -f docker/F2 ...``."""
    merged = load(files[0])
    for name in files[1:]:
        over = load(name)
        assert set(over) <= {"services"}, f"{name}: only services may be overridden, got {sorted(over)}"
        for svc, body in over["services"].items():
            assert svc in merged["services"], f"{name}: service {svc!r} is not in {files[0]}"
            merged["services"][svc] = merge_service(merged["services"][svc], body, f"{name}:{svc}")
    return merged


@pytest.fixture(scope="session")
def help_flags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bool]]:
    """For each Flower binary used in a command: its options from the real ``--help``, mapped to
    whether they take a value. Both run at once (each costs a few seconds of imports)."""
    env = flwr_env(tmp_path_factory.mktemp("flwr-home"))  # --help writes to FLWR_HOME
    procs = {b: subprocess.Popen([str(BIN / b), "--help"], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for b in (SUPERLINK, SUPERNODE)}
    out = {}
    try:
        for binary, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=90)
            assert proc.returncode == 0, f"{binary} --help exited {proc.returncode}: {stderr[-2000:]}"
            options = re.findall(r"^\s+(?:-\w, )?(--[\w-]+)( [A-Z_][A-Z0-9_]*| \{[^}]*\})?", stdout, re.MULTILINE)
            out[binary] = {flag: bool(metavar) for flag, metavar in options}
            assert "--insecure" in out[binary], f"{binary} --help: unexpected format:\n{stdout[:2000]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return out


@dataclass
class Service:
    name: str
    body: dict[str, Any]
    binary: str
    flags: dict[str, str | bool]  # flag -> value, or True for a flag without one
    mounts: list[Mount]

    def argv_without(self, drop: set[str], takes_value: dict[str, bool]) -> list[str]:
        out, skip = [], False
        for token in self.body["command"]:
            if skip:
                skip = False
            elif token.split("=")[0] in drop:
                skip = takes_value[token.split("=")[0]] and "=" not in token
            else:
                out.append(token)
        return out

    def mount_at(self, target: str) -> Mount:
        found = [m for m in self.mounts if m.target == target]
        assert len(found) == 1, f"{self.name}: expected one mount at {target}, found {found}"
        return found[0]


def services(files: tuple[str, ...], help_flags: dict[str, dict[str, bool]]) -> dict[str, Service]:
    """Every service, its command parsed with the installed binary's options."""
    out = {}
    for name, body in project(files)["services"].items():
        where = f"{'+'.join(files)}:{name}"
        command = body.get("command")
        assert isinstance(command, list) and command and all(isinstance(t, str) for t in command), (
            f"{where}: command must be a list of strings starting with the binary")
        binary = command[0]
        if binary == FACEFL:
            continue  # a one-shot job of the facefl CLI: test_each_supernode_mounts_only_its_own_member_data
        assert binary in help_flags, f"{where}: runs {binary!r}; expected one of {sorted(help_flags)}"
        known = help_flags[binary]
        flags: dict[str, str | bool] = {}
        tokens = iter(command[1:])
        for token in tokens:
            assert token.startswith("--"), f"{where}: positional argument {token!r} ({binary} takes none)"
            flag, eq, value = token.partition("=")
            assert flag in known, (
                f"{where}: {flag} is not an option of the installed {binary} (flwr {flwr.__version__})")
            assert flag not in flags, f"{where}: {flag} given twice"
            if known[flag]:
                flags[flag] = value if eq else next(tokens, None)
                assert flags[flag], f"{where}: {flag} needs a value"
            else:
                assert not eq, f"{where}: {flag} takes no value"
                flags[flag] = True
        out[name] = Service(name, body, binary, flags, mounts(body, where))
    return out


def roles(svcs: dict[str, Service]) -> tuple[Service, list[Service]]:
    links = [s for s in svcs.values() if s.binary == SUPERLINK]
    nodes = [s for s in svcs.values() if s.binary == SUPERNODE]
    assert len(links) == 1, f"expected 1 SuperLink service, found {[s.name for s in links]}"
    return links[0], nodes


def all_variants(help_flags) -> Iterator[tuple[str, dict[str, Service]]]:
    for files in VARIANTS:
        yield "+".join(files), services(files, help_flags)


def test_every_flag_exists_in_the_installed_binaries(help_flags):
    """services() parses each command with the options of the installed binary's --help: an unknown
    flag, a missing value or a value given to a switch fails there."""
    for label, svcs in all_variants(help_flags):
        assert {s.binary for s in svcs.values()} == {SUPERLINK, SUPERNODE}, label


def test_services_images_and_isolation(help_flags):
    for label, svcs in all_variants(help_flags):
        link, nodes = roles(svcs)
        assert len(nodes) == NUM_NODES and len(svcs) == 1 + NUM_NODES, f"{label}: services {sorted(svcs)}"
        images = {s.body.get("image") for s in svcs.values()}
        assert len(images) == 1, f"{label}: every service must run the one facefl image, found {images}"
        (image,) = images
        name, _, tag = str(image).rpartition(":")
        # The image gets the lock's flwr (Dockerfile), which is the tested one (test_lock_...).
        flwr_version = locked()["flwr"]
        assert flwr_version == flwr.__version__, f"{LOCK}: flwr {flwr_version}, installed {flwr.__version__}"
        assert name and "/" not in tag and tag != "latest" and tag.endswith(f"flwr{flwr_version}"), (
            f"{label}: image {image!r}: expected an explicit tag ending in flwr{flwr_version}")
        build = link.body.get("build", {})
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, f"{label}: superlink build"
        assert (DOCKER / build["context"]).resolve() == ROOT, f"{label}: build context must be the repository root"
        assert link.body.get("pull_policy") == "build", f"{label}: superlink: the image is built, never pulled"
        for node in nodes:
            assert "build" not in node.body and node.body.get("pull_policy") == "never", (
                f"{label}: {node.name}: use the image built by the superlink service, never pull it")
            assert node.body.get("depends_on", {}).get(link.name) == {"condition": "service_healthy"}, (
                f"{label}: {node.name} must wait for the SuperLink's healthcheck")
        for svc in svcs.values():
            # Subprocess isolation: each container starts its own SuperExec and app processes.
            assert svc.flags.get("--isolation", "subprocess") == "subprocess", f"{label}: {svc.name}"
            assert "--allow-runtime-dependency-installation" not in svc.flags, f"{label}: {svc.name}"
        assert link.flags.get("--disable-runtime-dependency-installation") is True, f"{label}: superlink"
        # SuperNodes keep their ClientApp runtime API on the container's loopback (the default).
        assert all("--host" not in n.flags for n in nodes), f"{label}: a SuperNode exposes its runtime API"
        port = link.flags.get("--port")
        assert link.flags.get("--host") == "0.0.0.0" and port, f"{label}: superlink must listen on 0.0.0.0:PORT"
        for node in nodes:
            assert node.flags.get("--superlink") == f"{link.name}:{port}", f"{label}: {node.name} --superlink"
        for published in link.body.get("ports", []):
            assert str(published).startswith("127.0.0.1:") and str(published).endswith(f":{port}"), (
                f"{label}: superlink publishes {published!r}: bind the host's loopback only (the Control "
                "API accepts code from anyone who reaches it)")


def test_partition_ids_cover_0_to_n_minus_1_once(help_flags):
    for label, svcs in all_variants(help_flags):
        _, nodes = roles(svcs)
        configs = {n.name: parse_config_args([str(n.flags.get("--node-config", ""))]) for n in nodes}
        ids = sorted(c.get("partition-id", -1) for c in configs.values())
        assert ids == list(range(len(nodes))), f"{label}: partition ids {configs}"
        assert {c.get("num-partitions") for c in configs.values()} == {len(nodes)}, f"{label}: {configs}"


def test_each_service_keeps_state_in_its_own_named_volume(help_flags):
    for label, svcs in all_variants(help_flags):
        link, _ = roles(svcs)
        owners: dict[str, list[str]] = {}
        for svc in svcs.values():
            data = svc.mount_at("/data")  # FLWR_HOME, FACEFL_CACHE and outputs live here (Dockerfile ENV)
            assert data.named_volume, f"{label}: {svc.name}: /data must be a named volume"
            owners.setdefault(data.source, []).append(svc.name)
            for m in svc.mounts:
                assert m.named_volume or m.read_only, f"{label}: {svc.name}: bind mount {m.target} must be read-only"
        shared = {v: who for v, who in owners.items() if len(who) > 1}
        assert not shared, f"{label}: data volumes shared between services: {shared}"
        assert str(link.flags.get("--database", "")).startswith("/data/"), f"{label}: superlink state.db off the volume"
        declared = set(project((BASE,)).get("volumes") or {})
        assert set(owners) <= declared, f"{label}: undeclared volumes {set(owners) - declared}"


def test_each_supernode_mounts_only_its_own_member_data(help_flags):
    """Per-member layout: the one-shot job writes member k's ImageFolder into a named volume of its
    own; SuperNode k (partition k) mounts that volume and no other, read-only, where its node config
    points, and starts only after the job succeeded; the SuperLink (and so the ServerApp) gets none."""
    names = member_dir_names(NUM_NODES)
    run = " ".join(args_of("RUN"))
    for files in VARIANTS:
        label = "+".join(files)
        link, nodes = roles(services(files, help_flags))
        job = project(files)["services"].get(MEMBER_DATA)
        assert job is not None, f"{label}: no {MEMBER_DATA} service"
        where = f"{label}:{MEMBER_DATA}"
        assert job["command"][0] == FACEFL and job.get("restart") == "no", f"{where}: a one-shot `facefl` job"
        assert job.get("image") == link.body.get("image") and job.get("pull_policy") == "never", (
            f"{where}: the image built by the superlink service, never pulled")
        assert job.get("network_mode") == "none", f"{where}: writing the data needs no network"
        args = build_parser().parse_args(job["command"][1:])  # the installed CLI accepts it
        got = (args.command, args.data_command, args.members, args.no_export)
        assert got == ("data", "synth", NUM_NODES, False), (
            f"{where}: expected `facefl data synth --members {NUM_NODES}`, got {job['command']}")
        # One writable named volume per member folder, and nothing else (no key reaches the job).
        volume_of: dict[str, str] = {}
        for m in mounts(job, where):
            target = PurePosixPath(m.target)
            assert m.named_volume and not m.read_only and str(target.parent) == str(args.out), (
                f"{where}: {m.target}: expected a writable named volume on {args.out}/member-NN")
            volume_of[target.name] = m.source
            # A fresh volume takes the owner of its mount point in the image: the image user's, else root's.
            assert re.search(rf"mkdir -p [^&]*{re.escape(m.target)}(?=\s|$)", run), (
                f"{DOCKERFILE}: create {m.target} (the job writes there as the unprivileged user)")
        assert re.search(rf"chown -R \S+ [^&]*{re.escape(str(args.out))}(?=\s|$)", run), (
            f"{DOCKERFILE}: chown {args.out} to the image user")
        assert sorted(volume_of) == names and len(set(volume_of.values())) == NUM_NODES, (
            f"{where}: expected one volume of its own for each of {names}, got {volume_of}")
        assert set(volume_of.values()) <= set(project((BASE,)).get("volumes") or {}), f"{label}: undeclared volumes"
        member_volumes = set(volume_of.values())
        for node in nodes:
            config = parse_config_args([str(node.flags.get("--node-config", ""))])
            own = [m for m in node.mounts if m.source in member_volumes]
            expected = volume_of[names[int(config["partition-id"])]]  # sorted member folders = partition ids
            assert [m.source for m in own] == [expected], (
                f"{label}: {node.name} (partition {config['partition-id']}) must mount {expected} alone, got {own}")
            assert own[0].read_only and own[0].target == config.get(DATA_PATH_NODE_CONFIG), (
                f"{label}: {node.name}: mount {expected} read-only at its node config {DATA_PATH_NODE_CONFIG}")
            assert config.get(DATA_SOURCE_NODE_CONFIG) == "imagefolder", (
                f"{label}: {node.name}: node config {DATA_SOURCE_NODE_CONFIG} must name the export's format")
            state = PurePosixPath(str(config.get(CLIENT_STATE_NODE_CONFIG, "")))
            assert state.is_relative_to("/data") and not state.is_relative_to(own[0].target), (
                f"{label}: {node.name}: {CLIENT_STATE_NODE_CONFIG} (the member's split) must be on its /data volume")
            assert node.body.get("depends_on", {}).get(MEMBER_DATA) == {
                "condition": "service_completed_successfully"}, f"{label}: {node.name} must wait for {MEMBER_DATA}"
        assert not [m for m in link.mounts if m.source in member_volumes], f"{label}: superlink mounts member data"
        assert DATA_PATH_NODE_CONFIG not in yaml.safe_dump(link.body), f"{label}: superlink names a data path"


def test_he_secret_context_only_reaches_the_supernodes(help_flags):
    for label, svcs in all_variants(help_flags):
        link, nodes = roles(svcs)
        # Server side (the SuperLink runs the ServerApp): single files from an allow-list, and the
        # public context with key.json beside it.
        for m in link.mounts:
            if not m.named_volume:
                assert PurePosixPath(m.source).name in SERVER_SIDE_FILES, (
                    f"{label}: superlink mounts {m.source}: only {sorted(SERVER_SIDE_FILES)} may be mounted there")
        public = [m for m in link.mounts if PurePosixPath(m.source).name == PUBLIC_FILE]
        info = [m for m in link.mounts if PurePosixPath(m.source).name == KEY_INFO_FILE]
        assert len(public) == 1 and len(info) == 1, f"{label}: superlink needs {PUBLIC_FILE} and {KEY_INFO_FILE}"
        assert PurePosixPath(public[0].target).parent == PurePosixPath(info[0].target).parent, (
            f"{label}: the ServerApp reads {KEY_INFO_FILE} beside {PUBLIC_FILE}")
        assert PurePosixPath(public[0].source).parent == PurePosixPath(info[0].source).parent, label
        dumped = yaml.safe_dump(link.body)
        for word in (SECRET_FILE, SECRET_KEY_NODE_CONFIG):
            assert word not in dumped, f"{label}: the superlink service mentions {word}"
        # Each SuperNode: the secret context, read-only, at the path its node config names.
        for node in nodes:
            path = parse_config_args([str(node.flags.get("--node-config", ""))]).get(SECRET_KEY_NODE_CONFIG)
            assert path, f"{label}: {node.name}: node config lacks {SECRET_KEY_NODE_CONFIG}"
            m = node.mount_at(str(path))
            assert PurePosixPath(m.source).name == SECRET_FILE and m.read_only and not m.named_volume, (
                f"{label}: {node.name}: {path} must be a read-only bind mount of {SECRET_FILE}")


def test_tls_variant_is_complete(help_flags):
    base = services((BASE,), help_flags)
    tls = services((BASE, TLS), help_flags)
    link, nodes = roles(tls)
    for svc in tls.values():
        assert "--insecure" not in svc.flags, f"{TLS}: {svc.name} still runs with --insecure"
        # The same deployment apart from the security flags.
        takes_value = help_flags[svc.binary]
        assert (svc.argv_without(SECURITY_FLAGS, takes_value)
                == base[svc.name].argv_without(SECURITY_FLAGS, takes_value)), (
            f"{TLS}: {svc.name}: the command differs from {BASE} in more than the security flags")
        for flag in TLS_PATH_FLAGS[svc.binary]:
            assert flag in svc.flags, f"{TLS}: {svc.name} lacks {flag}"
            m = svc.mount_at(str(svc.flags[flag]))
            assert m.read_only and not m.named_volume, f"{TLS}: {svc.name}: {flag} must name a read-only bind mount"
    assert link.flags.get("--enable-supernode-auth") is True, f"{TLS}: superlink lacks --enable-supernode-auth"
    assert PurePosixPath(link.mount_at(str(link.flags["--ssl-keyfile"])).source).name == "server.key"
    for node in nodes:
        assert PurePosixPath(node.mount_at(str(node.flags["--root-certificates"])).source).name == "ca.crt"
    # Each SuperNode's private key is mounted into that node and nowhere else.
    key_sources = [n.mount_at(str(n.flags["--auth-supernode-private-key"])).source for n in nodes]
    assert len(set(key_sources)) == len(nodes), f"{TLS}: SuperNodes share an auth key: {key_sources}"
    for svc in tls.values():
        for m in svc.mounts:
            name = PurePosixPath(m.source).name
            assert name != "ca.key", f"{TLS}: {svc.name} mounts the CA's private key"
            assert name != "server.key" or svc is link, f"{TLS}: {svc.name} mounts the SuperLink's TLS key"
            own = svc.flags.get("--auth-supernode-private-key")
            assert m.source not in key_sources or (own and svc.mount_at(str(own)) == m), (
                f"{TLS}: {svc.name} mounts another node's auth key {m.source}")
    mounted_cert_files = {PurePosixPath(m.source).name for s in tls.values() for m in s.mounts} & CERT_FILES
    assert mounted_cert_files == CERT_FILES - {"ca.key"}, mounted_cert_files


def test_base_variant_is_consistently_plaintext(help_flags):
    svcs = services((BASE,), help_flags)
    insecure = {s.name: s.flags.get("--insecure") is True for s in svcs.values()}
    assert all(insecure.values()), f"{BASE}: every service needs --insecure (a TLS mismatch only says " \
                                   f"'Connection to the SuperLink is unavailable'): {insecure}"
