"""The R-to-formulaic translation (tier 1) and the R-style formulas it enables, end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import lmevi
from lmevi.frame.formula import parse_formula
from lmevi.frame.rsyntax import lme4_name, required_columns, to_formulaic


@pytest.mark.parametrize(
    "r,py",
    [
        ("I(x^2)", "I(x**2)"),
        ("log.NIF + x", "`log.NIF` + x"),
        ("as.factor(g)", "factor(g)"),
        ("ordered(Time)", "C(Time, contr.poly)"),
        ("(a + b)^2", "(a + b)**2"),
        ("I(age - 11)", "I(age - 11)"),
    ],
)
def test_to_formulaic(r, py):
    assert to_formulaic(r) == py


@pytest.mark.parametrize(
    "name,lme4",
    [
        ("Intercept", "(Intercept)"),
        ("Sex[T.Male]", "SexMale"),
        ("I(x ** 2)", "I(x^2)"),
        ("factor(age)[T.10]", "factor(age)10"),
        ("C(Time, contr.poly)[.L]", "ordered(Time).L"),
        ("C(Time, contr.poly)[^4]", "ordered(Time)^4"),
        ("f[b]:x", "fb:x"),
    ],
)
def test_lme4_name(name, lme4):
    assert lme4_name(name) == lme4


def test_required_columns_keeps_dotted_names_and_drops_functions():
    assert required_columns("IQ.ver.cen + avg.IQ.ver.cen") == {"IQ.ver.cen", "avg.IQ.ver.cen"}
    assert required_columns("sin(2*pi*Time) + sqrt(x) + factor(g)") == {"Time", "x", "g"}


@pytest.mark.parametrize("expr", ["offset(log(n))", "poly(x, 2)", "ns(x, 3)"])
def test_unsupported_constructs_are_named(expr):
    with pytest.raises(ValueError, match=expr.split("(")[0]):
        to_formulaic(expr)


def test_bare_bar_is_one_random_term():
    f = parse_formula("Yield ~ 1|Batch")
    assert f.fixed == "1" and len(f.random) == 1 and f.random[0].group == ("Batch",)


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(7)
    n, J = 400, 25
    g = rng.integers(0, J, n)
    b = rng.normal(0, 0.5, J)
    x = rng.uniform(1, 5, n)
    df = pd.DataFrame({"x.val": x, "g": g, "k": rng.integers(1, 4, n)})
    df["y"] = np.exp(0.3 + 0.2 * x - 0.02 * x**2 + b[g] + rng.normal(0, 0.1, n))
    return df


def test_transformations_fit_and_read_as_lme4_names(frame):
    m = lmevi.fit("log(y) ~ x.val + I(x.val^2) + factor(k) + (1 | g)", frame, progress=False)
    assert list(m.fixef().index) == ["(Intercept)", "x.val", "I(x.val^2)", "factor(k)2", "factor(k)3"]
    # the simulated coefficients, to a few standard errors (400 rows, noise SD 0.1)
    assert m.fixef()["x.val"] == pytest.approx(0.2, abs=0.05)
    assert m.fixef()["I(x.val^2)"] == pytest.approx(-0.02, abs=0.01)
    # predictions evaluate the same transformations on new rows (on the log scale)
    pred = m.predict(frame.iloc[:5])
    assert np.allclose(pred, m.fitted[:5], atol=1e-8)


def test_rank_deficient_columns_are_dropped_with_a_warning(frame):
    df = frame.assign(x2=2 * frame["x.val"])
    with pytest.warns(UserWarning, match="rank deficient.*x2"):
        m = lmevi.fit("y ~ x.val + x2 + (1 | g)", df, progress=False)
    assert "x2" not in m.fixef().index
    assert np.isnan(m.fixef(add_dropped=True)["x2"])
    assert m.info.dropped_fixed == ("x2",)


def test_missing_values_raise_or_drop(frame):
    df = frame.copy()
    df.loc[[3, 10], "x.val"] = np.nan
    df.loc[5, "y"] = np.inf
    with pytest.raises(ValueError, match=r"3 row\(s\).*missing='drop'") as err:
        lmevi.fit("y ~ x.val + (1 | g)", df, progress=False)
    assert "'x.val': 2" in str(err.value) and "'y': 1" in str(err.value)
    with pytest.warns(UserWarning, match="dropped 3 of 400 rows"):
        m = lmevi.fit("y ~ x.val + (1 | g)", df, missing="drop", progress=False)
    assert m.info.n_obs == 397
    assert list(m.info.rows) == [i for i in df.index if i not in (3, 5, 10)]  # caller's order kept
    # a column the formula does not use may hold NA
    m2 = lmevi.fit("y ~ k + (1 | g)", df.assign(y=frame["y"]), progress=False)
    assert m2.info.n_obs == 400


def test_scale_warning_and_convergence(frame):
    df = frame.assign(big=frame["x.val"] * 1e5)
    with pytest.warns(UserWarning, match="very different scales"):
        m = lmevi.fit("y ~ big + k + (1 | g)", df, progress=False)
    ref = lmevi.fit("y ~ x.val + k + (1 | g)", frame, progress=False)
    # the same model in other units: slopes differ by exactly the unit change (to the stop rule, 1e-6)
    assert m.fixef()["big"] * 1e5 == pytest.approx(ref.fixef()["x.val"], rel=1e-6)
    assert m.converged


@pytest.mark.parametrize(
    "formula,match",
    [
        ("y ~ x.val + (1 | unit)", "as many levels"),
        ("y ~ 1 + (1 + x.val | half)", "random effects for"),
    ],
)
def test_identifiability_errors(frame, formula, match):
    df = frame.assign(unit=np.arange(len(frame)), half=np.arange(len(frame)) // 2)
    with pytest.raises(ValueError, match=match):
        lmevi.fit(formula, df, progress=False)


def test_constant_response_is_an_error(frame):
    with pytest.raises(ValueError, match="constant"):
        lmevi.fit("y ~ 1 + (1 | g)", frame.assign(y=3.0), progress=False)


def test_perfectly_correlated_slopes_are_a_singular_fit():
    """Intercepts and slopes that are one effect (slope = intercept for every group): the covariance of
    ``(1 + x | g)`` has rank one, lme4 reports a singular fit, and lmevi's rule (a relative Cholesky
    diagonal below 1e-3) must too, naming the slope and the correlation near +1."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(30), 12)
    x = np.tile(np.linspace(-1.0, 1.0, 12), 30)
    b = rng.normal(0.0, 1.0, 30)
    df = pd.DataFrame({"g": g, "x": x, "y": 2.0 + b[g] + b[g] * x + rng.normal(0.0, 0.3, g.size)})
    with pytest.warns(lmevi.SingularFitWarning, match="correlation of \\(Intercept\\) and x"):
        m = lmevi.fit("y ~ x + (1 + x | g)", df, progress=False)
    vc = m.varcorr()
    assert vc[vc["var2"].notna()]["sdcor"].iloc[0] > 0.999


def test_lme4_singular_rule_catches_a_small_relative_cholesky_entry(crossed_fit):
    """lme4's rule on its own: a slope SD of 0.5 % of sigma correlated 0.99 with the intercept is neither a
    zero SD nor a +-1 correlation at tol 1e-3, but its relative Cholesky entry is 0.005 * sqrt(1 - 0.99^2)
    = 7e-4: singular. At 0.97 correlation the entry is 1.2e-3 and nothing is flagged."""
    import dataclasses

    def with_slope(corr):
        sig = float(crossed_fit.params.model.sigma)
        sd0, sd1 = 1.0 * sig, 0.005 * sig
        L = np.array([[sd0, 0.0], [corr * sd1, sd1 * np.sqrt(1.0 - corr**2)]])
        chol = (L, *crossed_fit.params.model.chol[1:])
        model = crossed_fit.params.model._replace(chol=chol)
        return dataclasses.replace(crossed_fit, params=crossed_fit.params._replace(model=model))

    msgs = with_slope(0.99).singular()
    assert len(msgs) == 1 and "linear combination" in msgs[0] and "'g'" in msgs[0]
    assert with_slope(0.97).singular() == []


def test_singular_fit_warns():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"g": np.repeat(np.arange(10), 20), "y": rng.normal(size=200)})  # no group effect at all
    with pytest.warns(lmevi.SingularFitWarning, match="near zero") as caught:
        m = lmevi.fit("y ~ 1 + (1 | g)", df, progress=False, reml=False)
    assert m.singular()
    # it points at the user's call, not at one of lmevi's decorators
    assert {w.filename for w in caught} == {__file__}


def test_input_warnings_point_at_the_users_line(frame):
    df = frame.assign(big=frame["x.val"] * 1e5)
    with pytest.warns(UserWarning, match="very different scales") as caught:
        lmevi.build_model("y ~ big + k + (1 | g)", df)
    assert [w.filename for w in caught if "scales" in str(w.message)] == [__file__]


def test_boundary_under_an_approximate_structured_q_names_the_factor_and_the_remedy(crossed_fit):
    """A structured q with more than one block is an approximation: a variance at zero there may be the
    approximation's, and the warning says so, naming the factor and q='exact'."""
    import dataclasses

    from lmevi.result import checks

    from lmevi.q import layout
    sig = float(crossed_fit.params.model.sigma)
    chol = (np.diag([1e-6 * sig, 1e-6 * sig]), *crossed_fit.params.model.chol[1:])
    model = crossed_fit.params.model._replace(chol=chol)
    two_blocks = layout.meanfield_spec(crossed_fit.info, reml=True)
    approx = dataclasses.replace(crossed_fit, spec=two_blocks, params=crossed_fit.params._replace(model=model))
    assert approx.options.q == "structured" and not approx.exact
    with pytest.warns(lmevi.SingularFitWarning, match="'g'.*q='exact'"):
        checks.warn_singular(approx)
    exact_one_block = dataclasses.replace(approx, spec=crossed_fit.spec)
    assert exact_one_block.exact
    with pytest.warns(lmevi.SingularFitWarning) as caught:
        checks.warn_singular(exact_one_block)
    assert all("q='exact'" not in str(w.message) for w in caught)
