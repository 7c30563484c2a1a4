"""Plain-text tables for results printed by the CLI."""

from __future__ import annotations

from collections.abc import Sequence


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
    enrollment, epsilons named by their unit."""
    return format_table(("round", "clients", "failed", "train loss", "verif. AUC", "attr. acc", "DEO (|dTPR|+|dFPR|)",
                         f"max eps ({per_unit(dp_unit)})", "s"), _round_rows(records))


def per_unit(dp_unit: str) -> str:
    """What one epsilon of DP-SGD protects, as printed next to it: "per image" or "per person"."""
    return "per person" if dp_unit == "identity" else "per image"


def _round_rows(records: list[dict]) -> list[tuple]:
    def fmt(r: dict, key: str) -> str:
        return f"{r[key]:.4f}" if key in r else ("enc." if r.get("encrypted") else "-")

    rows = []
    for r in records:
        if r.get("event") == "pretrain":
            rows.append(("public", "-", "-", "-", f"{r['verification_auc']:.4f}", "-", "-", "0 (public)", f"{r['seconds']:.0f}"))
        if r.get("event") == "decrypted":
            rows.append(("final (decrypted)", "-", "-", "-", fmt(r, "verification_auc"), fmt(r, "attribute_accuracy"),
                         fmt(r, "attribute_deo_sum"), "-", "-"))
        if r.get("event") == "enroll":
            eps = f"{r['mote_max_epsilon']:.3f} (per record)" if "mote_max_epsilon" in r else "no MOTE DP"
            rows.append(("MOTE enrollment", r["clients"], len(r["failures"]), "-", "-", "-", "-", eps,
                         f"{r['seconds']:.0f}"))
        if r.get("event") != "round":
            continue
        rows.append((r["round"], len(r["clients"]), len(r["failures"]), f"{r['train_loss']:.4f}",
                     fmt(r, "verification_auc"), fmt(r, "attribute_accuracy"), fmt(r, "attribute_deo_sum"),
                     f"{r['max_epsilon']:.3f}", f"{r['seconds']:.0f}"))
    return rows
