"""lme4's saved fits, read back, and estimates compared with them by level label.

``experiments/lme4_reference.R`` (InstEval) and ``experiments/lme4_corpus.R`` (the model corpus) write one
folder per data set with, for each kind of fit (``reml`` or ``ml``): ``fit_<kind>.json`` (theta, sigma,
log-likelihood, timing, versions, or an ``error``), ``fixef_<kind>.csv``, ``varcorr_<kind>.csv``
(``as.data.frame(VarCorr(m))``) and, where written, ``ranef_<kind>.csv`` (``grpvar, term, grp, condval,
condsd``) and ``fitted_<kind>.csv``.

Random effects are compared by joining on ``grpvar, term, grp`` (level labels, kept as strings), never
by row position. Used by ``benchmark.py`` (through ``bench``), ``corpus.py`` and ``insteval_report.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

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
