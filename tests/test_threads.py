"""Threads shared between facefl processes (common.train.threads): a registered process alone
keeps every core, two registered processes split them, a count the user set wins, a bad
FACEFL_THREADS is named, and unregistered processes (tests, Ray workers) are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from common.train import threads


@pytest.fixture()
def registry(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(threads, "registry", lambda: tmp_path / "processes")
    monkeypatch.setattr(threads, "_registered", None)
    monkeypatch.setattr(threads, "_assigned", None)
    for key in ("OMP_NUM_THREADS", threads.THREADS_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    return tmp_path / "processes"


def test_unregistered_processes_are_left_alone(registry) -> None:
    assert threads.wanted_threads() is None


def test_registered_processes_split_the_cores_and_dead_ones_are_forgotten(registry) -> None:
    threads.register()
    assert threads.wanted_threads() == 4
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (registry / str(other.pid)).touch()
        assert threads.live_processes() == 2 and threads.wanted_threads() == 2
    finally:
        other.kill()
        other.wait(timeout=10)
    time.sleep(0.1)
    assert threads.wanted_threads() == 4 and not (registry / str(other.pid)).exists()


def test_a_count_the_user_set_wins(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    threads.register()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.wanted_threads() is None
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert threads.wanted_threads() == 3


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_a_bad_thread_count_is_named(registry, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(threads.THREADS_ENV, bad)
    with pytest.raises(ValueError, match="FACEFL_THREADS"):
        threads.wanted_threads()


def test_balance_follows_the_load_but_a_count_the_program_set_wins(registry) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        threads.register()
        threads.balance()
        assert torch.get_num_threads() == 4  # alone: every (pretended) core
        torch.set_num_threads(1)  # e.g. a test that replays single-threaded training
        threads.balance()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_public_pretraining_gives_the_same_model_whatever_the_thread_count(registry, monkeypatch) -> None:
    """The run's initial model must not depend on how many threads torch had or the load gives a
    facefl process (``balance``, at every epoch): public pretraining runs single-threaded and
    restores the count afterwards."""
    import torch

    from common.config import load_config
    from common.nn.build import build_model, model_spec
    from common.train.pretraining import pretrain

    cfg = load_config(None, ["data.image_size=32", "model.width=8", "model.blocks=1,1", "model.embedding_dim=16",
                             "pretrain.identities=6", "pretrain.images_per_identity=4", "pretrain.epochs=2",
                             "train.batch_size=8", "train.task=both"])
    models = []
    before = torch.get_num_threads()
    try:
        threads.register()
        for count in (1, 2):
            monkeypatch.setenv(threads.THREADS_ENV, str(count))  # what balance gives this process
            torch.set_num_threads(count)
            model = build_model(model_spec(cfg), cfg.seed)
            pretrain(model, cfg)
            assert torch.get_num_threads() == count
            models.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
