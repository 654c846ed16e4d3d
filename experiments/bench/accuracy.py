"""The benchmark's InstEval model, lme4's reference fit of it and the accuracy target.

Every method is timed to the same target: Pearson correlation of its conditional modes with lme4's REML
ones (``results/lme4/insteval/ranef_reml.csv``), joined by level label, of at least :data:`TARGET` per
grouping factor.
"""

from __future__ import annotations

import pandas as pd

from experiments.bench.harness import ROOT
from experiments.simulate import FACTORS  # the grouping factors of the model and of the simulated data
from lmevi.result.lme4ref import corr_with_lme4, join_by_label, read_fit, read_table, sd_by_group

FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"
LME4_DIR = ROOT / "results" / "lme4" / "insteval"
# accuracy target: Pearson correlation of conditional modes with lme4's REML ones, per grouping factor
TARGET = {"s": 0.999, "d": 0.99}


def lme4_ranef() -> pd.DataFrame:
    """lme4's REML conditional modes, ``grpvar, term, grp, condval, condsd``; labels kept as strings."""
    return read_table(LME4_DIR, "ranef", "reml")


def lme4_fit() -> dict:
    """lme4's saved REML fit of InstEval (``fit_reml.json``: theta, sigma, fit time, versions)."""
    return read_fit(LME4_DIR, "reml")


def lme4_sd() -> dict:
    """lme4's REML SDs by group (``s``, ``d``, ``dept``, ``Residual``) from ``varcorr_reml.csv``."""
    return sd_by_group(read_table(LME4_DIR, "varcorr", "reml")).to_dict()


def accuracy(ranef: pd.DataFrame, ref: pd.DataFrame) -> dict:
    """Correlation with lme4 per grouping factor, joined on ``grpvar, term, grp`` (level labels)."""
    both = join_by_label(ranef, ref, validate="one_to_one")
    out = {}
    for g in FACTORS:
        x = both[both["grpvar"] == g]
        out[g] = corr_with_lme4(x) if len(x) > 1 else float("nan")
    return out


def meets(acc: dict) -> bool:
    """Whether an :func:`accuracy` reaches :data:`TARGET` for every factor it names."""
    return all(acc.get(g, float("nan")) >= thr for g, thr in TARGET.items())


def fmt_acc(acc: dict | None) -> str:
    """``s 0.9991, d 0.9950, dept 0.9800`` (empty for a missing accuracy)."""
    if not acc:
        return ""
    return ", ".join(f"{g} {acc[g]:.4f}" for g in FACTORS if g in acc)
