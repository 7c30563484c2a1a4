"""The privacy ledger of real simulated DP runs, checked against Google's dp_accounting.

Two real Flower simulations (Ray, Opacus DP-SGD; tests/sim_runs.py): 2 clients x 3 rounds with
every client in every round, and 3 clients of which half are sampled per round. privacy.json
must charge each client exactly the DP-SGD steps it took (the ones listed for it in
metrics.jsonl), and its epsilon must equal an independent RDP computation of the same
(q, sigma, steps, delta), with q derived here from the client's sample count, not read back.
"""

from __future__ import annotations

import itertools
import logging
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from sim_runs import (
    LEDGER_FULL,
    LEDGER_PARTIAL,
    read_privacy,
    round_events,
    simulated_run,
)

# Opacus' default RDP orders (opacus.accountants.rdp.RDPAccountant.DEFAULT_ALPHAS).
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
BATCH = 8  # train.batch_size in sim_runs.TINY
TARGET_EPSILON = 8.0  # dp.target_epsilon default
DELTA = 1e-5

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


@pytest.fixture(scope="module", autouse=True)
def _quiet_absl() -> None:
    # dp_accounting logs one warning per fractional order it cannot evaluate at small sigma.
    logging.getLogger("absl").setLevel(logging.ERROR)


def rdp_epsilon(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    acc = RdpAccountant(ORDERS)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def pld_epsilon(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    acc = PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def poisson_q(num_examples: int) -> float:
    """Opacus' DPDataLoader rate: one over the number of batches per epoch."""
    return 1.0 / math.ceil(num_examples / BATCH)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return simulated_run(tmp_path_factory, LEDGER_FULL)[0]


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    return simulated_run(tmp_path_factory, LEDGER_PARTIAL)[0]


def participation(run) -> dict[int, list[tuple[int, dict]]]:
    """partition -> [(round, the client's metrics in that round)] from metrics.jsonl."""
    out: dict[int, list[tuple[int, dict]]] = {}
    for event in round_events(run):
        assert event["failures"] == [], event["failures"]
        for client in event["clients"]:
            out.setdefault(int(client["partition"]), []).append((int(event["round"]), client))
    return out


def check_ledger_against_metrics(run) -> dict[int, dict]:
    """Every client's privacy.json entry vs its own rounds in metrics.jsonl and dp_accounting."""
    ledger = read_privacy(run)
    seen = participation(run)
    assert ledger["accountant"] == "rdp" and ledger["delta"] == DELTA
    assert sorted(int(k) for k in ledger["clients"]) == sorted(seen), "only clients that trained are charged"
    for pid, rounds in seen.items():
        entry = ledger["clients"][str(pid)]
        num_examples = {c["num-examples"] for _, c in rounds}
        assert len(num_examples) == 1
        q = poisson_q(num_examples.pop())
        steps = sum(int(c["steps"]) for _, c in rounds)
        sigma = entry["noise_multiplier"]
        assert entry["rounds"] == [r for r, _ in rounds]
        assert entry["steps"] == steps > 0
        assert entry["sample_rate"] == pytest.approx(q, rel=1e-12)
        assert all(s == sigma and hq == pytest.approx(q, rel=1e-12) for s, hq, _ in entry["history"])
        assert sum(n for _, _, n in entry["history"]) == steps
        reference = rdp_epsilon(q, sigma, steps)
        assert entry["epsilon_rdp"] == pytest.approx(reference, rel=1e-3)
        assert entry["epsilon"] == entry["epsilon_rdp"]
        # The client's own report in its last round agrees with the server's recomputation.
        last = rounds[-1][1]
        assert last["total-steps"] == steps
        assert last["epsilon"] == pytest.approx(entry["epsilon"], rel=1e-9)
    assert ledger["max_epsilon"] == max(c["epsilon"] for c in ledger["clients"].values())
    return {int(k): v for k, v in ledger["clients"].items()}


def test_full_participation_epsilon_matches_dp_accounting(full_run) -> None:
    clients = check_ledger_against_metrics(full_run)
    assert sorted(clients) == [0, 1]
    for entry in clients.values():
        assert entry["rounds"] == [1, 2, 3]
        # Noise was calibrated at round 1 for all 3 rounds: the whole run spends the target, not more
        # (Opacus' calibration stops within 0.01 below the target).
        assert TARGET_EPSILON - 0.05 < entry["epsilon"] <= TARGET_EPSILON
        assert rdp_epsilon(entry["sample_rate"], entry["noise_multiplier"], entry["steps"]) <= TARGET_EPSILON


@pytest.mark.parametrize("which", ["full_run", "partial_run"])
def test_epsilon_never_decreases_across_rounds(which: str, request) -> None:
    run = request.getfixturevalue(which)
    events = round_events(run)
    assert [e["round"] for e in events] == [1, 2, 3]
    max_eps = [e["max_epsilon"] for e in events]
    assert all(b >= a for a, b in itertools.pairwise(max_eps)), max_eps
    assert max_eps[0] > 0
    for pid, rounds in participation(run).items():
        eps = [c["epsilon"] for _, c in rounds]
        total = [c["total-steps"] for _, c in rounds]
        # Every round adds steps, so epsilon strictly grows: it composes, it never restarts.
        assert all(b > a for a, b in itertools.pairwise(eps)), (pid, eps)
        assert total == [sum(int(c["steps"]) for _, c in rounds[:i + 1]) for i in range(len(rounds))]
        # Each round's reported epsilon is the dp_accounting epsilon of the steps taken so far.
        for (_, c), steps in zip(rounds, total):
            assert c["epsilon"] == pytest.approx(
                rdp_epsilon(poisson_q(c["num-examples"]), c["noise-multiplier"], steps), rel=1e-3)
    for e in events:  # the round's max_epsilon covers clients that sat this round out, too
        assert e["max_epsilon"] >= max(c["epsilon"] for c in e["clients"])


def test_partial_participation_charges_only_steps_taken(partial_run) -> None:
    seen = participation(partial_run)
    counts = {pid: len(rounds) for pid, rounds in seen.items()}
    # The configuration must actually leave some client out of some round, or this proves nothing.
    assert min(counts.values()) < 3 and max(counts.values()) > min(counts.values()), counts
    assert all(len(e["clients"]) == 2 for e in round_events(partial_run))  # ceil(0.5 * 3) per round
    clients = check_ledger_against_metrics(partial_run)
    # Noise is calibrated at a client's first round for every round it could take part in: one that
    # trained in every round spends the target; one that sat rounds out spends clearly less.
    for entry in clients.values():
        planned = 3 * round(1 / entry["sample_rate"])  # rounds * local_epochs * batches per epoch
        assert entry["steps"] <= planned
        assert entry["epsilon"] <= TARGET_EPSILON
        if entry["steps"] == planned:
            assert entry["epsilon"] > TARGET_EPSILON - 0.05
        else:
            assert entry["epsilon"] < TARGET_EPSILON - 0.5


@pytest.mark.parametrize("which", ["full_run", "partial_run"])
def test_prv_epsilon_reported_and_not_above_rdp(which: str, request) -> None:
    """PRV (a numerical estimate of the exact privacy curve) is tighter than the RDP bound, and it
    agrees with dp_accounting's PLD accountant, an independent numerical method."""
    for pid, entry in read_privacy(request.getfixturevalue(which))["clients"].items():
        prv, rdp = entry["epsilon_prv"], entry["epsilon_rdp"]
        assert 0 < prv <= rdp, (pid, prv, rdp)
        pld = pld_epsilon(entry["sample_rate"], entry["noise_multiplier"], entry["steps"])
        assert prv == pytest.approx(pld, rel=0.02), (pid, prv, pld)
