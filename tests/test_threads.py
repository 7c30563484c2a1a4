"""facefl's threading defaults (workflow.threads): OpenMP's passive wait unless the user chose,
FACEFL_THREADS as the thread count, a bad value named; bench/threads.py measures why."""

from __future__ import annotations

import pytest

from workflow import threads


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.THREADS_ENV):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_passive_wait_by_default_and_the_users_choice_kept(clean_env: pytest.MonkeyPatch) -> None:
    import os

    threads.configure()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "OMP_NUM_THREADS" not in os.environ
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    clean_env.setenv(threads.THREADS_ENV, "3")
    threads.configure()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3"


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_a_bad_thread_count_is_named(clean_env: pytest.MonkeyPatch, bad: str) -> None:
    clean_env.setenv(threads.THREADS_ENV, bad)
    with pytest.raises(ValueError, match="FACEFL_THREADS"):
        threads.configure()
