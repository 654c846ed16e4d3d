"""lme4's saved fits, read back, and a fitted model compared with them.

lme4's side is written by R scripts (``experiments/lme4_reference.R``, ``lme4_corpus.R``, ``lme4_glmm.R``): one
folder per data set with, for each kind of fit (``reml`` or ``ml``), ``fit_<kind>.json`` (theta, sigma,
log-likelihood, timing, versions, or an ``error``), ``fixef_<kind>.csv``, ``varcorr_<kind>.csv``
(``as.data.frame(VarCorr(m))``) and, where written, ``ranef_<kind>.csv`` (``as.data.frame(ranef(m))``:
``grpvar, term, grp, condval, condsd``) and ``fitted_<kind>.csv``.

* reading: :func:`read_fit`, :func:`read_table`, :func:`load_fit` (every table of one fit),
  :func:`load_comparable` (what :func:`compare` takes), :func:`load_glmer`;
* random effects joined by level label (``grpvar, term, grp``), never by row position: :func:`join_by_label`,
  :func:`join_effects`, :func:`effect_agreement`, :func:`corr_with_lme4`;
* a whole fit against lme4's: :func:`compare` (SDs, correlations, fixed effects in lme4's standard errors,
  fitted values, matching lme4's names of terms and groups) and :func:`status_of`, which grades it with
  :data:`EXACT_TOL` and :data:`CLOSE_TOL`; :func:`compare_glmer` for a GLMM against glmer.

Used by the experiments (InstEval, the model corpus, the GLMMs) and by the tests that check fits against the
same files. Reads files only: nothing here needs R.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from lmevi.result.fitresult import FitResult

# A metric of :func:`compare` at most EXACT_TOL everywhere: an exact match; at most CLOSE_TOL: close.
EXACT_TOL = 1e-3
CLOSE_TOL = 0.05
STATUSES = ("exact-match", "close", "differs", "fails", "no-reference", "data-mismatch")
METRICS = ("sd_rel", "corr_abs", "fixef_se", "fitted_rel")

# the columns that name one random effect: grouping factor, term and level label
KEYS = ["grpvar", "term", "grp"]


def read_fit(directory: str | Path, kind: str) -> dict:
    """``fit_<kind>.json`` of one saved lme4 fit."""
    return json.loads((Path(directory) / f"fit_{kind}.json").read_text())


def read_table(directory: str | Path, table: str, kind: str) -> pd.DataFrame:
    """``<table>_<kind>.csv`` of one saved lme4 fit; a ``ranef`` table keeps its labels as strings."""
    dtype = {"grp": str, "grpvar": str, "term": str} if table == "ranef" else None
    return pd.read_csv(Path(directory) / f"{table}_{kind}.csv", dtype=dtype)


def sd_by_group(varcorr: pd.DataFrame) -> pd.Series:
    """SDs from an lme4 ``as.data.frame(VarCorr(m))`` table, indexed by group (intercept-only terms)."""
    v = varcorr[varcorr["var2"].isna()]
    return pd.Series(v["sdcor"].to_numpy(dtype=float), index=v["grp"].to_numpy())


def join_by_label(ours: pd.DataFrame, lme4: pd.DataFrame, **merge_options) -> pd.DataFrame:
    """Random effects side by side, merged on :data:`KEYS`; lme4's columns end in ``_lme4``.

    ``merge_options`` go to ``DataFrame.merge`` (``how``, ``indicator``, ``validate``); by default only
    the levels present in both are kept.
    """
    return ours.merge(lme4, on=KEYS, suffixes=("", "_lme4"), **merge_options)


def corr_with_lme4(joined: pd.DataFrame) -> float:
    """Pearson correlation of ``condval`` with ``condval_lme4`` over the rows of a joined table."""
    return float(np.corrcoef(joined["condval"], joined["condval_lme4"])[0, 1])


def load_fit(directory: str | Path, kind: str) -> dict:
    """Read one saved lme4 fit (written by ``experiments/lme4_reference.R``).

    Args:
        directory: e.g. ``results/lme4/insteval``.
        kind: ``"reml"`` or ``"ml"``.

    Returns:
        ``{"ranef", "fixef", "varcorr": DataFrame, "fit": dict}`` with ``grp`` labels as strings.
    """
    return {"ranef": read_table(directory, "ranef", kind), "fixef": read_table(directory, "fixef", kind),
            "varcorr": read_table(directory, "varcorr", kind), "fit": read_fit(directory, kind)}


lme4_sd = sd_by_group  # the name the InstEval report uses




def join_effects(ours: pd.DataFrame, lme4: pd.DataFrame) -> pd.DataFrame:
    """Random effects side by side, joined on ``grpvar, term, grp``; lme4's columns end in ``_lme4``.

    Every level of ours must have an lme4 partner. lme4's levels that our fit never saw (a training split
    lacks some instructors of the full data, and lmevi drops unused levels as lme4 does) are left out, and
    their number is kept in ``joined.attrs["lme4_only"]``.

    Raises:
        ValueError: if some level of ours has no partner (a join that silently drops rows would make every
            number after it wrong).
    """
    joined = join_by_label(ours, lme4, how="outer", indicator=True)
    unmatched = joined[joined["_merge"] == "left_only"]
    if len(unmatched):
        raise ValueError(f"{len(unmatched)} random effects have no partner, e.g. {unmatched.head(3).to_dict('records')}")
    lme4_only = int((joined["_merge"] == "right_only").sum())
    joined = joined[joined["_merge"] == "both"].drop(columns="_merge").reset_index(drop=True)
    joined.attrs["lme4_only"] = lme4_only
    return joined


def effect_agreement(joined: pd.DataFrame, condsd_band: float = 0.05) -> pd.DataFrame:
    """Per grouping factor: correlation, RMSE and largest absolute difference of the effects, and how
    the posterior SDs compare (share of levels within ``condsd_band`` relative of lme4's, median ratio).
    """
    rows = []
    for (grpvar, term), d in joined.groupby(["grpvar", "term"], sort=False):
        diff = d["condval"] - d["condval_lme4"]
        ratio = d["condsd"] / d["condsd_lme4"]
        rows.append(
            {
                "grpvar": grpvar,
                "term": term,
                "n_levels": len(d),
                "corr": corr_with_lme4(d),
                "rmse": float(np.sqrt(np.mean(diff**2))),
                "max_abs": float(np.max(np.abs(diff))),
                "condsd_within_5pct": float(np.mean(np.abs(ratio - 1.0) <= condsd_band)),
                "condsd_median_ratio": float(np.median(ratio)),
            }
        )
    return pd.DataFrame(rows)


def load_comparable(directory: str | Path, kind: str) -> dict | None:
    """The saved lme4 fit of one kind in ``directory`` (one data set's folder), as :func:`compare` takes it:
    ``info`` (the fit's JSON) plus ``fixef`` and ``varcorr`` frames and the ``fitted`` values ``(n,)``; ``None``
    where no fit of that kind was saved. A fit lme4 refused has its ``error`` in ``info`` and no tables."""
    d = Path(directory)
    if not (d / f"fit_{kind}.json").exists():
        return None
    out = {"info": read_fit(d, kind)}
    if "error" not in out["info"]:
        out["fixef"] = read_table(d, "fixef", kind)
        out["varcorr"] = read_table(d, "varcorr", kind)
        out["fitted"] = read_table(d, "fitted", kind)["fitted"].to_numpy(dtype=np.float64)
    return out




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

    return {"sd_rel": sd_rel, "corr_abs": corr_abs, "fixef_se": fixef_se, "fitted_rel": fitted_rel,
            "unmatched": "; ".join(unmatched)}


def status_of(row: dict) -> str:
    """The status of one row of a comparison from its flags (``data_ok``, ``lme4_fits``, ``fits``), its
    ``unmatched`` text and its :data:`METRICS`: one of :data:`STATUSES`."""
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


def load_glmer(root: str | Path, name: str) -> dict:
    """glmer's saved fit of one data set (``<root>/glmm_<name>``, by ``experiments/lme4_glmm.R``): ``fit``
    (its JSON), ``fixef``, ``varcorr`` and ``ranef`` (labels as strings) frames."""
    out = Path(root) / f"glmm_{name}"
    return {"fit": json.loads((out / "fit.json").read_text()), "fixef": pd.read_csv(out / "fixef.csv"),
            "varcorr": pd.read_csv(out / "varcorr.csv"), "ranef": pd.read_csv(out / "ranef.csv", dtype={"grp": str})}


def compare_glmer(m: FitResult, ref: dict) -> dict:
    """Differences from glmer: fixed effects in its standard errors, SDs relative, random effects joined by
    label (correlation, and the median distance in glmer's conditional SDs)."""
    fixef = ref["fixef"]
    ours = m.fixef().reindex(fixef["term"]).to_numpy()
    sd_ref = ref["varcorr"].set_index("grp")["sdcor"]
    sd = m.sd().reindex(sd_ref.index)
    re = m.ranef()
    ranef = {}
    for grp, theirs in ref["ranef"].groupby("grpvar"):
        mine = re[re["grpvar"] == grp].set_index("grp").reindex(theirs["grp"].astype(str))
        diff = np.abs(mine["condval"].to_numpy() - theirs["condval"].to_numpy()) / theirs["condsd"].to_numpy()
        ranef[grp] = {"corr": float(np.corrcoef(mine["condval"], theirs["condval"])[0, 1]),
                      "median_abs_diff_in_condsd": float(np.median(diff))}
    return {
        "fixef": dict(zip(fixef["term"], ours.tolist())),
        "fixef_lme4": dict(zip(fixef["term"], fixef["estimate"].tolist())),
        "fixef_max_diff_in_se": float(np.max(np.abs(ours - fixef["estimate"].to_numpy())
                                             / fixef["std_error"].to_numpy())),
        "sd": sd.to_dict(),
        "sd_lme4": sd_ref.to_dict(),
        "sd_rel_diff": ((sd - sd_ref) / sd_ref).to_dict(),
        "ranef": ranef,
    }
