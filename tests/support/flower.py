"""Flower deployment for deployment-engine tests: a throwaway FLWR_HOME, SuperLink and SuperNodes
as real processes (``Deployment``, ``start_deployment``), ``flwr run`` and run status polling.

Facts this relies on (Flower 1.41, verified; see docs/deploy.md):
- ``flower-superlink`` is one HTTP server (Fleet, Control and Runtime APIs) on ``--host/--port``;
  each ``flower-supernode`` serves its ClientApp runtime API on ``--port`` (default 9094, so two
  nodes on one machine need different ports).
- Both spawn a ``flower-superexec`` by bare name (found through PATH), which spawns a fresh
  ``flwr-serverapp`` / ``flwr-clientapp`` process per run / message. The SuperLink's SuperExec is
  started with ``start_new_session=True``: it is *not* in the SuperLink's process group, so killing
  a process group is not enough. Children inherit the environment, so every process of a test is
  found by a unique tag in ``/proc/<pid>/environ``.
- ``flwr run`` exits 0 even when the run fails: the truth is ``flwr list --run-id ID --format
  json`` (status ``finished:completed`` / ``finished:failed`` / ``finished:stopped``). With
  ``--format json`` it exits 0 even when it could not submit: check ``"success"``.
- Repeated ``-c`` options are merged shallowly (``-c 'a.x=1' -c 'a.y=2'`` silently drops
  ``a.x``): always pass every override in one ``-c`` string.
- TLS and SuperNode authentication: see ``support.keys``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keys import Tls, write_supernode_key
from .processes import (
    LOOPBACK,
    TAG_VAR,
    Proc,
    alive,
    free_ports,
    logs_of,
    port_open,
    start,
    tagged,
    terminate,
    wait_for,
)

BIN = Path(sys.executable).parent  # the venv's bin/: flwr, flower-superlink, flower-supernode, ...


# --------------------------------------------------------------------------- env, config

def flwr_env(flwr_home: Path, cache: Path | None = None, tag: str | None = None,
             extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process and CLI call of one deployment.

    Throwaway FLWR_HOME (else ``~/.flwr`` is written, even by ``--help``), no telemetry or
    update check, runtime dependency installation off (else the SuperLink's SuperExec runs
    ``uv sync`` per run and pulls a CUDA torch), the venv's bin/ first on PATH (SuperLink and
    SuperNode spawn ``flower-superexec`` by bare name), and a unique tag to find every process.
    """
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        TAG_VAR: tag or uuid.uuid4().hex,
    })
    if cache is not None:
        env["FACEFL_CACHE"] = str(cache)
    if extra:
        env.update(extra)
    return env


def write_flwr_config(flwr_home: Path, name: str, address: str, insecure: bool = True,
                      root_certificates: Path | None = None, default: bool = True) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (the schema flwr 1.41 reads:
    ``[superlink] default = NAME`` and ``[superlink.NAME] address, insecure, root-certificates``)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"connection name {name!r}: use letters, digits, '-' and '_' only")
    lines = ["[superlink]"]
    if default:
        lines.append(f'default = "{name}"')
    lines += ["", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    if root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toml_value(value: Any) -> str:
    """One value for ``flwr run -c``: TOML syntax; strings without spaces or quotes only (the
    CLI splits on whitespace unless the value is quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "'" in value:
            raise ValueError(f"{value!r}: a -c string value cannot contain a single quote")
        return f"'{value}'"
    raise TypeError(f"{value!r}: run config values are bool, int, float or str")


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    """All overrides as the single ``-c`` string flwr 1.41 needs (repeated ``-c`` flags are merged
    shallowly and lose keys that share a dotted prefix)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


# --------------------------------------------------------------------------- deployment

@dataclass
class Deployment:
    """One SuperLink and its SuperNodes on loopback, with a throwaway FLWR_HOME and state db.

    ``env`` is the CLI's environment; the SuperLink and the SuperNodes may get additions
    (``superlink_env`` / ``node_env``) that their SuperExec and app processes inherit. ``probes``
    are SuperNodes that are expected to exit (e.g. refused ones): stopped in teardown, but their
    exit does not count as a failure of the deployment.
    """

    root: Path
    env: dict[str, str]
    connection: str
    superlink_port: int
    tls: Tls | None = None
    node_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    probes: list[Proc] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return self.env[TAG_VAR]

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.superlink_port}"

    def flwr(self, *args: str, timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """One ``flwr`` CLI call (bounded; the CLI spawns no children)."""
        return subprocess.run([str(BIN / "flwr"), *args], check=False, env=self.env, cwd=cwd or self.root,
                              text=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def online_nodes(self) -> int:
        """SuperNodes the SuperLink lists as online (``flwr supernode list --format json``)."""
        return sum(1 for n in self.nodes() if n.get("status") == "online")

    def nodes(self) -> list[dict[str, Any]]:
        """Every SuperNode the SuperLink knows (registered, online, offline), [] if it cannot tell."""
        try:
            res = self.flwr("supernode", "list", self.connection, "--format", "json", timeout=60)
            nodes = json.loads(res.stdout).get("nodes", [])
        except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError):
            return []
        return nodes if isinstance(nodes, list) else []

    def register_supernode(self, public_key: Path) -> int:
        """``flwr supernode register KEY.pub CONNECTION`` (SuperNode authentication); the node id."""
        res = self.flwr("supernode", "register", str(public_key), self.connection, "--format", "json", timeout=60)
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
            if payload.get("success"):
                return int(payload["node-id"])
        except (ValueError, KeyError):
            pass
        raise RunError(f"flwr supernode register {public_key} -> exit {res.returncode}\nstdout: {res.stdout}\n"
                       f"stderr: {res.stderr}\n" + logs_of(self.procs))

    def start_supernode(self, name: str, node_config: str, *, auth_key: Path | None = None, trust_ca: bool = True,
                        probe: bool = False, extra_args: Iterable[str] = ()) -> Proc:
        """Start one SuperNode (its ClientApp runtime API on a free local port).

        With TLS the node trusts the deployment's CA unless ``trust_ca=False`` (it then checks the
        SuperLink's certificate against the system store and must fail). ``probe=True`` puts it in
        ``probes`` (expected to exit) instead of ``procs``.
        """
        (port,) = free_ports(1)
        args = [str(BIN / "flower-supernode"), "--superlink", self.address, "--port", str(port),
                "--node-config", node_config]
        if self.tls is None:
            args.append("--insecure")
        elif trust_ca:
            args += ["--root-certificates", str(self.tls.ca)]
        if auth_key is not None:
            args += ["--auth-supernode-private-key", str(auth_key)]
        proc = start(name, [*args, *extra_args], {**self.env, **self.node_env}, self.root / name, self.root / "logs")
        (self.probes if probe else self.procs).append(proc)
        return proc

    def stop(self, timeout: float = 10.0) -> set[int]:
        """Probes and SuperNodes first (else they retry the vanished SuperLink), then the
        SuperLink, then any process still carrying this deployment's tag (e.g. a reparented
        SuperExec)."""
        left: set[int] = set()
        for proc in [*self.probes, *reversed(self.procs)]:
            left |= proc.stop(timeout)
        left |= terminate(tagged(self.tag) | left, timeout)
        return left

    def kill(self, timeout: float = 10.0) -> set[int]:
        """SIGKILL every process of this deployment, as when its machine loses power: no process
        gets to run a handler or flush anything. Repeats until no process carrying the tag is
        left (a SuperExec may spawn an app process while the others are being killed), then
        reaps the started processes and closes their logs (``stop``). Returns what is still alive."""
        started = [*self.probes, *self.procs]
        pids = {p.pid for p in started}.union(*(p.remember_children() for p in started))
        deadline = time.monotonic() + timeout
        while (pids := {p for p in pids | tagged(self.tag) if alive(p)}) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        return pids | self.stop(timeout)


def start_deployment(root: Path, num_nodes: int, node_config: Mapping[int, str] | None = None,
                     connection: str = "local-deployment", cache: Path | None = None,
                     extra_env: Mapping[str, str] | None = None, startup_timeout: float = 120.0, *,
                     tls: Tls | None = None, supernode_auth: bool = False,
                     superlink_env: Mapping[str, str] | None = None,
                     node_env: Mapping[str, str] | None = None, database: Path | None = None) -> Deployment:
    """Start 1 SuperLink (``--database root/state.db``, or ``database``: e.g. that of a SuperLink
    that ran before, as after a reboot) and ``num_nodes`` SuperNodes, each in its own working
    directory under ``root``; return once every node is online. The caller must call
    ``Deployment.stop()`` in a ``finally`` (also when this raises: it stops what it started).

    ``node_config[i]`` defaults to ``partition-id=i num-partitions=num_nodes``. Without ``tls``
    everything runs ``--insecure``. ``supernode_auth`` (needs ``tls``) starts the SuperLink with
    ``--enable-supernode-auth`` and registers a fresh key pair per node (``root/node-keys/``)
    before starting it. ``superlink_env`` / ``node_env`` are added to those processes' environment.
    """
    if supernode_auth and tls is None:
        raise ValueError("supernode_auth needs tls: flower-superlink refuses --enable-supernode-auth with --insecure")
    (port,) = free_ports(1)
    home = root / "flwr-home"
    env = flwr_env(home, cache, extra=extra_env)
    write_flwr_config(home, connection, f"{LOOPBACK}:{port}", insecure=tls is None,
                      root_certificates=tls.ca if tls else None)
    dep = Deployment(root, env, connection, port, tls=tls, node_env=dict(node_env or {}))
    security = (["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
                if tls else ["--insecure"])
    if supernode_auth:
        security.append("--enable-supernode-auth")
    try:
        dep.procs.append(start("superlink", [str(BIN / "flower-superlink"), *security, "--host", LOOPBACK,
                                             "--port", str(port), "--database", str(database or root / "state.db")],
                               {**env, **(superlink_env or {})}, root / "superlink", root / "logs"))
        wait_for(lambda: port_open(port), startup_timeout, "SuperLink did not open its port", dep.procs)
        for i in range(num_nodes):
            key = None
            if supernode_auth:
                key, pub = write_supernode_key(root / "node-keys" / f"supernode-{i}")
                dep.register_supernode(pub)
            cfg = (node_config or {}).get(i, f"partition-id={i} num-partitions={num_nodes}")
            dep.start_supernode(f"supernode-{i}", cfg, auth_key=key)
        wait_for(lambda: dep.online_nodes() >= num_nodes, startup_timeout,
                 f"{num_nodes} SuperNodes did not come online", dep.procs, interval=0.5)
    except BaseException:
        dep.stop()
        raise
    return dep


# --------------------------------------------------------------------------- runs

class RunError(RuntimeError):
    """``flwr run`` / the run itself failed; the message carries the Flower logs."""


def submit_run(dep: Deployment, app: Path, overrides: Mapping[str, Any], timeout: float = 120.0) -> int:
    """``flwr run APP CONNECTION --format json -c '<all overrides>'``; return the run id."""
    args = ["run", str(Path(app).resolve()), dep.connection, "--format", "json"]  # the CLI runs in dep.root
    if overrides:
        args += ["-c", run_config_arg(overrides)]
    res = dep.flwr(*args, timeout=timeout)
    try:
        payload = json.loads(res.stdout)
    except json.JSONDecodeError:
        payload = {}
    if res.returncode != 0 or not payload.get("success") or not payload.get("run-id"):
        raise RunError(f"flwr {' '.join(args)} -> exit {res.returncode}\nstdout: {res.stdout}\n"
                       f"stderr: {res.stderr}\n" + logs_of(dep.procs))
    return int(payload["run-id"])


def run_info(dep: Deployment, run_id: int) -> dict[str, Any]:
    """``flwr list --run-id ID --format json`` -> that run's record."""
    res = dep.flwr("list", dep.connection, "--run-id", str(run_id), "--format", "json", timeout=60)
    try:
        payload = json.loads(res.stdout)
        (info,) = [r for r in payload["runs"] if int(r["run-id"]) == run_id]
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise RunError(f"flwr list --run-id {run_id}: unexpected output ({exc}): exit {res.returncode}\n"
                       f"stdout: {res.stdout}\nstderr: {res.stderr}") from None
    return info


def run_logs(dep: Deployment, run_id: int) -> str:
    """The run's ServerApp log as the SuperLink stored it (``flwr log ID --show``)."""
    try:
        res = dep.flwr("log", str(run_id), dep.connection, "--show", timeout=60)
    except subprocess.TimeoutExpired:
        return "(flwr log timed out)"
    return res.stdout + res.stderr


def wait_for_run(dep: Deployment, run_id: int, timeout: float = 600.0, interval: float = 2.0) -> dict[str, Any]:
    """Poll ``flwr list`` until the run's status starts with ``finished:``; return its record.
    Raises RunError (with the logs) on timeout or if a Flower process died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        info = run_info(dep, run_id)
        if str(info.get("status", "")).startswith("finished:"):
            return info
        dead = [p for p in dep.procs if p.popen.poll() is not None]
        if dead or time.monotonic() >= deadline:
            why = (", ".join(f"{p.name} exited with {p.popen.returncode}" for p in dead)
                   or f"still {info.get('status')!r} after {timeout:.0f} s")
            raise RunError(f"run {run_id}: {why}\n----- flwr log -----\n{run_logs(dep, run_id)[-6000:]}\n"
                           + logs_of(dep.procs))
        for proc in dep.procs:
            proc.remember_children()
        time.sleep(interval)


def require_completed(dep: Deployment, run_id: int, info: Mapping[str, Any]) -> None:
    if info.get("status") != "finished:completed":
        raise RunError(f"run {run_id} ended {info.get('status')!r}: {info.get('status-details')}\n"
                       f"----- flwr log -----\n{run_logs(dep, run_id)[-8000:]}\n" + logs_of(dep.procs))
