"""Plain-text tables for results printed by the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from common.evaluation.global_model import MEMBERS_PREFIX as MEMBERS


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def round_table(records: list[dict], dp_unit: str) -> str:
    """The table ``facefl run`` and a ServerApp under ``flwr run`` print at the end: one row per
    metrics.jsonl event of public pretraining, a round, the key holder's decryption and the MOTE
    enrollment, epsilons named by their unit; with two more columns for the members' own
    evaluation where they made one (``data.layout = per-member``, server/federated_evaluation.py)."""
    members = any(k.startswith(MEMBERS) for r in records for k in r)
    header = ("round", "clients", "failed", "train loss", "verif. AUC", "attr. acc", "DEO (|dTPR|+|dFPR|)",
              *(("members' verif. AUC", "members' attr. acc") if members else ()),
              f"max eps ({per_unit(dp_unit)})", "s")
    return format_table(header, _round_rows(records, members))


def per_unit(dp_unit: str) -> str:
    """What one epsilon of DP-SGD protects, as printed next to it: "per image" or "per person"."""
    return "per person" if dp_unit == "identity" else "per image"


def _fmt(r: dict, key: str) -> str:
    return f"{r[key]:.4f}" if key in r else ("enc." if r.get("encrypted") else "-")


def _round_rows(records: list[dict], members: bool) -> list[tuple]:
    def row(*cells: object, eps: str, seconds: str) -> tuple:
        """The cells up to DEO, then the members' columns of ``r`` (when shown), epsilon, seconds."""
        own = tuple(_fmt(r, MEMBERS + k) for k in ("verification_auc", "attribute_accuracy")) if members else ()
        return (*cells, *own, eps, seconds)

    rows = []
    for r in records:
        if r.get("event") == "pretrain":
            rows.append(row("public", "-", "-", "-", _fmt(r, "verification_auc"), "-", "-", eps="0 (public)",
                            seconds=f"{r['seconds']:.0f}"))
        if r.get("event") == "decrypted":
            rows.append(row("final (decrypted)", "-", "-", "-", _fmt(r, "verification_auc"),
                            _fmt(r, "attribute_accuracy"), _fmt(r, "attribute_deo_sum"), eps="-", seconds="-"))
        if r.get("event") == "enroll":
            eps = f"{r['mote_max_epsilon']:.3f} (per record)" if "mote_max_epsilon" in r else "no MOTE DP"
            rows.append(row("MOTE enrollment", r["clients"], len(r["failures"]), "-", "-", "-", "-", eps=eps,
                            seconds=f"{r['seconds']:.0f}"))
        if r.get("event") != "round":
            continue
        rows.append(row(r["round"], len(r["clients"]), len(r["failures"]), f"{r['train_loss']:.4f}",
                        _fmt(r, "verification_auc"), _fmt(r, "attribute_accuracy"), _fmt(r, "attribute_deo_sum"),
                        eps=f"{r['max_epsilon']:.3f}", seconds=f"{r['seconds']:.0f}"))
    return rows


def self_audit_table(self_audit: dict) -> str:
    """The members' self-audit (``audit/self-audit.json``): per member and attack, the AUC with its
    interval and sample counts, the empirical epsilon lower bound and the accounted epsilon."""
    rows = []
    for partition, result in self_audit["members"].items():
        accounted = result.get("accounted_epsilon")
        eps = "no DP" if accounted is None else f"{accounted:.3f}"
        for name, why in result.get("skipped", {}).items():
            rows.append((partition, name, f"skipped: {why}", "-", eps))
        for name, a in result["attacks"].items():
            lo, hi = a["ci95"]["auc"] if a.get("ci95") else (float("nan"), float("nan"))
            rows.append((partition, name, f"{a['auc']:.3f} [{lo:.3f}, {hi:.3f}] ({a['n_members']} vs "
                         f"{a['n_nonmembers']})", f"{a['empirical_epsilon']:.2f}", eps))
    return format_table(("member", "self-audit attack", "AUC [95% CI] (members vs nonmembers)",
                         "empirical eps >= (per image, 95%)", "accounted eps (per image)"), rows)
