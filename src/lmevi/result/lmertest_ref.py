"""lmevi's inference after the fit against R's: the tables ``experiments/lme4_inference.R`` writes
(``results/lme4/inference/<model>/<table>.csv``: lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2, emmeans 1.8.4.1).

One function per kind of table; each returns the largest discrepancies of one fit as a flat dict, so an
experiment can tabulate a corpus and a test can assert on a few models. ``refs`` is the folder of one model's
tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def read(refs: str | Path, table: str) -> pd.DataFrame | None:
    """One committed table (``coef_satterthwaite``, ``anova_type3_kenward_roger``, ...), indexed by its first
    column, or ``None`` where R did not produce it."""
    path = Path(refs) / f"{table}.csv"
    if not path.exists():
        return None
    frame = pd.read_csv(path, keep_default_na=False, na_values=["NA"])
    return frame.set_index(frame.columns[0])


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) | np.isfinite(b)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-300)))


def abs_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) | np.isfinite(b)
    return float(np.max(np.abs(a[ok] - b[ok]))) if ok.any() else 0.0


def _align(ours: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    missing = [k for k in ref.index if k not in ours.index]
    if missing:
        raise KeyError(f"rows {missing} of R's table are not lmevi's ({list(ours.index)})")
    return ours.loc[list(ref.index)]


def compare_coef(m, refs, ddf: str) -> dict | None:
    """Largest relative differences of estimate, SE and df, and the largest absolute difference of p."""
    ref = read(refs, f"coef_{ddf}")
    if ref is None:
        return None
    ours = _align(m.coef_table(ddf), ref)
    return {"estimate_rel": rel_diff(ours["estimate"], ref["estimate"]), "se_rel": rel_diff(ours["std_error"], ref["std_error"]),
            "df_rel": rel_diff(ours["df"], ref["df"]), "p_abs": abs_diff(ours["p"], ref["p"])}


def compare_anova(m, refs, type: int, ddf: str) -> dict | None:
    """Largest relative differences of F and the denominator df, absolute of p; num_df must agree."""
    ref = read(refs, f"anova_type{type}_{ddf}")
    if ref is None:
        return None
    ours = _align(m.anova(type=type, ddf=ddf), ref)
    return {"num_df_equal": bool(np.array_equal(ours["num_df"].to_numpy(), ref["num_df"].to_numpy())),
            "F_rel": rel_diff(ours["F"], ref["F"]), "den_df_rel": rel_diff(ours["den_df"], ref["den_df"]),
            "p_abs": abs_diff(ours["p"], ref["p"])}


def compare_profile(m, refs, level: float = 0.95) -> dict | None:
    """Largest difference of an interval end as a fraction of R's interval width (finite ends only; an end
    that is finite on one side and not on the other counts as a mismatch, ``inf``)."""
    ref = read(refs, "confint_profile")
    if ref is None:
        return None
    ours = _align(m.confint(level, method="profile"), ref)
    ours.columns = ["lower", "upper"]
    width = (ref["upper"] - ref["lower"]).to_numpy(np.float64)
    worst = 0.0
    for col in ("lower", "upper"):
        a, b = ours[col].to_numpy(np.float64), ref[col].to_numpy(np.float64)
        for x, y, w in zip(a, b, width):
            if math.isnan(x) and math.isnan(y) or x == y:
                continue
            if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(w)):
                worst = math.inf
                continue
            worst = max(worst, abs(x - y) / w)
    return {"end_over_width": worst}


def compare_emmeans(m, refs, spec: str, ddf: str = "kr", pairs: bool = False, adjust: str = "none") -> dict | None:
    """Largest relative difference of estimates (absolute where R's is 0), SEs, dfs; absolute of p."""
    table = f"pairs_{spec}_{ddf}_{adjust}" if pairs else f"emmeans_{spec}_{ddf}"
    ref = read(refs, table)
    if ref is None:
        return None
    ours = _emmeans(m, spec, pairs, {"kr": "kenward_roger", "satterthwaite": "satterthwaite"}[ddf], adjust)
    ours.index = [str(k) for k in ours.index]
    ref.index = [str(k) for k in ref.index]
    ours = _align(ours, ref)
    scale = np.maximum(np.abs(ref["estimate"].to_numpy()), 1.0)
    return {"estimate_rel": float(np.max(np.abs(ours["estimate"].to_numpy() - ref["estimate"].to_numpy()) / scale)),
            "se_rel": rel_diff(ours["std_error"], ref["std_error"]), "df_rel": rel_diff(ours["df"], ref["df"]),
            "p_abs": abs_diff(ours["p"], ref["p"])}


def _emmeans(m, spec, pairs, ddf, adjust):
    from lmevi.result.inference import emmeans

    return emmeans(m, spec, pairs=pairs, ddf=ddf, adjust=adjust)
