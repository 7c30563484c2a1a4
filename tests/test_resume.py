"""Resumable runs: ``facefl run --resume RUN_DIR`` after the server process was killed.

* End to end (real ``facefl run`` processes, Ray, Opacus): a 5-round DP run is SIGKILLed in
  round 3, after both clients trained (and persisted) round 3 but before the server committed
  it; ``--resume`` then finishes it. Every round checkpoint and the final model are bit for bit
  those of an uninterrupted run with the same seed, privacy.json is identical (steps, epsilon,
  rounds, histories: the re-run round is charged once), rounds 1..5 appear once each in
  metrics.jsonl, the interrupted lines are marked, and pretraining is not repeated. The same
  with HE (3 rounds, killed in round 2): the decrypted final model matches within CKKS
  precision and the ledger is identical.
* A finished run, a directory that is no run, and a resume with config overrides are refused
  with errors that say why.
* Units: the commit / rollback protocol of RunDir, the run lock (released by a killed holder),
  the client's persisted state (a bit-identical re-run of a round replaces it, a different one
  is charged on top), a client that must not start afresh, and the deployment's resume-dir.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sim_runs import LEDGER_FULL, REPLAYABLE, simulated_run
from support.flower import flwr_env
from support.processes import TAG_VAR, Proc, cmdline, start, tagged, terminate, wait_for

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]

ROOT = Path(__file__).resolve().parents[1]
FIVE_ROUNDS = REPLAYABLE + ("federation.rounds=5",)  # 2 DP clients, every client in every round
KILL_ROUND = 3


# ---------------------------------------------------------------- helpers: facefl run as a process

def _cli(args: list[str], overrides: tuple[str, ...] = ()) -> list[str]:
    argv = [sys.executable, "-m", "workflow.cli", "--no-progress", "run", *args]
    for item in overrides:
        argv += ["--set", item]
    return argv


def _env(tmp: Path, state: Path) -> dict[str, str]:
    """One thread per process (server and Ray actors alike, so float reductions repeat), a
    throwaway FLWR_HOME, the session's data cache, the clients' state root, a unique tag."""
    from common.runs.rundir import CLIENT_STATE_ENV

    return flwr_env(tmp / "flwr-home", Path(os.environ["FACEFL_CACHE"]),
                    extra={CLIENT_STATE_ENV: str(state), "OMP_NUM_THREADS": "1"})


def _run_dir(out: Path) -> Path | None:
    dirs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
    return dirs[0] if len(dirs) == 1 else None


def _status(out: Path) -> dict:
    run = _run_dir(out)
    try:
        return json.loads((run / "status.json").read_text()) if run else {}
    except (OSError, json.JSONDecodeError):  # not written yet (it is replaced atomically, never torn)
        return {}


def _finish(proc: Proc, tag: str, timeout: float) -> int:
    """Wait for ``proc`` to exit by itself (bounded), stop whatever it or its Ray left (found by
    the environment tag), return its exit code."""
    try:
        code = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    left = proc.stop() | terminate(tagged(tag))
    assert code is not None, f"{proc.name} did not finish within {timeout:.0f} s\n{proc.log_tail()}"
    assert not left, f"{proc.name} left processes behind: {[cmdline(p) for p in left]}"
    return code


def _interrupted_run(tmp: Path, overrides: tuple[str, ...], kill_round: int, he_keys: Path | None = None) -> Path:
    """Start ``facefl run`` in its own session; once every client has persisted its state of
    ``kill_round`` while status.json still commits only ``kill_round - 1``, SIGKILL the whole
    process group (server, Ray and its workers) and return the run directory."""
    state = tmp / "client-state"
    env = _env(tmp, state)
    extra = ["--he-keys", str(he_keys)] if he_keys is not None else []
    proc = start("interrupted", _cli(["--out", str(tmp / "runs"), *extra], overrides), env, ROOT, tmp / "logs")
    clients = int(dict(o.split("=") for o in overrides)["split.num_clients"])
    try:
        wait_for(lambda: len(list(state.glob(f"*/client-*/round-{kill_round:03d}.safetensors"))) == clients,
                 timeout=400, what=f"both clients trained round {kill_round}", procs=[proc], interval=0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(30)
    finally:
        left = proc.stop() | terminate(tagged(env[TAG_VAR]))
    assert not left, f"processes left after the kill: {[cmdline(p) for p in left]}"
    status = _status(tmp / "runs")
    assert status.get("status") == "running" and status.get("rounds_completed") == kill_round - 1, (
        f"the kill was meant to land after the clients trained round {kill_round} and before the server "
        f"committed it; status.json says {status}")
    return _run_dir(tmp / "runs")


def _resume(tmp: Path, run: Path, he_keys: Path | None = None) -> None:
    extra = ["--he-keys", str(he_keys)] if he_keys is not None else []
    env = _env(tmp, tmp / "client-state")
    proc = start("resume", _cli(["--resume", str(run), *extra]), env, ROOT, tmp / "logs")
    assert _finish(proc, env[TAG_VAR], 400) == 0, proc.log_tail()


def _load(path: Path) -> dict[str, torch.Tensor]:
    from common.nn.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]


def _same_bits(a: Path, b: Path) -> bool:
    x, y = _load(a), _load(b)
    return set(x) == set(y) and all(x[k].numpy().tobytes() == y[k].numpy().tobytes() for k in x)


def _records(run: Path) -> list[dict]:
    from common.runs.rundir import RunDir

    return RunDir(run).read_metrics()


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """(uninterrupted run, killed-then-resumed run) of FIVE_ROUNDS; the uninterrupted one runs
    at the same time as the one that gets killed (both mostly wait on Ray)."""
    ref_tmp, tmp = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("interrupted")
    env = _env(ref_tmp, ref_tmp / "client-state")
    ref = start("reference", _cli(["--out", str(ref_tmp / "runs")], FIVE_ROUNDS), env, ROOT, ref_tmp / "logs")
    try:
        run = _interrupted_run(tmp, FIVE_ROUNDS, KILL_ROUND)
    finally:
        code = _finish(ref, env[TAG_VAR], 400)
    assert code == 0, ref.log_tail()
    _resume(tmp, run)
    return _run_dir(ref_tmp / "runs"), run, tmp


@pytest.mark.timeout(900)
def test_killed_run_resumes_to_the_uninterrupted_result(plain_runs) -> None:
    ref, run, tmp = plain_runs
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    # Bit for bit: the same global model after every round, re-run round included, and at the end.
    for name in [f"round-{r:03d}" for r in range(1, 6)] + ["final"]:
        assert _same_bits(ref / "models" / f"{name}.safetensors", run / "models" / f"{name}.safetensors"), name
    # The ledger charges each client once per round: the re-run of round 3 replaced, not added.
    ours, theirs = (json.loads((r / "privacy.json").read_text()) for r in (run, ref))
    assert ours["clients"] == theirs["clients"] and set(ours["clients"]) == {"0", "1"}
    assert all(c["rounds"] == [1, 2, 3, 4, 5] and c["steps"] > 0 and c["epsilon"] > 0
               for c in ours["clients"].values())

    records = _records(run)
    assert [e["round"] for e in records if e["event"] == "round"] == [1, 2, 3, 4, 5]
    events = [r["event"] for r in records]
    resume = records[events.index("resume")]
    assert resume["after_round"] == KILL_ROUND - 1 and resume["previous_status"] == "running"
    assert events.count("pretrain") == 1 and events.index("pretrain") < events.index("resume")  # not repeated
    # Lines written after the last commit (if the kill came after the round's metrics line) are marked.
    marked = [r for r in records if r["event"] == "interrupted"]
    assert all(r["interrupted_event"] == "round" and r["round"] == KILL_ROUND for r in marked)
    assert resume["interrupted"] == [{"interrupted_event": "round", "round": KILL_ROUND}] * len(marked)
    # Same training, same losses, round by round.
    def losses(records: list[dict]) -> list:
        return [[(c["partition"], c["train-loss"]) for c in e["clients"]] for e in records if e["event"] == "round"]

    assert losses(records) == losses(_records(ref))
    log = (tmp / "logs" / "resume.log").read_text(errors="replace")
    assert "both releases are charged" not in log
    # A finished simulation deletes its clients' state: it can never be resumed.
    assert not (tmp / "client-state" / run.name).exists()


@pytest.mark.timeout(120)
def test_finished_run_and_non_run_directory_are_refused(plain_runs, tmp_path, capsys) -> None:
    from workflow.cli import main

    _, run, _ = plain_runs
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["--no-progress", "run", "--resume", str(run)]) == 2
    assert f"{run}: the run already finished" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before
    assert main(["--no-progress", "run", "--resume", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a facefl run directory (no config.toml)" in capsys.readouterr().err
    assert main(["--no-progress", "run", "--resume", str(run), "--set", "federation.rounds=6"]) == 2
    assert "resumes with its own config.toml; drop --set" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_killed_he_run_resumes(tmp_path_factory) -> None:
    """HE: the server resumes from the encrypted checkpoint of round 1 (sum, mask, total weight)
    and the clients from their persisted state; compared with the same run in plaintext (CKKS
    adds noise of about 1e-9 per value, so equality holds to a tolerance, as in test_he.py)."""
    from common.he.keys import KeyParams, write_keys

    tmp = tmp_path_factory.mktemp("he")
    keys = tmp / "keys"
    write_keys(keys, KeyParams())
    run = _interrupted_run(tmp, REPLAYABLE, kill_round=2, he_keys=keys)
    _resume(tmp, run, he_keys=keys)
    plain, _ = simulated_run(tmp_path_factory, REPLAYABLE)
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    models = sorted(p.name for p in (run / "models").iterdir())
    assert models == ["final.he.safetensors", "final.safetensors", "initial.safetensors"] + [
        f"round-{r:03d}.he.safetensors" for r in (1, 2, 3)]  # final.safetensors: decrypted by the CLI
    got, want = _load(run / "models" / "final.safetensors"), _load(plain.path / "models" / "final.safetensors")
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-4, err_msg=key)
    ours, theirs = (json.loads((r / "privacy.json").read_text()) for r in (run, plain.path))
    assert ours["clients"] == theirs["clients"]
    assert [e["round"] for e in _records(run) if e["event"] == "round"] == [1, 2, 3]
    resume = next(r for r in _records(run) if r["event"] == "resume")
    assert resume["after_round"] == 1


# ---------------------------------------------------------------- units: run directory

def _run(tmp_path: Path):
    from common.config import load_config
    from common.runs.rundir import RunDir

    return RunDir.create(tmp_path, "unit", load_config(None, []))


def test_rollback_marks_uncommitted_lines_and_keeps_committed_ones(tmp_path) -> None:
    from common.runs.rundir import INTERRUPTED

    run = _run(tmp_path)
    run.write_status("running", rounds_completed=0)
    run.log_metrics("start")
    run.commit(0)
    run.log_metrics("round", round=1)
    run.commit(1)
    committed = run.metrics_path.read_bytes()
    run.log_metrics("round", round=2)  # the server died before committing round 2...
    with open(run.metrics_path, "a", encoding="utf-8") as fh:
        fh.write('{"event": "round", "rou')  # ...in the middle of a later line
    point = run.rollback()
    assert point.rounds_completed == 1 and point.previous_status == "running"
    assert [(r["interrupted_event"], r["round"]) for r in point.interrupted] == [("round", 2)]
    text = run.metrics_path.read_bytes()
    assert text.startswith(committed)  # committed lines are untouched, byte for byte
    assert [(r["event"], r.get("round")) for r in run.read_metrics()] == [
        ("start", None), ("round", 1), (INTERRUPTED, 2)]
    run.write_status("failed", error="x", **run.last_commit())  # a failed run keeps its commit...
    assert run.rollback().rounds_completed == 1  # ...and stays resumable; nothing new to mark
    assert run.metrics_path.read_bytes() == text


def test_resume_is_refused_with_reasons(tmp_path) -> None:
    from common.runs.rundir import ResumeError, RunDir

    with pytest.raises(ResumeError, match="not a facefl run directory"):
        RunDir(tmp_path).check_resumable()
    run = _run(tmp_path)
    with pytest.raises(ResumeError, match="never started"):
        run.check_resumable()
    run.write_status("finished", rounds_completed=3)
    with pytest.raises(ResumeError, match="already finished"):
        run.check_resumable()
    run.write_status("running", rounds_completed=2)  # no commit record: an older facefl wrote it
    with pytest.raises(ResumeError, match="without resume support"):
        run.check_resumable()
    run.log_metrics("round", round=2)
    run.commit(2)
    run.metrics_path.write_text("")  # the committed line is gone
    with pytest.raises(ResumeError, match="truncated or edited"):
        run.rollback()


@pytest.mark.timeout(60)
def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path) -> None:
    from common.runs.rundir import ResumeError

    run = _run(tmp_path)
    with run.lock(), pytest.raises(ResumeError, match="another process is working on this run"), run.lock():
        pass
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+b'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run.lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ResumeError), run.lock():
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with run.lock():  # the kernel dropped the dead process's lock
            pass
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        holder.stdout.close()


def test_deployment_resume_dir_must_match_the_runs_config(tmp_path) -> None:
    from common.config import load_config
    from common.runs.rundir import ResumeError
    from server.app import RESUME_KEY, config_from_run_config, resume_dir_of

    run = _run(tmp_path)
    run.write_status("running", rounds_completed=0)
    flat = {**load_config(run.config_path).to_flat(), "output-dir": "elsewhere"}
    cfg, _ = config_from_run_config({**flat, RESUME_KEY: str(run.path)})
    assert resume_dir_of(flat, cfg) is None  # no resume-dir: a new run
    assert resume_dir_of({**flat, RESUME_KEY: str(run.path)}, cfg).path == run.path
    changed, _ = config_from_run_config({**flat, "federation.rounds": 9, "seed": 4})
    with pytest.raises(ResumeError, match=r"federation\.rounds \(9, run has 5\), seed \(4, run has 0\)"):
        resume_dir_of({**flat, RESUME_KEY: str(run.path)}, changed)


# ---------------------------------------------------------------- units: the client's persisted state

@pytest.fixture(scope="module")
def tiny_cfg():
    from common.config import load_config

    return load_config(None, list(LEDGER_FULL))


@pytest.mark.timeout(240)
def test_rerun_round_is_charged_once_if_identical_and_twice_otherwise(tiny_cfg, tmp_path, caplog) -> None:
    """Real local training with a store: a re-run of round 2 from the persisted round-1 state
    releases the same bits and keeps the history of the first attempt; a re-run from another
    global model releases a different update and adds its steps on top."""
    from client.local import StateStore, local_train, update_digest
    from common.nn.build import build_model, model_spec
    from common.train.dp import total_steps
    from common.train.local_round import ClientState

    store = StateStore.for_client(tmp_path, "run-unit", 1)
    g0 = build_model(model_spec(tiny_cfg), tiny_cfg.seed).state_dict()
    g1, s1, _ = local_train(tiny_cfg, 1, 1, g0, ClientState(), store)
    per_round = total_steps(s1.dp_history)
    assert store.rounds() == [1] and per_round > 0

    first, s2, report = local_train(tiny_cfg, 1, 2, g1, store.latest_before(2).state, store)
    again, s2_again, report_again = local_train(tiny_cfg, 1, 2, g1, store.latest_before(2).state, store)
    assert update_digest(first) == update_digest(again)  # deterministic local training
    assert s2_again.dp_history == s2.dp_history and total_steps(s2.dp_history) == 2 * per_round
    assert report_again["epsilon"] == report["epsilon"]
    assert store.load(2).released == [update_digest(first)]

    with caplog.at_level(logging.WARNING, logger="client.local"):
        other, s2_other, report_other = local_train(tiny_cfg, 1, 2, g0, store.latest_before(2).state, store)
    assert update_digest(other) != update_digest(first)
    assert total_steps(s2_other.dp_history) == 3 * per_round and report_other["epsilon"] > report["epsilon"]
    assert store.load(2).released == [update_digest(first), update_digest(other)]
    assert "both releases are charged" in caplog.text

    local_train(tiny_cfg, 1, 3, g1, store.latest_before(3).state, store)
    assert store.rounds() == [2, 3]  # the state a re-run of round 3 needs, and round 3's own
    assert store.load(3).state.noise_multiplier == s1.noise_multiplier > 0


def test_state_store_keys_stay_inside_the_state_root(tmp_path) -> None:
    from client.local import StateStore

    assert StateStore.for_client(tmp_path, "run-20250101-000000-abcd1234", 0).directory == (
        tmp_path / "run-20250101-000000-abcd1234" / "client-0")
    for bad in ("../x", "a/b", "..", ".hidden", ""):
        with pytest.raises(ValueError, match="plain directory name"):
            StateStore.for_client(tmp_path, bad, 0)


def _train_message(run_key: str, last_round: int):
    from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict

    from common.wire import LAST_ROUND, RUN_KEY, RUN_RECORD

    metadata = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({RUN_RECORD: ConfigRecord({RUN_KEY: run_key, LAST_ROUND: last_round})}),
                   metadata=metadata)


def test_client_never_starts_afresh_after_rounds_the_server_accepted(tmp_path, monkeypatch) -> None:
    """A client with nothing in memory (a resumed run, a restarted node) restores its newest
    saved state; it refuses to start over when that is older than the server's last-round."""
    from flwr.app import Context, RecordDict

    from client.app import _restore_state
    from client.local import SavedRound, StateStore
    from common.runs.rundir import CLIENT_STATE_ENV, CLIENT_STATE_NODE_CONFIG
    from common.train.local_round import ClientState

    monkeypatch.delenv(CLIENT_STATE_ENV, raising=False)

    def context(node_config: dict) -> Context:
        return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})

    with pytest.raises(ValueError, match=r"client 0: the server accepted this client's update in round 2 .*"
                                         r"no state directory is set \(node config 'state-dir'"):
        _restore_state(_train_message("run-a", 2), context({}), 0, 3)
    node = {CLIENT_STATE_NODE_CONFIG: str(tmp_path)}
    with pytest.raises(ValueError, match="client-0 has none"):
        _restore_state(_train_message("run-a", 2), context(node), 0, 3)
    state, store = _restore_state(_train_message("run-a", 0), context(node), 0, 1)
    assert state == ClientState() and store.directory == tmp_path / "run-a" / "client-0"

    saved = ClientState(head={"w": torch.ones(2, 3)}, dp_history=[(1.5, 0.25, 8)], noise_multiplier=1.5)
    StateStore.for_client(tmp_path, "run-a", 0).save(SavedRound(2, saved, ["d"]))
    state, _ = _restore_state(_train_message("run-a", 2), context(node), 0, 3)
    assert state.dp_history == saved.dp_history and torch.equal(state.head["w"], saved.head["w"])
    monkeypatch.setenv(CLIENT_STATE_ENV, str(tmp_path))  # simulation: the root comes from the environment
    assert _restore_state(_train_message("run-a", 2), context({}), 0, 3)[0].noise_multiplier == 1.5
