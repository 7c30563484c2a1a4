"""report.html's audit section: one ROC figure per target family the audit attacked, each captioned
with the family's title, and an explicit line where an attacked family's figure is missing."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from attacks.metrics import RocCurve, roc_figures
from common.report.html import render_report
from common.runs.records import FAMILY_TITLES, AttackEntry, AuditReport, TargetKind
from common.runs.results import RunResults
from common.runs.rundir import RunDir


def _entry(kind: TargetKind, partition: int | None = None) -> AttackEntry:
    return AttackEntry("loss", f"{kind} model", kind, 0.6, 0.55, 0.56, {"0.01": 0.02}, 50, 50, None, 0, 0, {},
                       partition=partition)


def test_report_shows_one_roc_figure_per_attacked_family(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    audit = AuditReport(str(tmp_path), None, "attribute", {"mode": "off"}, {"members": 50, "nonmembers": 50}, 0, 0,
                        {}, (0.01,), [_entry(TargetKind.GLOBAL), _entry(TargetKind.PAIR),
                                      _entry(TargetKind.CLIENT, partition=0)])
    member = np.arange(100) < 50
    roc_figures([RocCurve("global", "loss", member + np.random.default_rng(0).normal(size=100), member)],
                run.audit_roc)
    page = render_report(RunResults(tmp_path, audit=audit))

    def caption(family: str) -> str:
        return html.escape(f"{FAMILY_TITLES[family]}: ROC of every attack (log-log)", quote=True)

    assert f'<img alt="{caption("global")}" src="data:image/png;base64,' in page
    assert f"Not run: {caption('clients')}: roc-clients.png was not written" in page  # attacked, figure missing
    assert caption("mote") not in page  # no MOTE attack, so no MOTE figure either way
    assert "roc.png" not in page


def test_every_target_kind_belongs_to_one_family() -> None:
    assert {kind: kind.family for kind in TargetKind} == {
        TargetKind.GLOBAL: "global", TargetKind.WHITE_BOX: "global", TargetKind.FAIR: "global",
        TargetKind.PAIR: "global", TargetKind.CLIENT: "clients", TargetKind.MOTE_GALLERY: "mote",
        TargetKind.MOTE_PAIR: "mote"}
    assert list(FAMILY_TITLES) == ["global", "clients", "mote"]
