"""scripts/make_results.py counts FD-MIA only on pairs that meet the paper's premise, within its
family and with the audit's paired intervals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from common.runs.records import AuditReport
from common.runs.results import RunResults


def _script(monkeypatch):
    path = Path(__file__).parents[1] / "scripts" / "make_results.py"
    spec = importlib.util.spec_from_file_location("make_results", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_results", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run_dir(root: Path, name: str, deo: float) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.toml").write_text("")
    (path / "metrics.jsonl").write_text(json.dumps({"event": "round", "round": 1, "verification_auc": 0.8,
                                                    "attribute_deo_sum": deo}) + "\n")
    return path


def _comparison(difference: float, lo: float, hi: float) -> dict:
    return {"a": "fd-mia-score @ biased + fair pair", "b": "shadow @ fair global model (final)",
            "value_a": 0.6 + difference, "value_b": 0.6, "difference": difference, "ci95": [lo, hi]}


def test_fd_mia_counts_only_pairs_that_meet_the_premise(tmp_path, monkeypatch) -> None:
    mr = _script(monkeypatch)
    runs = []
    for name, biased, fair, comparison in (("met", 0.30, 0.06, _comparison(0.05, 0.01, 0.09)),
                                           ("not-fairer", 0.30, 0.20, _comparison(-0.04, -0.08, 0.0)),
                                           ("not-biased", 0.10, 0.01, _comparison(-0.02, -0.05, 0.01))):
        biased_dir, fair_dir = _run_dir(tmp_path, name, biased), _run_dir(tmp_path, name + "-fair", fair)
        results = RunResults.load(biased_dir)
        results.audit = AuditReport(str(biased_dir), str(fair_dir), "attribute", {}, {}, 4, 0, {}, (0.01,), [],
                                    comparisons=[comparison])
        runs.append(mr.Run(tmp_path, name, {}, 0, results))
    finding = mr.fd_mia(runs)
    assert finding.verdict == "reproduced" and "in 1 of 1 paired comparisons" in finding.headline
    assert "met by 1 of 3 pairs" in finding.premise
    text = "\n".join(finding.body)
    assert "+0.050 [+0.010, +0.090]" in text and "-0.040" not in text  # the unmet pairs are listed, not counted
    assert text.count("| no |") == 2
