"""lmevi's inference after the fit against the committed R references (``results/lme4/inference/``, written by
``experiments/lme4_inference.R``: lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2, emmeans 1.8.4.1).

One function per kind of table; each returns the largest discrepancies of one model as a flat dict, so the
experiment can tabulate the whole corpus and the tests can assert on a few models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REFS = ROOT / "results" / "lme4" / "inference"


def index() -> pd.DataFrame:
    """``index.csv``: one row per model, which tables R produced (booleans) and R's timings."""
    return pd.read_csv(REFS / "index.csv", keep_default_na=False, na_values=["NA"])


def read(name: str, table: str) -> pd.DataFrame | None:
    """One committed table (``coef_satterthwaite``, ``anova_type3_kenward_roger``, ...), indexed by its first
    column, or ``None`` where R did not produce it."""
    path = REFS / name / f"{table}.csv"
    if not path.exists():
        return None
    frame = pd.read_csv(path, keep_default_na=False, na_values=["NA"])
    return frame.set_index(frame.columns[0])


def info(name: str) -> dict:
    return json.loads((REFS / name / "info.json").read_text())


def load_data(name: str) -> pd.DataFrame:
    """The model's data as the corpus loads it (R's factor coding), subset as R's script did."""
    from experiments.corpus import load_data as corpus_data

    row = index().set_index("name").loc[name]
    spec = {"name": name, "r_package": row["r_package"], "dataset": row["dataset"], "subset": row["subset"] or "",
            "factors": ""}
    corpus = {r["name"]: r for r in _corpus_models()}
    if name in corpus:
        spec["factors"] = corpus[name].get("factors", "")
    if name == "insteval":
        import lmevi

        return lmevi.load_insteval()
    return corpus_data(spec)[0]


def _corpus_models() -> list[dict]:
    from experiments.corpus import read_models

    return read_models()


def fit(name: str, reml: bool = True):
    """lmevi's exact fit of the model R fitted (REML, as ``lmerTest::lmer``)."""
    import lmevi

    row = index().set_index("name").loc[name]
    # missing="drop": R's na.action = na.omit (gcsemv_course has missing coursework marks)
    return lmevi.fit(row["formula"], load_data(name), q="exact", reml=reml, missing="drop", progress=False)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) | np.isfinite(b)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-300)))


def _abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) | np.isfinite(b)
    return float(np.max(np.abs(a[ok] - b[ok]))) if ok.any() else 0.0


def _align(ours: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    missing = [k for k in ref.index if k not in ours.index]
    if missing:
        raise KeyError(f"rows {missing} of R's table are not lmevi's ({list(ours.index)})")
    return ours.loc[list(ref.index)]


def compare_coef(m, name: str, ddf: str) -> dict | None:
    """Largest relative differences of estimate, SE and df, and the largest absolute difference of p."""
    ref = read(name, f"coef_{ddf}")
    if ref is None:
        return None
    ours = _align(m.coef_table(ddf), ref)
    return {"estimate_rel": _rel(ours["estimate"], ref["estimate"]), "se_rel": _rel(ours["std_error"], ref["std_error"]),
            "df_rel": _rel(ours["df"], ref["df"]), "p_abs": _abs(ours["p"], ref["p"])}


def compare_anova(m, name: str, type: int, ddf: str) -> dict | None:
    """Largest relative differences of F and the denominator df, absolute of p; num_df must agree."""
    ref = read(name, f"anova_type{type}_{ddf}")
    if ref is None:
        return None
    ours = _align(m.anova(type=type, ddf=ddf), ref)
    return {"num_df_equal": bool(np.array_equal(ours["num_df"].to_numpy(), ref["num_df"].to_numpy())),
            "F_rel": _rel(ours["F"], ref["F"]), "den_df_rel": _rel(ours["den_df"], ref["den_df"]),
            "p_abs": _abs(ours["p"], ref["p"])}


def compare_profile(m, name: str, level: float = 0.95) -> dict | None:
    """Largest difference of an interval end as a fraction of R's interval width (finite ends only; an end
    that is finite on one side and not on the other counts as a mismatch, ``inf``)."""
    ref = read(name, "confint_profile")
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


def compare_emmeans(m, name: str, spec: str, ddf: str = "kr", pairs: bool = False, adjust: str = "none") -> dict | None:
    """Largest relative difference of estimates (absolute where R's is 0), SEs, dfs; absolute of p."""
    table = f"pairs_{spec}_{ddf}_{adjust}" if pairs else f"emmeans_{spec}_{ddf}"
    ref = read(name, table)
    if ref is None:
        return None
    ours = m_emmeans(m, spec, pairs, {"kr": "kenward_roger", "satterthwaite": "satterthwaite"}[ddf], adjust)
    ours.index = [str(k) for k in ours.index]
    ref.index = [str(k) for k in ref.index]
    ours = _align(ours, ref)
    scale = np.maximum(np.abs(ref["estimate"].to_numpy()), 1.0)
    return {"estimate_rel": float(np.max(np.abs(ours["estimate"].to_numpy() - ref["estimate"].to_numpy()) / scale)),
            "se_rel": _rel(ours["std_error"], ref["std_error"]), "df_rel": _rel(ours["df"], ref["df"]),
            "p_abs": _abs(ours["p"], ref["p"])}


def m_emmeans(m, spec, pairs, ddf, adjust):
    import lmevi

    return lmevi.emmeans(m, spec, pairs=pairs, ddf=ddf, adjust=adjust)


def emmeans_specs(name: str) -> list[str]:
    """The factors R's script computed emmeans for (``index.csv``'s ``emmeans``, ``;``-separated)."""
    row = index().set_index("name").loc[name]
    return [s for s in str(row["emmeans"] or "").split(";") if s]
