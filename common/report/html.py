"""``report.html``: one self-contained page per run, for a reader who has only that file.

Everything comes from the run directory (``common.runs.results``): the configuration, the DP
ledger, per-round metrics, fairness, every audited attack with its ROC and bootstrap intervals,
per-group leakage, MOTE vs templates and what the server could see. Plots are embedded as base64
PNG data URIs and the CSS is inline, so the page can be mailed or archived on its own. Each
section is always present: an input that a run does not have (not audited, no MOTE, DP off)
gives an explicit line saying so. All text from the run is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.evaluation.global_model import MEMBERS_PREFIX
from common.report.tables import self_audit_table
from common.runs import layout
from common.runs.io import atomic_path, atomic_write_text
from common.runs.records import (
    BALANCED_GALLERY,
    FAMILY_TITLES,
    MIN_FALSE_POSITIVES,
    MIN_GROUP_PER_CLASS,
    MISSING,
    AttackEntry,
    MoteEvaluation,
    RunStatus,
    resolvable,
    tpr_label,
    tpr_text,
)
from common.runs.results import RunResults
from common.runs.rundir import RunDir

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Setup and configuration", "Privacy ledger", "Utility", "Evaluation and self-audit by the members",
            "Fairness", "Membership-inference attacks", "Per-group leakage", "MOTE vs templates",
            "What the server could see")

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left} th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.not-run{color:#a15c00;font-style:italic} .problem{color:#b00020}
img{max-width:100%;border:1px solid #eee} pre{background:#f8f8f8;padding:.8em;overflow-x:auto;font-size:.85em}
"""


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a human: fixed digits, "∞" for infinity, "n/a" for missing or NaN."""
    if x is None:
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x != 0 and abs(x) < 10.0 ** -digits:  # e.g. delta = 1e-05, which fixed digits would show as 0
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def with_ci(value: Any, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``value [lo, hi]`` (a bootstrap 95% interval), or the value alone without one."""
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else fmt(value, digits)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{_e(fmt(c))}</td>' if isinstance(c, int | float) and not isinstance(c, bool)
        else f"<td>{_e(c)}</td>"
        for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _p(text: str) -> str:
    return f"<p>{_e(text)}</p>"


def _not_run(text: str) -> str:
    return f'<p class="not-run">Not run: {_e(text)}</p>'


def _image(path: Path, alt: str) -> str:
    """The PNG at ``path`` as an embedded data URI, or a "not run" line when it is absent."""
    if not path.is_file():
        return _not_run(f"{alt}: {path.name} was not written")
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return f'<p class="problem">{_e(path)}: not a PNG file</p>'
    uri = base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{uri}"><figcaption>{_e(alt)}</figcaption></figure>'


def _setup(r: RunResults) -> str:
    if r.config is None:
        return _not_run(r.problem_with(layout.CONFIG) or f"{layout.CONFIG} is missing: this is not a run directory")
    status = r.status or RunStatus(MISSING)
    m = r.manifest or {}
    counts = m.get("counts", {})
    rows = [
        ("run", r.path.name),
        ("status", status.status + (f" ({status.error})" if status.error else "")),
        ("seed", r.cfg("seed")),
        ("task", f"{r.cfg('train.task')} (attribute: {r.cfg('train.attribute')})"),
        ("data", _data_line(r)),
        ("data fingerprint", str(m.get("fingerprint", "n/a"))[:16]),
        ("split (samples)", ", ".join(f"{k} {v}" for k, v in counts.get("samples", {}).items()) or "n/a"),
        ("split (identities)", ", ".join(f"{k} {v}" for k, v in counts.get("identities", {}).items()) or "n/a"),
        ("clients", f"{r.cfg('split.num_clients')} ({r.cfg('split.partition')} partition)"),
        ("federation", (f"{r.cfg('federation.rounds')} rounds x {r.cfg('federation.local_epochs')} local epochs, "
                        f"fraction {r.cfg('federation.fraction_train')} per round")),
        ("model", (f"width {r.cfg('model.width')}, blocks {r.cfg('model.blocks')}, "
                   f"embedding {r.cfg('model.embedding_dim')}")),
        ("DP-SGD", f"{r.cfg('dp.mode')}, target epsilon {fmt(r.cfg('dp.target_epsilon'))}, delta {r.cfg('dp.delta')}, "
                   f"{r.cfg('dp.accountant')} accountant" if r.dp_on() else "off"),
        ("fairness intervention", r.cfg("fairness.method")),
        ("encrypted aggregation (HE)", "on" if r.cfg("he.enabled") else "off"),
        ("MOTE", f"balancing factors {r.cfg('mote.balancing_factors')}" if r.cfg("mote.enabled") else "off"),
    ]
    out = [_table(("setting", "value"), rows)]
    clients = m.get("client_summary")
    if clients:
        out.append(_table(("client", "identities", "samples", "gender", "group"), [
            (i, c.get("identities"), c.get("samples"), ", ".join(f"{k} {v}" for k, v in c.get("gender", {}).items()),
             ", ".join(f"{k} {v}" for k, v in c.get("group", {}).items())) for i, c in enumerate(clients)]))
    elif not r.per_member():  # a per-member run has no manifest: its members' counts are in the data row
        out.append(_not_run(r.problem_with(layout.MANIFEST) or f"{layout.MANIFEST} is missing: no per-client data summary"))
    text = (r.path / layout.CONFIG).read_text(encoding="utf-8")
    out.append(f"<details><summary>resolved configuration ({layout.CONFIG})</summary><pre>{_e(text)}</pre></details>")
    return "".join(out)


def _data_line(r: RunResults) -> str:
    if r.per_member():
        described = next(iter(r.events("members")), {}).get("members", {})
        counts = "; ".join(f"member {p}: {c.get('train-images')} training, {c.get('held-out-images')} held-out, "
                           f"{c.get('probe-images')} probe images" for p, c in described.items())
        return f"per member: each member's own folder, read and split only there ({counts or 'no counts recorded'})"
    if r.cfg("data.source") == "synthfaces":
        return (f"synthfaces: {r.cfg('data.identities')} identities x {r.cfg('data.images_per_identity')} images, "
                f"{r.cfg('data.image_size')} px")
    return f"{r.cfg('data.source')} at {r.cfg('data.path')}"


def _members(r: RunResults) -> str:
    """Per-member runs: each member's evaluation of the final round and its self-audit."""
    if not r.per_member():
        return _p("The server held the split of all the data (data.layout = manifest): it evaluated and audited "
                  "the model itself (Utility, Membership-inference attacks); with data.layout = per-member the "
                  "members do it on their own data and this section shows their numbers.")
    out = []
    rounds = [e for e in r.events("round") if "members_evaluation" in e]
    if rounds:
        last = rounds[-1]
        out.append(_p(f"Round {last['round']}: each member evaluated the global model on its own held-out data "
                      "and sent back only these numbers; the Utility table's members' columns weight them by the "
                      "counts shown."))
        out.append(_table(("member", "verification AUC (held-out identities)", "probe images", "attribute accuracy",
                           "held-out images"),
                          [(int(m["partition-id"]), m.get("verification_auc"), int(m["probe-images"]),
                            m.get("attribute_accuracy", "n/a"), int(m["held-out-images"]))
                           for m in last["members_evaluation"]["members"]]))
    if r.self_audit is None:
        out.append(_not_run(r.problem_with(layout.SELF_AUDIT) or f"{layout.SELF_AUDIT} was not written"))
        return "".join(out)
    out.append(_p("Self-audit: each member attacked the final model (its own identity head on the global "
                  "backbone) on its own data, its training images against half its held-out images, and sent back "
                  "only these numbers (attacks/self_audit.py). The empirical epsilon is a 95% lower bound per image; "
                  "it can never exceed a correct accounted epsilon."))
    out.append(f"<pre>{_e(self_audit_table(r.self_audit))}</pre>")
    return "".join(out)


def _privacy(r: RunResults) -> str:
    return _backbone_privacy(r) + _mote_privacy(r)


def _backbone_privacy(r: RunResults) -> str:
    if r.config is not None and not r.dp_on():
        return _p("DP-SGD was off (dp.mode = off): the run has no differential-privacy guarantee (epsilon = ∞).")
    if r.privacy is None:
        return _not_run(r.problem_with(layout.PRIVACY) or f"{layout.PRIVACY} is missing (no round finished)")
    p = r.privacy
    rows = [(k, c.get("unit"), c.get("epsilon"), c.get("epsilon_rdp"), c.get("epsilon_prv"), c.get("delta"),
             _person(c), c.get("steps"), c.get("noise_multiplier"), c.get("sample_rate"),
             "yes" if c.get("reproducible_noise") else "no", ", ".join(map(str, c.get("rounds", []))))
            for k, c in p.get("clients", {}).items()]
    warning = ('<p class="problem">Warning: dp.reproducible_noise = true. Every client\'s DP noise and sampling were '
               'derived from the run seed, which the server knows: the epsilons below do not hold against the '
               'server (a research setting for reproducible runs).</p>' if p.get("reproducible_noise") else "")
    reweighted = sorted({c["reweighting"]["noise_multiplier"] for c in p.get("clients", {}).values()
                         if isinstance(c.get("reweighting"), dict) and "noise_multiplier" in c["reweighting"]})
    if reweighted:
        warning += _p("Reweighting: each client's weights come from its (sensitive value, label) counts released "
                      f"once with Gaussian noise (sigma {', '.join(map(str, reweighted))}); that release is in its "
                      "accountant history and in the epsilons below.")
    return (warning + _p(f"Accountant {p.get('accountant')}, delta {p.get('delta')}, unit: {p.get('unit', 'sample')}; "
                         f"{p.get('guarantee', '')}. Largest epsilon spent: {fmt(p.get('max_epsilon'))}.")
            + _table(("client", "unit", "epsilon", "epsilon (RDP)", "epsilon (PRV)", "delta",
                      "one person: (epsilon, delta)", "steps", "noise multiplier", "sample rate", "reproducible noise",
                      "rounds"), rows))


def _mote_privacy(r: RunResults) -> str:
    """The MOTE enrollment's own ledger (``privacy.json`` key ``mote``), when MOTE trained with DP."""
    mote = (r.privacy or {}).get("mote")
    if not r.cfg("mote.enabled") or r.cfg("train.task") == "attribute":
        return ""
    if not isinstance(mote, dict):
        if r.cfg("mote.impostor_population") == "public":
            return _p("MOTE enrollment used public impostors (mote.impostor_population = public): the galleries were "
                      "trained on no private image besides each template's own references, which no DP protects.")
        return _p("MOTE enrollment: no DP (mote.dp_target_epsilon and mote.dp_noise_multiplier are 0): the galleries "
                  "carry no differential-privacy guarantee for the enrollment population.")
    clients = mote.get("clients", {})
    rows = [(k, c.get("unit"), c.get("epsilon"), c.get("epsilon_rdp"), c.get("epsilon_prv"), c.get("delta"),
             c.get("epsilon_per_gallery"), c.get("galleries"), c.get("steps"), c.get("noise_multiplier"),
             c.get("sample_rate"), c.get("records"), "yes" if c.get("reproducible_noise") else "no")
            for k, c in clients.items()]
    warning = ('<p class="problem">Warning: the MOTE noise was derived from the run seed (dp.reproducible_noise): '
               'these epsilons do not hold against the server.</p>'
               if any(c.get("reproducible_noise") for c in clients.values()) else "")
    return (warning + _p(f"MOTE enrollment with DP-SGD: {mote.get('guarantee', '')}.")
            + _table(("client", "unit", "epsilon", "epsilon (RDP)", "epsilon (PRV)", "delta", "epsilon of one gallery",
                      "galleries", "steps (all galleries)", "noise multiplier", "sample rate", "records",
                      "reproducible noise"), rows))


def _person(entry: dict[str, Any]) -> str:
    """What a client's guarantee gives one person: its own under identity-level DP, else the
    group-privacy bound over the most images one identity has (loose; delta 1 means nothing)."""
    if "epsilon_person_bound" not in entry:
        return "-"
    bound = f"({fmt(entry['epsilon_person_bound'])}, {fmt(entry.get('delta_person_bound'))})"
    k = entry.get("largest_identity_images")
    return f"{bound} over {k} images" if k else bound


def _utility(r: RunResults) -> str:
    rows: list[tuple[Any, ...]] = []
    for e in r.metrics:
        kind = e.get("event")
        if kind == "pretrain":
            rows.append(("public pretraining", "", "", "", e.get("verification_auc", "n/a"),
                         e.get("attribute_accuracy", "n/a"),
                         "", e.get("seconds")))
        elif kind == "round":
            hidden = "encrypted" if e.get("encrypted") else "n/a"
            no_attr = "n/a" if r.cfg("train.task") == "identity" else hidden
            own = MEMBERS_PREFIX if r.per_member() else ""  # the members' count-weighted evaluation
            rows.append((e["round"], len(e.get("clients", [])), len(e.get("failures", [])), e.get("train_loss"),
                         e.get(own + "verification_auc", hidden), e.get(own + "attribute_accuracy", no_attr),
                         e.get("max_epsilon") if r.dp_on() else "DP off", e.get("seconds")))
        elif kind == "decrypted":
            rows.append((f"round {e.get('round')}, decrypted by a key holder", "", "", "",
                         e.get("verification_auc"), e.get("attribute_accuracy", "n/a"), "", ""))
    if not rows:
        return _not_run(r.problem_with(layout.METRICS) or f"{layout.METRICS} has no round (training did not start)")
    out = [_table(("round", "clients", "failed", "train loss", "verification AUC", "attribute accuracy", "max epsilon",
                   "seconds"), rows)]
    if r.per_member():
        out.append(_p("The members kept their data: each round's verification AUC and attribute accuracy are the "
                      "members' own evaluations on their held-out data, averaged weighted by their counts (a "
                      "weighted mean of per-member AUCs, not the AUC of pooled pairs)."))
    elif r.cfg("he.enabled"):
        out.append(_p("With HE the server cannot evaluate the global model between rounds; the decrypted final "
                      "model is evaluated by a key holder."))
    if r.lift is not None:
        auc, lift, gap = r.lift["verification_auc"], r.lift["lift"], r.lift["central_minus_final"]
        out.append(_p(f"What the federation added (public pretraining condition {r.lift['pretrain_condition']}; "
                      f"{r.lift['probe_identities']} probe identities, {r.lift['pairs']} pairs; 95% intervals from a "
                      f"{r.lift['test']}; raw pair scores in {layout.LIFT_PAIRS}):"))
        out.append(_table(("model", "verification AUC", "difference [95% CI]"), [
            ("after public pretraining (initial global model)", auc["initial"], ""),
            ("after the federation (final global model)", auc["final"],
             "lift " + with_ci(lift["difference"], lift["ci95"])),
            (f"central, no DP, pooled member data ({r.lift['central_epochs']} epochs)", auc["central"],
             "over the federation " + with_ci(gap["difference"], gap["ci95"]))]))
    try:
        plot = utility_plot(r, r.path / layout.UTILITY_PLOT)
    except ValueError as exc:
        out.append(_not_run(f"utility plot: {exc}"))
    else:
        out.append(_image(plot, "utility over rounds"))
    return "".join(out)


def utility_plot(r: RunResults, path: Path) -> Path:
    """Train loss, evaluation metrics and epsilon over rounds (PNG, written atomically)."""
    rounds = r.events("round")
    if not rounds:
        raise ValueError("no round events")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = [e["round"] for e in rounds]
    fig = Figure(figsize=(11.0, 3.4))
    FigureCanvasAgg(fig)
    ax_loss, ax_eval, ax_eps = fig.subplots(1, 3)
    ax_loss.plot(x, [e.get("train_loss", math.nan) for e in rounds], marker="o")
    ax_loss.set_title("train loss (clients' mean)")
    decrypted = [e for e in r.events("decrypted") if "round" in e]  # a key holder's evaluations (HE runs)
    for key, label in (("verification_auc", "verification AUC"), ("attribute_accuracy", "attribute accuracy")):
        ys = [e.get(key, math.nan) for e in rounds]
        if any(math.isfinite(y) for y in ys):
            ax_eval.plot(x, ys, marker="o", label=label)
        held = [(e["round"], e[key]) for e in decrypted if key in e]
        if held:
            ax_eval.plot(*zip(*held, strict=True), marker="*", markersize=12,
                         label=f"{label} (decrypted by a key holder)")
    ax_eval.set_ylim(0.0, 1.02)
    ax_eval.set_title("global model on held-out data")
    if ax_eval.get_legend_handles_labels()[0]:
        ax_eval.legend(fontsize="small", loc="lower right")
    ax_eps.plot(x, [e.get("max_epsilon", math.nan) for e in rounds], marker="o", color="tab:red")
    ax_eps.set_title("largest epsilon spent" if r.dp_on() else "epsilon (DP off: no guarantee)")
    for ax in (ax_loss, ax_eval, ax_eps):
        ax.set_xlabel("round")
        ax.set_xticks(x)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _fairness(r: RunResults) -> str:
    out = []
    final = r.final_metrics()
    if "attribute_deo_sum" in final:
        sens = r.cfg("fairness.sensitive", "gender")
        out.append(_p(f"Attribute task ({r.cfg('train.attribute')}) on held-out samples, sensitive attribute "
                      f"{sens} (s0 / s1 = its two values; for gender female / male), intervention "
                      f"{r.cfg('fairness.method')}."))
        out.append(_table(("metric", "value"), [
            ("accuracy", final.get("attribute_accuracy")),
            ("balanced accuracy", final.get("attribute_balanced_accuracy")),
            ("DEO (|dTPR| + |dFPR|)", final.get("attribute_deo_sum")), ("dTPR", final.get("attribute_dtpr")),
            ("dFPR", final.get("attribute_dfpr")), ("bias amplification", final.get("attribute_bias_amplification"))]))
        out.append(_table(("group", "TPR", "FPR", "positive rate", "accuracy", "n"), [
            (s, final.get(f"attribute_tpr_{s}"), final.get(f"attribute_fpr_{s}"),
             final.get(f"attribute_positive_rate_{s}"),
             final.get(f"attribute_accuracy_{s}"), int(final.get(f"attribute_n_{s}", 0))) for s in ("s0", "s1")]))
    elif r.cfg("train.task") == "identity":
        out.append(_not_run("attribute fairness (DEO, bias amplification): the identity task has no attribute head"))
    else:
        out.append(_not_run("attribute fairness: the final model was never evaluated (HE run not decrypted?)"))
    if r.evaluation is not None:
        out.append(_p(f"Verification fairness at one global threshold (FMR {r.evaluation.target_fmr}): FDR and "
                      "iGARBE are higher when fairer (1 = equal error rates), IR is 1 when fair."))
        out.append(_table(("method", "FNMR female", "FNMR male", "FDR (gender)", "iGARBE (gender)", "IR (gender)",
                           "FDR (group)", "iGARBE (group)", "IR (group)"), [
            (name, m["gender"]["female"]["fnmr"], m["gender"]["male"]["fnmr"], m.get("fdr"), m.get("igarbe"),
             m.get("ir"),
             m["group"].get("fdr"), m["group"].get("igarbe"), m["group"].get("ir"))
            for name, m in r.evaluation.methods.items()]))
    else:
        out.append(_not_run(f"MOTE verification fairness: no {layout.MOTE_EVALUATION} (`facefl evaluate` was not run)"))
    return "".join(out)


def _attacks(r: RunResults) -> str:
    if r.audit is None:
        return _not_run(f"no {layout.AUDIT_REPORT} (`facefl audit` was not run)")
    a = r.audit
    rows = []
    for x in r.attacks():
        rows.append((x.name, x.target, with_ci(x.auc, x.ci("auc")),
                     with_ci(x.balanced_accuracy, x.ci("balanced_accuracy")),
                     *(_tpr(x, k) for k in a.fpr_keys),
                     fmt((x.epsilon_lower_bound or {}).get("epsilon"), 2),
                     f"{x.n_members} / {x.n_nonmembers}"))
    recipe = {"target": "trained the way the target was (its FedAvg, DP-SGD noise and fairness intervention)",
              "central": "trained centrally without DP"}.get(a.reference_recipe or "", "recipe not recorded")
    out = [_p(f"Audited {a.audited.get('members')} members vs {a.audited.get('nonmembers')} nonmembers of the global "
              f"model; {a.references} reference models, {recipe}; seed {a.seed}. Intervals are stratified "
              "bootstrap 95% intervals; TPR at a target FPR never uses a threshold whose FPR exceeds the target, and "
              f"is shown only where at least {MIN_FALSE_POSITIVES} nonmembers would be false positives at that FPR. "
              "The empirical epsilon is a 95% lower bound from the attack's ROC (Clopper-Pearson, Bonferroni over "
              "thresholds), at the run's delta, per image.")]
    if a.mote_audited:
        m = a.mote_audited
        out.append(_p(f"MOTE galleries: {m.get('members')} vs {m.get('nonmembers')} ({m.get('what')})."))
    if a.fair_run:
        out.append(_p(f"Fair twin run (FD-MIA pair): {a.fair_run}."))
    out.append(_table(("attack", "target", "AUC [95% CI]", "balanced accuracy [95% CI]",
                       *(f"{tpr_label(k)} [95% CI]" for k in a.fpr_keys), "empirical epsilon (lower bound)",
                       "members / nonmembers"), rows))
    out.append(_empirical_epsilon(r))
    if a.comparisons:
        out.append(_p("Paired comparisons on the same samples (AUC of a minus AUC of b, paired bootstrap 95% "
                      "interval):"))
        out.append(_table(("a", "b", "AUC difference [95% CI]"),
                          [(c["a"], c["b"], with_ci(c["difference"], c["ci95"])) for c in a.comparisons]))
    families = {x.kind.family for x in r.attacks()}  # one figure per family the audit attacked
    out.extend(_image(r.path / layout.audit_roc(family), f"{title}: ROC of every attack (log-log)")
               for family, title in FAMILY_TITLES.items() if family in families)
    return "".join(out)


def _tpr(x: AttackEntry, key: str) -> str:
    """A TPR with its interval where the nonmembers resolve it, else why not."""
    return with_ci(x.tpr_at_fpr[key], x.tpr_ci(key)) if x.resolves(key) and x.tpr_at_fpr[key] is not None \
        else tpr_text(x, key)


def _empirical_epsilon(r: RunResults) -> str:
    """The accounted epsilon beside the best lower bound the audit proves (attacks and canaries)."""
    found = r.best_empirical_bound()
    if found is None:
        return ""
    best, what = found
    accounted = r.epsilon()
    unit = f"per {(r.privacy or {}).get('unit', 'sample')}" if r.dp_on() else "no DP: no guarantee"
    return _p(f"Accounted epsilon {fmt(accounted, 2)} ({unit}, delta {r.cfg('dp.delta')}) vs the best empirical "
              f"lower bound {fmt(best, 2)} per image ({what}). A lower bound below the accounted value is expected. "
              "The attacks' bounds read each audited sample as an independent trial (a heuristic); the one-run canary "
              "audit's canaries are included by independent coin flips, so its bound holds for the run. A bound above "
              "the accounted value points at a bug, or at a guarantee in another unit (docs/audit.md).")


def _per_group(r: RunResults) -> str:
    if r.audit is None:
        return _not_run(f"no {layout.AUDIT_REPORT}")
    rows, omitted = [], set()
    keys = r.audit.fpr_keys
    for x in r.attacks(include_updates=False):
        for attr, groups in x.per_group.items():
            for value, g in groups.items():
                if g.get("auc") is None:
                    omitted.add(f"{attr} {value} ({g.get('n_members')} / {g.get('n_nonmembers')})")
                    continue
                rows.append((x.label, attr, value, g.get("auc"),
                             *(fmt(g["tpr_at_fpr"][k]) if g["tpr_at_fpr"][k] is not None
                               else f"not resolvable at n = {g.get('n_nonmembers')}" for k in keys),
                             g.get("n_members"), g.get("n_nonmembers")))
    note = (f" Omitted, with fewer than {MIN_GROUP_PER_CLASS} members or nonmembers: {'; '.join(sorted(omitted))}."
            if omitted else "")
    if not rows:
        return _p("No group has enough audited samples for its own metrics." + note)  # ran; too small to say
    return (_p("Each attack's success within one gender or skin-tone group (no intervals; a group's AUC needs at "
               f"least {MIN_GROUP_PER_CLASS} members and {MIN_GROUP_PER_CLASS} nonmembers, its TPR the nonmembers "
               f"to resolve the FPR).{note}")
            + _table(("attack", "attribute", "group", "AUC", *map(tpr_label, keys), "members", "nonmembers"),
                     rows))


def _mote(r: RunResults) -> str:
    if r.evaluation is None:
        if not r.cfg("mote.enabled") or r.cfg("train.task") == "attribute":
            return _not_run("MOTE enrollment was off for this run (mote.enabled = false or attribute task)")
        if r.per_member():
            return _mote_members(r)
        return _not_run(f"no {layout.MOTE_EVALUATION} (`facefl evaluate` was not run)")
    ev = r.evaluation
    rows = [(name, m.get("auc"), m.get("fnmr"), m.get("fmr"), ev.leakage(name).get("balanced_accuracy"),
             ev.leakage(name).get("male_accuracy"), ev.leakage(name).get("female_accuracy"))
            for name, m in ev.methods.items()]
    return (_p(f"{ev.enrolled} enrolled identities, {ev.probes} probe images. Verification at one global "
               f"threshold with FMR <= {ev.target_fmr}. Gender inference by a template thief (comparison "
               "scores against an auxiliary population): balanced accuracy 0.5 = no leakage. "
               f"{BALANCED_GALLERY} is the balanced gallery.")
            + _table(("method", "verification AUC", "FNMR@FMR=1e-3", "FMR at threshold", "gender inference BA",
                      "male acc.", "female acc."), rows)
            + _gender_variants(ev)
            + _image(r.path / layout.MOTE_ROC, "MOTE vs templates verification ROC"))


def _mote_members(r: RunResults) -> str:
    """Per-member runs: MOTE vs templates as each member measured it on its own held-out images."""
    if r.mote_members is None:
        return _not_run(r.problem_with(layout.MOTE_MEMBERS_EVALUATION)
                        or f"{layout.MOTE_MEMBERS_EVALUATION} was not written (the enrollment failed?)")
    rows = [(partition, name, m.get("auc"), m.get("fnmr") if resolvable(m.get("n_impostor", 0), e["target_fmr"])
             else f"not resolvable ({m.get('n_impostor')} impostor pairs)", e["enrolled"], e["probes"])
            for partition, e in r.mote_members["members"].items() for name, m in e["methods"].items()]
    kept = "the server merged the galleries the members shared" if r.cfg("mote.share_gallery") else \
        "the galleries stayed in each member's state directory"
    return (_p(f"Each member enrolled its own identities and compared MOTE with templates on its own held-out "
               f"images (genuine: its enrolled identities' held-out images; impostors: also its held-out "
               f"identities); only these numbers reached the server; {kept}.")
            + _table(("member", "method", "verification AUC", "FNMR@FMR=1e-3", "enrolled", "probe images"), rows))


def _gender_variants(ev: MoteEvaluation) -> str:
    """Gender inference from each MOTE gallery four ways, with the collapse diagnostics."""
    rows = [(name, variant, v.get("balanced_accuracy"), v.get("majority_share"), v.get("tie_share"))
            for name in ev.methods for variant, v in ev.leakage(name).get("variants", {}).items()]
    if not rows:
        return ""
    return (_p("Gender inference from the MOTE models, four ways (attacks/gender_inference.py): the paper's mean "
               "sigmoid score, mean logit, each model's logit difference calibrated to its own spread and cut at "
               "the gallery's median, and accept/reject decisions at the operating threshold. A collapse (every "
               "model guessed as one class, balanced accuracy exactly 0.5) comes with ties: the scores cannot tell "
               "the genders apart, which is not the same as the models not encoding gender.")
            + _table(("gallery", "variant", "balanced accuracy", "share guessed as majority class",
                      "share of ties"), rows))


def _server_view(r: RunResults) -> str:
    out = []
    if r.cfg("he.enabled"):
        he = r.he or {}
        out.append(_p("Encrypted aggregation (CKKS) was ON: " + str(he.get("server_sees", f"{layout.HE} is missing")) + "."))
        if he:
            out.append(_table(("item", "value"), [
                ("values encrypted", f"{he.get('encrypted')} of {he.get('values')}"),
                ("values in plaintext", he.get("plaintext")), ("selection", he.get("criterion")),
                ("key fingerprint", str(he.get("fingerprint", ""))[:16])]))
    elif r.config is not None:
        out.append(_p("Encrypted aggregation was OFF: the server saw every client's update in plaintext."))
    else:
        out.append(_not_run("no configuration"))
    level = r.audit.update_level if r.audit is not None else None
    if level is None:
        out.append(_not_run("update-level attacks (a curious server attacking each client's update): no audit"))
    elif not level.get("available"):
        out.append(_p(f"Update-level attacks: not possible ({level.get('reason')})."))
    else:
        keys = r.audit.fpr_keys
        rows = [(x.target, x.name, x.auc, *(_tpr(x, k) for k in keys), x.n_members)
                for x in r.attacks() if x.per_client]
        out.append(_p(f"Update-level attacks on {level.get('clients')} clients' own post-round models (what a curious "
                      "server holds), each on that client's members against every audited nonmember:"))
        out.append(_table(("target", "attack", "AUC", *map(tpr_label, keys), "members"), rows))
    return "".join(out)


_BUILDERS: dict[str, Callable[[RunResults], str]] = dict(zip(SECTIONS, (
    _setup, _privacy, _utility, _members, _fairness, _attacks, _per_group, _mote, _server_view), strict=True))


def render_report(r: RunResults) -> str:
    """The whole page as a string; a section whose builder fails says so and the rest still render."""
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>facefl report: {_e(r.path.name)}"
              f"</title><style>{_CSS}</style></head><body><h1>facefl report: {_e(r.path.name)}</h1>")]
    parts += [f'<p class="problem">{_e(p)}</p>' for p in r.problems]
    for title, build in _BUILDERS.items():
        try:
            body = build(r)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a malformed input file, never a crash
            log.warning("report %s: section %r failed", r.path, title, exc_info=True)
            body = f'<p class="problem">This section could not be built from the run\'s files: {_e(repr(exc))}</p>'
        parts.append(f'<section><h2>{_e(title)}</h2>{body}</section>')
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(run: str | os.PathLike[str] | RunResults) -> Path:
    """Write ``RUN_DIR/report.html`` (and ``utility.png``) atomically; return the report's path.
    ``run`` is the directory, or its results already loaded."""
    r = run if isinstance(run, RunResults) else RunResults.load(run)
    return atomic_write_text(RunDir(r.path).report_path, render_report(r))
