"""Resuming a run on Flower's deployment engine (run config ``resume-dir``) after the machine of the
server went down.

* End to end: a 3-round DP run on 1 SuperLink + 2 SuperNodes (each with its own node-local
  ``state-dir``) is interrupted in round 2 and resumed. Every process of the deployment is
  SIGKILLed at once (SuperLink, its SuperExec and the ServerApp, the SuperNodes and any ClientApp:
  no handler runs, nothing is flushed), as when the machine loses power, at the moment both
  clients have persisted their state of round 2 while status.json still commits only round 1.
  That is the hardest realistic point: the clients spent privacy budget on an update the server
  never committed, so the resumed run must re-run round 2 and charge it once, not twice and not
  zero times. It is deterministic enough: the state files are polled every 20 ms, and after the
  second appears the server still has to receive both replies, aggregate, checkpoint and
  evaluate before it commits (5-6 s here); the test checks where the kill landed instead of
  assuming it. Then the machine comes back: a new SuperLink on the SAME database (the documented
  persistent ``--database``), new SuperNodes with the same state dirs, the same overrides plus
  ``resume-dir``. The database still lists the dead SuperNodes as online until their heartbeat
  expires (up to 60 s), which made the resumed run fail before server/federation.py's describe
  phase learned to leave such nodes out.
* The same describe phase on Flower's real in-memory SuperLink state, deterministic: a dead node
  that is still listed is left out and named by its own node id; when it was the only node for a
  partition, the run is refused naming the partition and the dead node.

The reference is the same configuration on the simulation engine (tests/sim_runs.py). The two
engines run the same ServerApp and ClientApp code with one torch thread per client and aggregate
in partition order, so they must give the same bits; this is checked, not assumed: round 1 of the
deployment ran before any interruption, and its checkpoint must equal the simulation's.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import uuid
from pathlib import Path

import pytest
from flower_messages import next_instruction
from sim_runs import REPLAYABLE, TINY, simulated_run
from support.flower import (
    Deployment,
    require_completed,
    run_info,
    start_deployment,
    submit_run,
    wait_for_run,
)
from support.processes import cmdline, tagged, wait_for

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPLAYABLE  # bit-identical to a simulation (research noise switch); 3 rounds, 2 DP clients (Dirichlet split), every client in every round, pretraining
NODES = 2
ROUNDS = 3
KILL_ROUND = 2


def _overrides(items: tuple[str, ...]) -> dict[str, object]:
    """``key=value`` overrides as the typed run config values ``flwr run -c`` needs."""
    from common.config import load_config

    flat = load_config(None, list(items)).to_flat()
    return {key: flat[key] for key in (item.split("=", 1)[0] for item in items)}


OVERRIDES = _overrides(CONFIG)


@pytest.fixture()
def deployments(tmp_path: Path):
    """``start(name, **start_deployment options)`` starts a deployment of NODES SuperNodes whose
    node configs name their state dirs and allow the research noise switch (CONFIG uses it); every
    process of each is stopped by PID at the end."""
    from client.local import ALLOW_REPRODUCIBLE_NOISE_NODE_CONFIG
    from common.runs.rundir import CLIENT_STATE_NODE_CONFIG

    started: list[Deployment] = []
    node_config = {i: f"partition-id={i} num-partitions={NODES} {ALLOW_REPRODUCIBLE_NOISE_NODE_CONFIG}=true "
                      f"{CLIENT_STATE_NODE_CONFIG}='{tmp_path / 'client-state' / f'node-{i}'}'" for i in range(NODES)}

    def start(name: str, **options) -> Deployment:
        # the session's data cache (shared with the reference simulation); one torch thread per process
        dep = start_deployment(tmp_path / name, NODES, node_config=node_config,
                               cache=Path(os.environ["FACEFL_CACHE"]),
                               extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, **options)
        started.append(dep)
        return dep

    try:
        yield start
    finally:
        left = set().union(*(dep.stop(timeout=10.0) | tagged(dep.tag) for dep in started))
        assert not left, "processes left after teardown: " + "; ".join(
            f"{pid} {cmdline(pid)[:160]}" for pid in sorted(left))


def _trained(state: Path, server_round: int) -> int:
    """How many clients persisted their state after training ``server_round`` (any run)."""
    return len(list(state.glob(f"node-*/*/client-*/round-{server_round:03d}.safetensors")))


def _status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, json.JSONDecodeError):  # not written yet (replaced atomically, never torn)
        return {}


def _records(run: Path) -> list[dict]:
    from common.runs.rundir import RunDir

    return RunDir(run).read_metrics()


def _online(dep: Deployment) -> set[int]:
    return {int(n["node-id"]) for n in dep.nodes() if n.get("status") == "online"}


def _same_bits(a: Path, b: Path) -> bool:
    from common.nn.checkpoint import load_checkpoint

    x, y = load_checkpoint(a)[0], load_checkpoint(b)[0]
    return set(x) == set(y) and all(x[k].numpy().tobytes() == y[k].numpy().tobytes() for k in x)


@pytest.mark.timeout(300)
def test_run_resumes_after_the_server_machine_went_down(deployments, tmp_path, tmp_path_factory) -> None:
    from server.app import RESUME_KEY

    out, state = tmp_path / "runs", tmp_path / "client-state"
    started = time.monotonic()

    # 1-2. Run until both clients trained round 2, then every process dies at once.
    first = deployments("first")
    first_id = submit_run(first, ROOT, {**OVERRIDES, "output-dir": str(out)})
    wait_for(lambda: _trained(state, KILL_ROUND) == NODES, timeout=240,
             what=f"both clients trained round {KILL_ROUND}", procs=first.procs, interval=0.02)
    left = first.kill()
    assert not left, f"alive after SIGKILL: {[cmdline(p) for p in left]}"
    log.info("first deployment killed after %.1f s", time.monotonic() - started)
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    killed = _status(run)
    assert killed.get("status") == "running" and killed.get("rounds_completed") == KILL_ROUND - 1, (
        f"the kill was meant to land after the clients trained round {KILL_ROUND} and before the server "
        f"committed it; status.json says {killed}")
    dead = {int(n) for n in next(e for e in _records(run) if e["event"] == "start")["partitions"].values()}

    # 3. The machine is back: the SuperLink on its old database, new SuperNodes (new node ids) with the
    # same state dirs. The database may still list the dead nodes as online, so wait for the new ones.
    second = deployments("second", database=tmp_path / "first" / "state.db")
    wait_for(lambda: len(_online(second) - dead) == NODES, timeout=120, what="the new SuperNodes came online",
             procs=second.procs, interval=0.5)
    # An operator who forgot one of the original overrides (federation.rounds: the default, 5) is
    # refused, naming the key; the resume with the same overrides goes through. The reference
    # simulation runs meanwhile.
    resumed = {**OVERRIDES, "output-dir": str(tmp_path / "elsewhere"), RESUME_KEY: str(run)}
    run_id = submit_run(second, ROOT, resumed)
    refused_id = submit_run(second, ROOT, {k: v for k, v in resumed.items() if k != "federation.rounds"})
    log.info("resume submitted after %.1f s", time.monotonic() - started)
    reference, _ = simulated_run(tmp_path_factory, CONFIG)
    require_completed(second, run_id, wait_for_run(second, run_id, timeout=240))
    log.info("resumed run completed after %.1f s", time.monotonic() - started)
    refused = wait_for_run(second, refused_id, timeout=60)
    assert refused["status"] == "finished:failed", refused
    assert f"{RESUME_KEY}={run}" in refused["status-details"], refused
    assert "federation.rounds (5, run has 3)" in refused["status-details"], refused

    # 4. The run finished where it was, every round once, the resumed rounds with the new nodes.
    assert not (tmp_path / "elsewhere").exists()  # output-dir plays no part in a resume
    status = _status(run)
    assert status["status"] == "finished" and status["rounds_completed"] == ROUNDS, status
    records = _records(run)
    assert [e["round"] for e in records if e["event"] == "round"] == list(range(1, ROUNDS + 1)), records
    events = [r["event"] for r in records]
    assert events.count("resume") == 1 and events.count("pretrain") == 1  # the refused attempt left no trace
    assert events.index("pretrain") < events.index("resume")  # pretraining was not repeated
    resume = records[events.index("resume")]
    assert resume["after_round"] == KILL_ROUND - 1 and resume["previous_status"] == "running", resume
    assert {int(n) for n in resume["partitions"].values()} == _online(second) - dead, resume
    marked = [r for r in records if r["event"] == "interrupted"]
    assert all(r["interrupted_event"] == "round" and r["round"] == KILL_ROUND for r in marked), marked
    assert resume["interrupted"] == [{"interrupted_event": "round", "round": KILL_ROUND}] * len(marked)

    # DP accounting went on from the nodes' disks: each client's ledger holds every round once, its
    # steps are the sum of what it reported per round (the re-run round 2 charged once), and the
    # whole entry (history, epsilon) is the uninterrupted run's.
    privacy = json.loads((run / "privacy.json").read_text())
    rounds = [e for e in records if e["event"] == "round"]
    for pid, entry in privacy["clients"].items():
        assert entry["rounds"] == list(range(1, ROUNDS + 1)), (pid, entry)
        assert entry["steps"] == sum(c["steps"] for e in rounds for c in e["clients"] if c["partition"] == int(pid))
    theirs = json.loads((reference.path / "privacy.json").read_text())
    assert privacy["clients"] == theirs["clients"] and sorted(privacy["clients"]) == ["0", "1"]
    for dep in (first, second):
        for proc in dep.procs:
            assert "both releases are charged" not in proc.log_path.read_text(errors="replace"), proc.name

    # The models: round 1 (before the kill) shows that the two engines agree; the re-run round 2,
    # round 3 and the final model show that the resume changed nothing.
    for name in [f"round-{r:03d}" for r in range(1, ROUNDS + 1)] + ["final"]:
        resumed_model, reference_model = (r / "models" / f"{name}.safetensors" for r in (run, reference.path))
        assert _same_bits(resumed_model, reference_model), name

    # The interrupted Flower run ends failed once its ServerApp's heartbeat expires (60 s after the kill).
    wait_for(lambda: run_info(second, first_id)["status"] == "finished:failed", timeout=90,
             what=f"the killed Flower run {first_id} is listed as failed", procs=second.procs, interval=3)
    assert "No heartbeat" in run_info(second, first_id)["status-details"]


# ---------------------------------------------------------------- the describe phase on Flower's SuperLink state

def _play_describe(state, node: int, partition: int, num_partitions: int) -> threading.Thread:
    """A live SuperNode: takes its describe query and answers with the real ClientApp handler."""
    from flwr.app import Context, RecordDict

    from client.app import describe

    def run() -> None:
        if (ins := next_instruction(state, node, 30)) is None:
            return
        context = Context(run_id=ins.metadata.run_id, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": partition, "num-partitions": num_partitions})
        reply = describe(ins, context)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's simulation engine does
        state.store_message_res(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(120)
def test_describe_leaves_out_a_dead_node_the_superlink_still_lists(link, caplog) -> None:
    from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID

    from common.config import load_config
    from common.data.cache import build_dataset
    from common.split.build import build_manifest
    from server.federation import RunFailed, describe_clients

    grid, state, nodes = link  # partition -> node id, all three alive

    def describe_with_a_dead_node(num_clients: int) -> tuple[int, object]:
        """describe_clients with the live nodes playing partitions 0-2 and one more node that sent
        its last heartbeat (1 s interval) just now: listed online for 2 s, then the SuperLink answers
        for it. Returns (dead node id, the partition map or the RunFailed raised)."""
        cfg = load_config(None, [*TINY, f"split.num_clients={num_clients}", "data.identities=24",
                                 "data.images_per_identity=6"])
        manifest = build_manifest(cfg, build_dataset(cfg))
        dead = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=1)
        state.acknowledge_node_heartbeat(node_id=dead, heartbeat_interval=1)
        players = [_play_describe(state, node, p, num_clients) for p, node in nodes.items()]
        try:
            outcome: object = describe_clients(grid, cfg, manifest)
        except RunFailed as exc:
            outcome = exc
        for thread in players:
            thread.join(timeout=30)
            assert not thread.is_alive()
        return dead, outcome

    with caplog.at_level(logging.WARNING, logger="server.federation"):
        dead, partitions = describe_with_a_dead_node(3)
    assert partitions == nodes  # every partition has a live node: the dead one is left out...
    assert f"node {dead} failed to describe itself: Error: Node Unavailable" in caplog.text  # ...named by its id

    dead, refused = describe_with_a_dead_node(4)  # partition 3 had only the node that died
    assert isinstance(refused, RunFailed), refused
    assert str(refused).startswith(f"no node answered for partition ids [3]; node {dead} failed to describe itself: "
                                   "Error: Node Unavailable"), refused
