"""Inference after the fit through the public API (``m.coef_table``, ``m.anova`` / ``lmevi.anova``, ``m.confint``,
``lmevi.emmeans``, ``m.contest``) against the committed R references (``results/lme4/inference/``: lme4 1.1-31,
lmerTest 3.1-3, pbkrtest 0.5.2, emmeans 1.8.4.1; see ``experiments/lme4_inference.R``).

Tier 3 only (the algorithms' own tiers are in test_satterthwaite, test_hypotheses, test_profile and
test_bootstrap). Each model is fitted once per module (REML, ``q="exact"``). The models: those whose lmevi and
lme4 optima agree closely enough for the targets to test the inference rather than the two optimisers (the
whole corpus is compared by ``python -m experiments.inference``, which reports every model and the size of
each difference; where the optima differ by more, e.g. ``igf`` and ``orthodont_agesex``, the dfs differ by up
to ~2e-3 relative there, and the experiment records it).

Tolerances (the targets): Satterthwaite df 1e-4 relative and p 1e-6 absolute; Kenward-Roger df 1e-3 relative;
type III F and dfs 1e-4 relative; profile interval ends 1 % of R's width; emmeans estimates 1e-6 relative
(of max(|estimate|, 1)) and dfs 1e-3 relative. SEs: 1e-4 relative (the two optima; lmerTest's vcov is lme4's).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import json
from pathlib import Path

import lmevi
from lmevi.frame.rdata import load_rdataset
from lmevi.result import lmertest_ref

ROOT = Path(__file__).resolve().parents[2]
REFS = ROOT / "results" / "lme4" / "inference"


class refs:  # noqa: N801 - the committed references, read through the library's comparisons
    """The committed R tables of one model, and lmevi's exact REML fit of that model's data (R's factor coding:
    ``factors`` of ``experiments/corpus_models.csv``, R's levels from the corpus reference run)."""

    @staticmethod
    def fit(name: str):
        index = pd.read_csv(REFS / "index.csv", keep_default_na=False, na_values=["NA"]).set_index("name")
        row = index.loc[name]
        models = pd.read_csv(ROOT / "experiments" / "corpus_models.csv", keep_default_na=False).set_index("name")
        factors = [c for c in (models.loc[name, "factors"] if name in models.index else "").split(";") if c]
        levels_path = ROOT / "results" / "lme4" / "corpus" / name / "levels.json"
        levels = (json.loads(levels_path.read_text()) or {}) if levels_path.exists() else {}
        data, _ = load_rdataset(row["r_package"], row["dataset"], row["subset"] or "", factors, levels)
        # missing="drop": R's na.action = na.omit
        return lmevi.fit(row["formula"], data, q="exact", reml=True, missing="drop", progress=False)

    @staticmethod
    def read(name, table):
        return lmertest_ref.read(REFS / name, table)

    @staticmethod
    def compare_coef(m, name, ddf):
        return lmertest_ref.compare_coef(m, REFS / name, ddf)

    @staticmethod
    def compare_anova(m, name, type, ddf):
        return lmertest_ref.compare_anova(m, REFS / name, type, ddf)

    @staticmethod
    def compare_profile(m, name):
        return lmertest_ref.compare_profile(m, REFS / name)

    @staticmethod
    def compare_emmeans(m, name, spec, ddf, pairs, adjust):
        return lmertest_ref.compare_emmeans(m, REFS / name, spec, ddf, pairs, adjust)

MODELS = ("sleepstudy", "penicillin", "pastes_nested", "ergostool", "machines", "cake_fm3", "npk", "oats_variety",
          "rail", "dyestuff")
# p: 1e-6 absolute (the target), except where the two optima alone move p by more: oats_variety's SEs differ
# from lmerTest's by 2.0e-6 relative (lme4's and lmevi's REML optima; the dfs agree to 5e-6), which moves its
# p values (about 0.1-0.5) by 1.0-1.5e-6.
P_TOL = {"oats_variety": 2e-6}
PROFILED = ("sleepstudy", "penicillin", "oats_variety")  # R's confint_profile, ~0.3 s each here


@pytest.fixture(scope="module")
def fits():
    return {name: refs.fit(name) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_satterthwaite_coef_table(fits, name):
    d = refs.compare_coef(fits[name], name, "satterthwaite")
    assert d["estimate_rel"] < 1e-6 and d["se_rel"] < 1e-4, d
    assert d["df_rel"] < 1e-4 and d["p_abs"] < P_TOL.get(name, 1e-6), d


@pytest.mark.parametrize("name", MODELS)
def test_kenward_roger_coef_table(fits, name):
    d = refs.compare_coef(fits[name], name, "kenward_roger")
    assert d["se_rel"] < 1e-4 and d["df_rel"] < 1e-3 and d["p_abs"] < P_TOL.get(name, 1e-6), d


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", [(3, "satterthwaite"), (1, "satterthwaite"), (3, "kenward_roger")],
                         ids=["type3", "type1", "type3-kr"])
def test_anova_tables(fits, name, kind):
    d = refs.compare_anova(fits[name], name, *kind)
    assert d["num_df_equal"], d
    tol = 1e-4 if kind[1] == "satterthwaite" else 1e-3
    assert d["F_rel"] < 1e-4 and d["den_df_rel"] < tol and d["p_abs"] < P_TOL.get(name, 1e-6), d


def test_one_model_anova_dispatch(fits):
    m = fits["npk"]
    pd.testing.assert_frame_equal(lmevi.anova(m), m.anova(type=3, ddf="satterthwaite"))
    assert list(lmevi.anova(m, type=1).index) == list(refs.read("npk", "anova_type1_satterthwaite").index)


@pytest.mark.parametrize("name", PROFILED)
def test_profile_intervals(fits, name):
    d = refs.compare_profile(fits[name], name)
    assert d["end_over_width"] < 0.01, d


def test_profile_row_names_and_wald_default(fits):
    m = fits["sleepstudy"]
    ci = m.confint(method="profile")
    assert list(ci.index) == ["sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject", "sd_Days|Subject", "sigma",
                              "(Intercept)", "Days"]
    ref = refs.read("sleepstudy", "confint_wald").dropna()
    wald = m.confint()  # the default stays Wald for the fixed effects
    np.testing.assert_allclose(wald.to_numpy(), ref.loc[wald.index].to_numpy(), rtol=1e-6)  # the two optima
    assert set(m.profile()[".par"]) == set(ci.index)


@pytest.mark.parametrize("case", [("oats_variety", "Variety"), ("npk", "N"), ("cake_fm3", "recipe"),
                                  ("machines", "Machine"), ("ergostool", "Type")])
@pytest.mark.parametrize("ddf", ["kr", "satterthwaite"])
def test_emmeans(fits, case, ddf):
    name, spec = case
    for pairs, adjust in ((False, "none"), (True, "none"), (True, "tukey")):
        d = refs.compare_emmeans(fits[name], name, spec, ddf, pairs, adjust)
        if d is None:
            continue
        assert d["estimate_rel"] < 1e-6 and d["df_rel"] < 1e-3 and d["se_rel"] < 1e-4, (pairs, adjust, d)
        assert d["p_abs"] < P_TOL.get(name, 1e-6), (pairs, adjust, d)


def test_emmeans_default_is_kenward_rogers_adjusted_covariance(fits):
    m = fits["oats_variety"]
    default, kr = lmevi.emmeans(m, "Variety"), lmevi.emmeans(m, "Variety", ddf="kenward_roger")
    pd.testing.assert_frame_equal(default, kr)


def test_contest_one_and_several_rows(fits):
    m = fits["sleepstudy"]
    one = m.contest([0.0, 1.0])
    row = m.coef_table().loc["Days"]
    np.testing.assert_allclose(one.loc[0, ["estimate", "std_error", "df", "t", "p"]].to_numpy(np.float64),
                               row.to_numpy(np.float64), rtol=1e-12)  # the same computation
    two = m.contest(np.eye(2))
    assert list(two.columns) == ["num_df", "den_df", "F", "p"] and two.loc[0, "num_df"] == 2
    series = m.contest(pd.Series({"Days": 1.0}))
    assert series.loc[0, "t"] == pytest.approx(row["t"], rel=1e-12)


def test_ddf_choices_and_refusals(fits):
    m = fits["sleepstudy"]
    res = m.coef_table("residual")
    assert (res["df"] == 180 - 2).all()
    z = m.coef_table(None)
    assert np.isinf(z["df"]).all() and "z tests" in z.attrs["note"]
    with pytest.raises(ValueError, match="ddf must be one of"):
        m.coef_table("containment")
    v = lmevi.fit("Reaction ~ Days + (Days | Subject)", m.data, q="structured", reml=True, progress=False)
    with pytest.raises(ValueError, match="lme4's exact"):
        v.coef_table("satterthwaite")
    table = v.coef_table()
    assert np.isinf(table["df"]).all() and "approximate" in table.attrs["note"]
    assert "no denominator df" in table.attrs["note"] and "approximate posterior" in v.summary()


def test_summary_prints_lmertests_table(fits):
    text = fits["sleepstudy"].summary()
    assert "Pr(>|t|)" in text and "Satterthwaite" in text
    row = [line for line in text.splitlines() if line.strip().startswith("Days")][-1]
    assert "17.00" in row  # lmerTest: df 17.00 (two decimals)
