"""Errors that come before the wait: bad data and impossible splits fail in seconds without a run
directory; the commands that read a run refuse what is not a finished run, naming why; the report
of a damaged run exits non-zero and never says "training did not start" about a run that trained."""

from __future__ import annotations

import json

import pytest

from common.config import load_config
from common.config.loader import dump_toml
from workflow.cli import main

TINY = ["--set", "data.image_size=32", "--set", "model.width=8", "--set", "model.blocks=1,1"]


def _run(tmp_path, *overrides: str) -> list[str]:
    return ["--no-progress", "run", "--out", str(tmp_path / "runs"), *TINY, *[a for o in overrides for a in ("--set", o)]]


@pytest.mark.parametrize("case", ["missing path", "undecodable image", "too few identities"])
def test_data_and_split_problems_fail_before_any_run_directory(case: str, tmp_path, capsys) -> None:
    if case == "missing path":
        overrides, expected = ("data.source=imagefolder", f"data.path={tmp_path / 'nope'}"), str(tmp_path / "nope")
    elif case == "undecodable image":
        for person in ("p1", "p2"):
            (tmp_path / "faces" / person).mkdir(parents=True)
            (tmp_path / "faces" / person / "a.png").write_text("not an image")
        overrides, expected = ("data.source=imagefolder", f"data.path={tmp_path / 'faces'}"), "cannot decode image"
    else:
        overrides, expected = ("data.identities=6", "split.num_clients=4"), "too few for 4 clients"
    assert main(_run(tmp_path, *overrides)) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_mote_that_cannot_fit_its_kdes_fails_before_training(tmp_path, capsys) -> None:
    overrides = ("data.identities=24", "data.images_per_identity=2", "split.num_clients=2", "mote.references=1",
                 "mote.kde_population=members", "pretrain.identities=0")
    assert main(_run(tmp_path, *overrides)) == 2
    err = capsys.readouterr().err
    assert "mote.kde_population" in err and "KDE needs at least" in err
    assert not (tmp_path / "runs").exists()


def _run_dir(tmp_path, status: dict | None) -> str:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(load_config(None, [])))
    if status is not None:
        (run / "status.json").write_text(json.dumps(status))
    return str(run)


@pytest.mark.parametrize("command", ["audit", "evaluate", "report"])
def test_commands_that_read_a_run_refuse_a_directory_that_is_not_one(command: str, tmp_path, capsys) -> None:
    assert main([command, str(tmp_path)]) == 2
    assert f"{tmp_path}: not a facefl run directory (no config.toml)" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("command", ["audit", "evaluate"])
@pytest.mark.parametrize("state", ["failed", "running"])
def test_audit_and_evaluate_say_the_run_did_not_finish_and_why(command: str, state: str, tmp_path, capsys) -> None:
    run = _run_dir(tmp_path, {"status": state, "error": "RunFailed: round 2: 0 usable replies"})
    assert main([command, run]) == 2
    err = capsys.readouterr().err
    if state == "failed":
        assert "the run failed: RunFailed: round 2: 0 usable replies" in err and "--resume" in err
    else:
        assert "has not finished" in err


def test_report_of_a_failed_run_is_written_and_exits_non_zero(tmp_path, capsys) -> None:
    run = _run_dir(tmp_path, {"status": "failed", "error": "ValueError: boom"})
    assert main(["report", run]) == 1
    assert "the run failed: ValueError: boom" in capsys.readouterr().err
    assert (tmp_path / "run" / "report.html").is_file()


def test_report_of_a_damaged_run_names_the_damage_and_exits_non_zero(tmp_path, capsys) -> None:
    """status.json records finished rounds, but metrics.jsonl and privacy.json are gone."""
    run = _run_dir(tmp_path, {"status": "finished", "rounds_completed": 3, "metrics_lines": 7})
    (tmp_path / "run" / "manifest.json").write_text("{}")
    assert main(["report", run]) == 1
    err = capsys.readouterr().err
    assert "metrics.jsonl: missing although status.json records 3 completed rounds" in err
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "training did not start" not in page and "no round finished" not in page
    assert page.count("the run directory is damaged") >= 2


def test_the_preflight_reads_the_public_labels_without_rendering_the_population() -> None:
    import numpy as np

    from common.train.pretraining import public_labels, public_population

    cfg = load_config(None, ["data.image_size=32", "pretrain.identities=12", "pretrain.images_per_identity=3"])
    public = public_population(cfg)
    identity, gender = public_labels(cfg)
    np.testing.assert_array_equal(identity, public.identity)
    np.testing.assert_array_equal(gender, public.gender)
