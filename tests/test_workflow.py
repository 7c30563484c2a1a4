"""The researcher's workflow end to end: ``facefl demo --quick``, a ``--quick`` sweep, report.html
and the RESULTS.md script, on real simulations (Flower, Opacus, TenSEAL), checked by content.

* The demo (DP + HE + MOTE + every attack family) writes one self-contained report whose every
  section is present, whose embedded images are PNGs, and whose numbers are the audit's.
* A report of a run that lacks inputs says "Not run" instead of crashing, names an unreadable
  file, and escapes text taken from the run.
* A 2-value x 1-seed sweep over ``dp.target_epsilon=4,inf`` gives two finished rows (inf = DP off,
  epsilon inf) with finite AUCs equal to the runs' audits; a re-run trains nothing; an invalid
  value fails alone while an interrupted run resumes at its audit, without retraining.
* ``scripts/make_results.py`` turns that sweep into RESULTS.md with a verdict per finding.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import descendants, terminate, wait_gone

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]

ALL_FAMILIES = {"loss", "shadow", "lira-online", "lira-offline", "rmia", "mint-embedding", "mint-vanilla", "mint-cnn",
                "mote-score", "mote-lira", "fd-mia-score", "fd-mia-lira"}
SWEEP_CONFIG = '[train]\ntask = "attribute"\n\n[mote]\nenabled = false\n'


@contextlib.contextmanager
def _stops_its_processes() -> Iterator[None]:
    """The simulations start Ray (GCS, raylet, actors) under this process: every one of them must
    be gone once the command returns; any left over is stopped by PID and fails the test."""
    before = descendants(os.getpid())
    try:
        yield
    finally:
        left = wait_gone(descendants(os.getpid()) - before, timeout=30)
        stuck = terminate(left) if left else set()
    assert not left, f"processes outlived the command: {sorted(left)} (still alive after SIGKILL: {sorted(stuck)})"


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, str]:
    """(demo directory, run directory, log) of one `facefl demo --quick` whose stdout and stderr
    go to a file, as in `facefl demo > demo.log 2>&1` (so progress bars are off by themselves)."""
    out = tmp_path_factory.mktemp("demo")
    log = out / "demo.log"
    with _stops_its_processes(), open(log, "wb") as fh:
        done = subprocess.run([sys.executable, "-m", "workflow.cli", "demo", "--quick", "--out", str(out)],
                              stdout=fh, stderr=subprocess.STDOUT, timeout=900, check=False)
    printed = log.read_text(encoding="utf-8")
    assert done.returncode == 0, printed[-3000:]
    (directory,) = out.glob("demo-*")
    (run,) = directory.glob("run-*")
    return directory, run, printed


@pytest.mark.timeout(600)
def test_a_demo_log_has_one_line_per_stage_and_no_terminal_codes(demo) -> None:
    _, _, printed = demo
    assert "\x1b" not in printed and "\r" not in printed  # no ANSI colours, no carriage-return bars
    for stage in ("federated training (2 rounds, 2 clients)", "membership audit", "report"):
        assert f"[facefl] {stage} ..." in printed and f"[facefl] {stage}: done in" in printed
    assert "DEPRECATED" not in printed and "fraction_evaluate" not in printed and "RAY_ACCEL" not in printed
    assert "95% bootstrap interval" in printed and "Headline: " in printed and "smoke test" in printed


@pytest.mark.timeout(600)
def test_demo_report_is_complete_self_contained_and_matches_the_audit(demo) -> None:
    from PIL import Image

    from common.report.html import SECTIONS, with_ci

    directory, run, printed = demo
    page = (directory / "report.html").read_text(encoding="utf-8")
    assert page == (run / "report.html").read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page and "<link" not in page
    images = _pngs(page)
    assert len(images) == 4  # utility over rounds, the audit's ROCs (global model, MOTE galleries), MOTE vs templates
    for png in images:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert (run / "utility.png").read_bytes() in images

    audit = json.loads((run / "audit" / "report.json").read_text())
    assert {a["name"] for a in audit["attacks"]} >= ALL_FAMILIES  # train.task = both: every family applies
    for a in audit["attacks"]:
        assert with_ci(a["auc"], a["ci95"]["auc"]) in page, (a["name"], a["target"])
        # the quick demo's ~100 nonmembers resolve no TPR: the page says so instead of printing a number
        assert a["tpr_at_fpr"]["0.001"] is None and f"not resolvable at n = {a['n_nonmembers']}" in page
    privacy = json.loads((run / "privacy.json").read_text())
    assert 0 < privacy["max_epsilon"] <= 8.0 + 1e-6 and f"{privacy['max_epsilon']:.3f}" in page
    assert "Encrypted aggregation (CKKS) was ON" in page and "encrypted sum" in page
    evaluation = json.loads((run / "mote" / "evaluation.json").read_text())
    assert set(evaluation["gender_inference"]) == {"templates", "MOTE b=0.00", "MOTE b=0.50"}
    assert "Not run" not in page  # the demo produces every input of the report

    # DP and HE were on: the server stored only ciphertexts; the key holder decrypted the final model.
    assert (directory / "keys" / "secret-context.bin").is_file()
    assert sorted(p.name for p in (run / "models").glob("round-*")) == ["round-001.he.safetensors",
                                                                       "round-002.he.safetensors"]
    assert (run / "models" / "final.safetensors").is_file() and not (run / "models" / "clients").exists()
    assert f"report: {directory / 'report.html'}" in printed and "MIA fd-mia-score" in printed

    # The federation's lift: re-scorable from its raw pair scores, its final AUC the decrypted model's.
    from sklearn.metrics import roc_auc_score

    from common.runs.io import load_npz
    from workflow.lift import lift_line

    lift = json.loads((run / "evaluation" / "lift.json").read_text())
    raw = load_npz(run / "evaluation" / "lift.npz")
    for name in ("initial", "final", "central"):
        assert roc_auc_score(raw["genuine"], raw[f"score_{name}"]) == pytest.approx(lift["verification_auc"][name],
                                                                                    abs=1e-12)
    decrypted = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lift["verification_auc"]["final"] == pytest.approx(
        [e for e in decrypted if e.get("event") == "decrypted"][-1]["verification_auc"], abs=1e-12)
    assert lift_line(lift) in printed and "What the federation added" in page


@pytest.mark.timeout(600)
def test_report_of_an_incomplete_run_says_not_run_and_escapes_text(demo, tmp_path) -> None:
    from common.report.html import SECTIONS
    from workflow.cli import main

    _, run, _ = demo
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.toml", "manifest.json", "metrics.jsonl"):
        shutil.copy(run / name, partial / name)
    (partial / "status.json").write_text(json.dumps({"status": "failed", "error": "<script>alert(1)</script>"}))
    (partial / "audit").mkdir()
    (partial / "audit" / "report.json").write_text("{not json")
    assert main(["report", str(partial)]) == 1  # a failed run's report is written, and the exit code says it failed
    page = (partial / "report.html").read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"{partial / 'audit' / 'report.json'}: unreadable" in page
    assert page.count("Not run:") >= 5  # ledger, attacks, per-group leakage, MOTE, update-level


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, list[str]]:
    from workflow.cli import main

    root = tmp_path_factory.mktemp("sweep")
    config = root / "attribute.toml"
    config.write_text(SWEEP_CONFIG)
    argv = ["--no-progress", "sweep", str(config), "--grid", "dp.target_epsilon=4,inf", "--seeds", "1", "--quick",
            "--references", "4", "--out", str(root / "out")]
    with _stops_its_processes():
        assert main(argv) == 0
    return root / "out", argv


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.timeout(600)
def test_sweep_table_has_a_row_per_run_with_its_audits_numbers(sweep) -> None:
    out, _ = sweep
    rows = _csv(out / "sweep.csv")
    assert [r["dp.target_epsilon"] for r in rows] == ["4", "inf"] and [r["seed"] for r in rows] == ["0", "0"]
    assert all(r["state"] == "finished" and r["status"] == "finished" and r["error"] == "" for r in rows)
    capped, off = rows
    assert 0 < float(capped["epsilon"]) <= 4 + 1e-6 and off["epsilon"] == "inf"
    assert 'mode = "off"' in (Path(off["run_dir"]) / "config.toml").read_text()  # inf = DP off, not a failure
    for r in rows:
        audit = json.loads((Path(r["run_dir"]) / "audit" / "report.json").read_text())
        aucs = {k: float(v) for k, v in r.items() if k.startswith("auc: ")}
        assert len(aucs) == len(audit["attacks"]) >= 7
        for a in audit["attacks"]:
            assert aucs[f"auc: {a['name']} @ {a['target']}"] == a["auc"]
            tpr = a["tpr_at_fpr"]["0.001"]  # None (an empty cell) where the nonmembers cannot resolve 0.1%
            assert r[f"tpr@0.001: {a['name']} @ {a['target']}"] == ("" if tpr is None else repr(tpr))
        assert math.isfinite(float(r["empirical_epsilon"])) and float(r["empirical_epsilon"]) >= 0
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in aucs.values())
        assert math.isfinite(float(r["attribute_accuracy"])) and math.isfinite(float(r["attribute_deo_sum"]))
        assert (Path(r["run_dir"]) / "report.html").is_file()
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"utility_vs_epsilon.png", "fairness_vs_epsilon.png", "empirical_vs_accounted_epsilon.png",
            "attack-loss-global-model-final.png",
            "attack-mint-vanilla-global-model-final-white-box.png"} <= plots
    assert all((out / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in plots)
    index = json.loads((out / "sweep.json").read_text())
    assert index["commands"][0].startswith("facefl sweep ") and "--grid dp.target_epsilon=4,inf" in index["commands"][0]
    assert set(index["runs"]) == {"dp.target_epsilon=4 seed=0", "dp.target_epsilon=inf seed=0"}


@pytest.mark.timeout(600)
def test_rerunning_a_sweep_trains_nothing(sweep) -> None:
    from workflow.cli import main

    out, argv = sweep
    before = sorted(p.name for p in (out / "runs").iterdir())
    start = time.perf_counter()
    assert main(argv) == 0
    assert time.perf_counter() - start < 60  # no simulation, no audit: only the table and plots again
    assert sorted(p.name for p in (out / "runs").iterdir()) == before
    index = json.loads((out / "sweep.json").read_text())
    assert index["commands"][-1] == index["commands"][0] and len(index["commands"]) >= 2


@pytest.mark.timeout(600)
def test_failed_combination_is_recorded_and_an_interrupted_run_resumes_at_its_audit(sweep) -> None:
    from workflow.cli import main

    out, argv = sweep
    index = json.loads((out / "sweep.json").read_text())
    off = index["runs"]["dp.target_epsilon=inf seed=0"]
    # An interruption during the audit: the entry is still "running" and its report is missing.
    off["state"] = "running"
    (Path(off["run_dir"]) / "audit" / "report.json").unlink()
    (out / "sweep.json").write_text(json.dumps(index))
    before = sorted(p.name for p in (out / "runs").iterdir())
    grid = argv.index("--grid") + 1
    assert main(argv[:grid] + ["dp.target_epsilon=-1,4,inf"] + argv[grid + 1:]) == 1  # one combination failed
    index = json.loads((out / "sweep.json").read_text())
    bad = index["runs"]["dp.target_epsilon=-1 seed=0"]
    assert bad["state"] == "failed" and "dp.target_epsilon" in bad["error"] and bad["run_dir"] is None
    resumed = index["runs"]["dp.target_epsilon=inf seed=0"]
    assert resumed["state"] == "finished" and resumed["run_dir"] == off["run_dir"]
    assert (Path(off["run_dir"]) / "audit" / "report.json").is_file()
    assert sorted(p.name for p in (out / "runs").iterdir()) == before  # nothing retrained
    rows = {r["dp.target_epsilon"]: r for r in _csv(out / "sweep.csv")}
    assert rows["-1"]["state"] == "failed" and "dp.target_epsilon" in rows["-1"]["error"]
    assert rows["inf"]["state"] == rows["4"]["state"] == "finished" and rows["inf"]["auc: loss @ global model (final)"]


@pytest.mark.timeout(600)
def test_results_script_checks_each_finding_on_the_sweep(sweep, tmp_path, monkeypatch) -> None:
    import importlib.util
    import sys

    out, _ = sweep
    script = Path(__file__).parents[1] / "scripts" / "make_results.py"
    spec = importlib.util.spec_from_file_location("make_results", script)
    make_results = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_results", make_results)  # its dataclasses look their module up
    spec.loader.exec_module(make_results)
    target = tmp_path / "RESULTS.md"
    assert make_results.main([str(out), "--out", str(target), "--assets", str(tmp_path / "results")]) == 0
    text = target.read_text(encoding="utf-8")
    bundle = tmp_path / "results" / out.name
    shown = sorted(["sweep.csv", *(p.name for p in (out / "plots").glob("*.png"))])
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*shown, "sweep.json", "runs"]) and len(shown) > 1
    assert all(f"(results/{out.name}/{name})" in text for name in shown)  # shown, relative to RESULTS.md
    # The bundle holds each run's result files and raw scores, no model: RESULTS.md comes back from it alone.
    assert list(bundle.glob("runs/*/audit/scores.npz")) and not list(bundle.glob("runs/*/models"))
    again = tmp_path / "AGAIN.md"
    assert make_results.main([str(bundle), "--out", str(again)]) == 0
    findings = re.compile(r"^## .*?(?=^## Sweeps)", flags=re.MULTILINE | re.DOTALL)
    assert findings.search(again.read_text(encoding="utf-8"))[0] == findings.search(text)[0]
    for title in ("FD-MIA beats single-model attacks on fair models", "FD-MIA on MOTE gallery pairs (outside the",
                  "DP-SGD lowers attack success as epsilon falls",
                  "MINT (white-box) beats black-box MIA", "MINT beats the embedding-only attack (the paper's terms)",
                  "MOTE's gender inference is near 50% while templates leak",
                  "MOTE's fairness is at least the templates'"):
        assert title in text
    verdicts = re.findall(r"^Verdict: \*\*(.+?)\*\*", text, flags=re.MULTILINE)
    assert len(verdicts) == 7
    # premise before verdict: the fairness gap of each pair, MINT's training size, the backbone's FNMR
    premises = re.findall(r"^Premise: (.+)$", text, flags=re.MULTILINE)
    assert any("DEO >= 0.2" in p for p in premises) and any("MINT trained on >= 5,000" in p for p in premises)
    assert any("FNMR <= 0.1" in p for p in premises)
    # The sweep has no MOTE, no fair twin and no MINT study: those findings are "not measured", never a
    # made-up verdict.
    assert verdicts[0] == verdicts[1] == verdicts[3] == verdicts[5] == verdicts[6] == "not measured"
    assert verdicts[2] != "not measured" and verdicts[4] != "not measured"
    audit = json.loads((Path(json.loads((out / "sweep.json").read_text())["runs"]["dp.target_epsilon=4 seed=0"]
                             ["run_dir"]) / "audit" / "report.json").read_text())
    loss = next(a for a in audit["attacks"] if a["name"] == "loss" and a["target"] == "global model (final)")
    assert f"{loss['auc']:.3f} [{loss['ci95']['auc'][0]:.3f}, {loss['ci95']['auc'][1]:.3f}]" in text
    assert "facefl sweep " in text and "--quick" in text and "not evidence" in text


@pytest.mark.timeout(60)
def test_grid_parsing_and_infinite_epsilon() -> None:
    from common.config import ConfigError, load_config
    from workflow.sweep import entry_id, parse_grid, run_overrides

    grid = parse_grid(["dp.target_epsilon=1,inf", "model.blocks=1,1;2,2"])
    assert grid == {"dp.target_epsilon": ("1", "inf"), "model.blocks": ("1,1", "2,2")}
    for bad in ("dp.epsilon=1,2", "seed=1,2", "dp.target_epsilon", "dp.target_epsilon=1,1"):
        with pytest.raises(ConfigError):
            parse_grid([bad])
    assert entry_id({"b": "2", "a": "1"}, 3) == "a=1 b=2 seed=3"  # key order does not matter
    # inf without a noise multiplier: DP off (the config refuses inf with DP on and no noise) ...
    off = load_config(None, run_overrides({"dp.target_epsilon": "inf"}, 0, 0.0))
    assert off.dp.mode == "off"
    # ... and with one, DP-SGD at that noise.
    noisy = load_config(None, run_overrides({"dp.target_epsilon": "inf", "dp.noise_multiplier": "1.0"}, 0, 0.0))
    assert noisy.dp.mode == "sample" and noisy.dp.noise_multiplier == 1.0


@pytest.mark.timeout(60)
def test_fair_twins_pair_each_unmitigated_run_with_the_same_seed() -> None:
    from workflow.sweep import entry_id, fair_twins

    def entry(method: str, eps: str, seed: int, state: str = "finished") -> tuple[str, dict]:
        combo = {"fairness.method": method, "dp.target_epsilon": eps}
        return entry_id(combo, seed), {"combination": combo, "seed": seed, "state": state}

    entries = dict([entry("none", "4", 0), entry("reweight", "4", 0), entry("none", "4", 1),
                    entry("reweight", "4", 1, "failed"), entry("none", "8", 0), entry("fair_mixup", "8", 0),
                    entry("reweight", "8", 0)])
    twins = fair_twins(entries, ("none", "reweight", "fair_mixup"))
    assert twins == {entry_id({"fairness.method": "none", "dp.target_epsilon": "4"}, 0):
                     entry_id({"fairness.method": "reweight", "dp.target_epsilon": "4"}, 0),
                     entry_id({"fairness.method": "none", "dp.target_epsilon": "8"}, 0):
                     entry_id({"fairness.method": "reweight", "dp.target_epsilon": "8"}, 0)}
