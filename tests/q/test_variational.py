"""Variational families: block choice, moments of q against its dense covariance, and what q can recover."""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import lmevi
from conftest import simulate_small_parts
from dense import block_coordinates, coordinates, dense_design, dense_q, make_problem, random_params
from lmevi.q import variational
from lmevi.q import moments
from lmevi.q import layout
from lmevi.families.gaussian import GAUSSIAN
from lmevi.q.layout import Block

block_data = jax.jit(moments.block_data, static_argnames="spec")


@partial(jax.jit, static_argnames="spec")
def summary_of_q(design, spec, blocks, data):
    """Every moment of q that :mod:`lmevi.q.variational` computes, in one compiled call per family."""
    terms = range(len(spec.n_levels))
    out = {
        "rows": moments.row_moments(design, spec, blocks, data),
        "terms": [moments.term_moments(spec, blocks, k) for k in terms],
        "entropy": variational.entropy(spec, blocks),
    }
    if spec.reml:
        out["terms_given_beta"] = [moments.term_moments(spec, blocks, k, given_beta=True) for k in terms]
        out["fixed"] = moments.fixed_moments(spec, blocks)
    return out


def summarise(problem, spec, params):
    return summary_of_q(problem.design, spec, params.blocks, block_data(problem.design, spec))


def simulate_nested(seed: int, n_outer: int, per_outer: int, rows: int, sd_outer: float, sd_inner: float, sigma: float):
    """``y = 1 + a_outer + b_inner + e`` with ``per_outer`` inner levels inside each outer level."""
    rng = np.random.default_rng(seed)
    outer = np.repeat(np.arange(n_outer), per_outer * rows)
    inner = np.repeat(np.arange(n_outer * per_outer), rows)
    a = rng.normal(0.0, sd_outer, n_outer)
    b = rng.normal(0.0, sd_inner, n_outer * per_outer)
    y = 1.0 + a[outer] + b[inner] + rng.normal(0.0, sigma, outer.size)
    frame = pd.DataFrame({"y": y, "outer": outer, "inner": inner})
    return frame, a


@pytest.fixture(scope="module")
def nested_and_crossed():
    """``inner`` (60 levels) nested in ``outer`` (5 levels), and ``other`` (60 levels) crossed with both."""
    frame, _ = simulate_nested(3, n_outer=5, per_outer=12, rows=4, sd_outer=1.0, sd_inner=0.5, sigma=0.5)
    frame["other"] = np.random.default_rng(4).permutation(np.resize(np.arange(60), len(frame)))
    return make_problem(frame, "y ~ 1 + (1 | outer) + (1 | inner) + (1 | other)")


# ----------------------------------------------------------------------------------------------------
# Choosing the blocks


@pytest.mark.parametrize("reml", [False, True])
def test_meanfield_gives_every_term_its_own_block(crossed, reml):
    spec = layout.meanfield_spec(crossed.info, reml)
    want = (Block(large=0), Block(large=1)) + ((Block(large=None, fixed=True),) if reml else ())
    assert spec.blocks == want
    assert (spec.n_levels, spec.n_coefs, spec.n_fixed, spec.reml) == ((6, 4), (2, 1), 2, reml)


@pytest.mark.parametrize("reml", [False, True])
def test_structured_without_large_terms_is_one_dense_block(crossed, reml):
    spec = layout.structured_spec(crossed.design, crossed.info, reml)
    assert spec.blocks == (Block(large=None, small=(0, 1), fixed=reml),)


def test_entanglement_is_one_for_nesting_and_less_for_crossing(nested_and_crossed):
    design = nested_and_crossed.design  # terms: 0 outer, 1 inner, 2 other
    assert layout.entanglement(design, small=0, large=1) == 1.0  # exact: every inner level sits in one outer
    assert layout.entanglement(design, small=0, large=2) < 0.6


@pytest.mark.parametrize("reml", [False, True])
def test_structured_puts_a_small_term_with_the_large_term_it_is_nested_in(nested_and_crossed, reml):
    p = nested_and_crossed
    spec = layout.structured_spec(p.design, p.info, reml)
    assert spec.blocks == (Block(large=1, small=(0,), fixed=reml), Block(large=2))


def test_a_small_term_nesting_two_large_terms_joins_the_smaller(nested_and_crossed):
    """``outer`` nests ``inner`` (share 1) and, nearly, ``mid`` (30 levels, a few rows astray): it joins the
    smaller ``mid`` (its block's dense part is cheaper, and the count against ``inner`` is not needed),
    though ``inner``'s share is the higher."""
    frame = nested_and_crossed.frame.copy()
    rng = np.random.default_rng(5)
    mid = frame["outer"].to_numpy() * 6 + rng.integers(0, 6, len(frame))
    astray = rng.random(len(frame)) < 0.02
    mid[astray] = rng.integers(0, 30, astray.sum())
    frame["mid"] = mid
    p = make_problem(frame, "y ~ 1 + (1 | outer) + (1 | inner) + (1 | mid)")  # terms: 0 outer, 1 inner, 2 mid
    share_mid = layout.entanglement(p.design, small=0, large=2)
    assert layout.NEST_SHARE <= share_mid < 1.0 == layout.entanglement(p.design, small=0, large=1)
    spec = layout.structured_spec(p.design, p.info, False, small_threshold=20)
    assert spec.blocks == (Block(large=1), Block(large=2, small=(0,)))


def test_user_blocks(crossed):
    spec = layout.structured_spec(crossed.design, crossed.info, True, small_threshold=5, blocks=[("h",), ("g",)])
    # "h" is small so it forms a block without a large term; beta, not named, gets a block of its own
    assert spec.blocks == (Block(large=None, small=(1,)), Block(large=0), Block(large=None, fixed=True))
    spec = layout.structured_spec(crossed.design, crossed.info, True, small_threshold=5, blocks=[("g", "h", "fixed")])
    assert spec.blocks == (Block(large=0, small=(1,), fixed=True),)


@pytest.mark.parametrize(
    "blocks, reml, message",
    [
        ([("g", "zzz")], True, "zzz"),
        ([("g",), ("g", "h")], True, "twice"),
        ([("g", "h")], True, "one large"),  # with small_threshold=1 both terms are large
        ([("g", "fixed")], False, "reml=True"),
    ],
)
def test_user_blocks_errors_name_the_problem(crossed, blocks, reml, message):
    threshold = 1 if message == "one large" else 5
    with pytest.raises(ValueError, match=message):
        layout.structured_spec(crossed.design, crossed.info, reml, small_threshold=threshold, blocks=blocks)


# ----------------------------------------------------------------------------------------------------
# Design-only arrays


def test_block_data_matches_dense_cross_products(crossed):
    spec = layout.structured_spec(crossed.design, crossed.info, True, small_threshold=5)
    (bd,) = block_data(crossed.design, spec)
    Z_L, W = crossed.Z[0], np.concatenate([crossed.Z[1], crossed.X], axis=1)  # W = [Z_h, X]
    J, p = 6, 2
    assert bd.ZtZ.shape == (J, p, p) and bd.ZtW.shape == (J, p, 6) and bd.WtW.shape == (6, 6)
    assert not hasattr(bd, "W")  # the (n_obs, p_w) small-part design is never formed
    # exact 0/1 and O(1) entries, sums of <= 60 products: 1e-12 absolute
    ZtZ, ZtW = Z_L.T @ Z_L, Z_L.T @ W
    for j in range(J):
        rows = slice(j * p, (j + 1) * p)
        np.testing.assert_allclose(bd.ZtZ[j], ZtZ[rows, rows], rtol=0, atol=1e-12)
        np.testing.assert_allclose(bd.ZtW[j], ZtW[rows], rtol=0, atol=1e-12)
    np.testing.assert_allclose(bd.WtW, W.T @ W, rtol=0, atol=1e-12)
    assert np.all(ZtZ[np.abs(np.subtract.outer(np.arange(J * p) // p, np.arange(J * p) // p)) > 0] == 0.0)


# Gathered small parts against a dense one-hot W written here: several small terms, a slope in a small term,
# beta in the block, with and without a large term


SMALL_PARTS_FORMULA = "y ~ x + (1 + x | g) + (1 + x | a) + (1 | b)"




@pytest.fixture(scope="module")
def small_parts():
    """The design in float64, and two specs: beta and both small terms in g's block; and a block of the
    small terms and beta alone (no large term), g in its own."""
    with jax.enable_x64(True):
        problem = make_problem(simulate_small_parts(), SMALL_PARTS_FORMULA)
        with_large = layout.structured_spec(problem.design, problem.info, True, small_threshold=12)
        without_large = layout.structured_spec(
            problem.design, problem.info, True, small_threshold=12, blocks=[("a", "b", "fixed"), ("g",)]
        )
    assert with_large.blocks == (Block(large=0, small=(1, 2), fixed=True),)
    assert without_large.blocks == (Block(large=None, small=(1, 2), fixed=True), Block(large=0))
    return problem, with_large, without_large


def dense_small_design(problem, spec, block) -> np.ndarray:
    """``W`` ``(n_obs, p_w)`` one row at a time: each small term's covariates in its level's slots, then ``x_i``."""
    n = len(problem.frame)
    cols = []
    for k in block.small:
        codes = np.asarray(problem.design.terms[k].index)
        z = np.asarray(problem.design.terms[k].covariates)
        J, p = spec.n_levels[k], spec.n_coefs[k]
        Wk = np.zeros((n, J * p))
        for i in range(n):
            Wk[i, codes[i] * p : (codes[i] + 1) * p] = z[i]
        cols.append(Wk)
    if block.fixed:
        cols.append(problem.X)
    return np.concatenate(cols, axis=1)


@pytest.mark.parametrize("which", ["with-large", "without-large"])
def test_small_part_cross_products_match_dense_one_hot(small_parts, which):
    problem, with_large, without_large = small_parts
    spec = with_large if which == "with-large" else without_large
    with jax.enable_x64(True):
        data = block_data(problem.design, spec)
        r = np.random.default_rng(0).normal(size=len(problem.frame))
        block = spec.blocks[0]
        W = dense_small_design(problem, spec, block)
        assert W.shape[1] == spec.small_size(block) == 6 + 4 + 2
        bd = data[0]
        # sums of <= 90 products of O(1) numbers: 1e-12 absolute covers float64 rounding
        np.testing.assert_allclose(bd.WtW, W.T @ W, rtol=0, atol=1e-12)
        got_wtr = jax.jit(moments.small_crossprod, static_argnums=(1, 2))(problem.design, spec, block, r)
        np.testing.assert_allclose(got_wtr, W.T @ r, rtol=0, atol=1e-12)
        if block.large is None:
            assert bd.ZtZ is None and bd.ZtW is None
            return
        Z = problem.Z[0]  # (n, 9 * 2), level-major
        ZtW = (Z.T @ W).reshape(9, 2, -1)
        np.testing.assert_allclose(bd.ZtW, ZtW, rtol=0, atol=1e-12)
        ZtZ = np.stack([(Z.T @ Z)[2 * j : 2 * j + 2, 2 * j : 2 * j + 2] for j in range(9)])
        np.testing.assert_allclose(bd.ZtZ, ZtZ, rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["with-large", "without-large"])
def test_gathered_row_moments_match_dense_one_hot(small_parts, which):
    """Per-row mean and variance of each block against ``W`` built densely here:
    ``Var(eta_i) = |T_g^T z_i|^2 + (K_g^T z_i + w_i)^T U U^T (K_g^T z_i + w_i)``; and the variances' sum
    from the cross-products alone (:func:`lmevi.q.moments.row_var_sum`)."""
    problem, with_large, without_large = small_parts
    spec = with_large if which == "with-large" else without_large
    with jax.enable_x64(True):
        params = random_params(7, spec)
        data = block_data(problem.design, spec)
        per_block = jax.jit(moments.block_row_moments, static_argnums=1)
        want_mean, want_var = np.zeros(len(problem.frame)), np.zeros(len(problem.frame))
        for block, bp, bd in zip(spec.blocks, params.blocks, data):
            mean, var = np.zeros(len(problem.frame)), np.zeros(len(problem.frame))
            c = 0.0
            if block.large is not None:
                codes = np.asarray(problem.design.terms[block.large].index)
                z = np.asarray(problem.design.terms[block.large].covariates)
                T = np.asarray(bp.chol_large)[codes]
                mean += np.einsum("np,np->n", z, np.asarray(bp.loc_large)[codes])
                var += np.sum(np.einsum("np,npq->nq", z, T) ** 2, axis=1)
                if bp.coupling is not None:
                    c = np.einsum("np,npw->nw", z, np.asarray(bp.coupling)[codes])
            if bp.loc_small is not None:
                W = dense_small_design(problem, spec, block)
                U = np.asarray(bp.chol_small)
                mean += W @ np.asarray(bp.loc_small)
                var += np.einsum("nw,wv,nv->n", c + W, U @ U.T, c + W)
            got_mean, got_var = per_block(problem.design, block, bp, bd)
            # quadratic forms of O(1) numbers over <= 30 coordinates: 1e-10 absolute covers float64 rounding
            np.testing.assert_allclose(got_mean, mean, rtol=0, atol=1e-10)
            np.testing.assert_allclose(got_var, var, rtol=0, atol=1e-10)
            want_mean, want_var = want_mean + mean, want_var + var
        mean, var = jax.jit(moments.row_moments, static_argnums=1)(problem.design, spec, params.blocks, data)
        np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(var, want_var, rtol=0, atol=1e-10)
        var_sum = jax.jit(moments.row_var_sum, static_argnums=0)(spec, params.blocks, data)
        # a sum of 90 variances of size ~1-10 by traces instead of rows: 1e-12 relative
        assert float(var_sum) == pytest.approx(want_var.sum(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Moments of q against its dense covariance (random block parameters, coupling included)


def test_row_moments_match_dense(crossed, family_spec):
    params = random_params(0, family_spec)
    mean, cov = dense_q(family_spec, params.blocks)
    A = dense_design(crossed, family_spec)
    got_mean, got_var = summarise(crossed, family_spec, params)["rows"]
    # quadratic forms of O(1) numbers over <= 30 coordinates: 1e-10 absolute covers float64 rounding
    np.testing.assert_allclose(got_mean, A @ mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got_var, np.einsum("nd,de,ne->n", A, cov, A), rtol=0, atol=1e-10)


def test_term_and_fixed_moments_match_dense(crossed, family_spec):
    params = random_params(1, family_spec)
    mean, cov = dense_q(family_spec, params.blocks)
    slices, beta, _ = coordinates(family_spec)
    summary = summarise(crossed, family_spec, params)
    for k, s in enumerate(slices):
        J, p = family_spec.n_levels[k], family_spec.n_coefs[k]
        m, c = summary["terms"][k]
        np.testing.assert_allclose(m, mean[s].reshape(J, p), rtol=0, atol=1e-12)  # copies: rounding only
        want = np.stack([cov[s, s][j * p : (j + 1) * p, j * p : (j + 1) * p] for j in range(J)])
        np.testing.assert_allclose(c, want, rtol=0, atol=1e-12)  # products of O(1) factors: rounding only
    if family_spec.reml:
        m, c = summary["fixed"]
        np.testing.assert_allclose(m, mean[beta], rtol=0, atol=1e-12)
        np.testing.assert_allclose(c, cov[beta, beta], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family_spec", ["meanfield-reml", "arrowhead-reml", "dense-reml"], indirect=True)
def test_covariance_given_beta_is_the_gaussian_conditional(crossed, family_spec):
    """``Cov(b | beta) = C_bb - C_b,beta C_beta,beta^{-1} C_beta,b`` (what lme4's condVar reports)."""
    params = random_params(2, family_spec)
    _, cov = dense_q(family_spec, params.blocks)
    slices, beta, _ = coordinates(family_spec)
    cond = cov - cov[:, beta] @ np.linalg.solve(cov[beta, beta], cov[beta, :])
    summary = summarise(crossed, family_spec, params)
    for k, s in enumerate(slices):
        J, p = family_spec.n_levels[k], family_spec.n_coefs[k]
        _, c = summary["terms_given_beta"][k]
        want = np.stack([cond[s, s][j * p : (j + 1) * p, j * p : (j + 1) * p] for j in range(J)])
        np.testing.assert_allclose(c, want, rtol=0, atol=1e-10)  # one small solve: 1e-10 absolute


def test_entropy_matches_dense_log_determinant(crossed, family_spec):
    params = random_params(3, family_spec)
    _, cov = dense_q(family_spec, params.blocks)
    got = float(summarise(crossed, family_spec, params)["entropy"])
    # log-determinant of a ~30 x 30 matrix by LU vs by triangular factors: 1e-10 relative
    assert got == pytest.approx(0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1], rel=1e-10)


@pytest.mark.parametrize("family_spec", ["arrowhead-reml"], indirect=True)
def test_draws_have_the_moments_of_q(family_spec):
    params = random_params(4, family_spec)
    mean, cov = dense_q(family_spec, params.blocks)
    slices, beta, _ = coordinates(family_spec)
    num = 20_000

    def flat(key):
        effects, b = variational.sample(key, family_spec, params.blocks)
        return jnp.concatenate([e.reshape(-1) for e in effects] + [b])

    draws = np.asarray(jax.jit(jax.vmap(flat))(jax.random.split(jax.random.PRNGKey(0), num)))
    assert draws.shape == (num, mean.size)
    sd = np.sqrt(np.diag(cov))
    # Gaussian draws: the sample mean has SD sd/sqrt(S); a sample covariance entry has SD
    # sqrt((C_ii C_jj + C_ij^2) / S). 5 SDs over ~200 entries leaves a false-alarm chance below 1e-4.
    assert np.all(np.abs(draws.mean(axis=0) - mean) < 5 * sd / np.sqrt(num))
    se_cov = np.sqrt((np.outer(sd**2, sd**2) + cov**2) / num)
    assert np.all(np.abs(np.cov(draws, rowvar=False) - cov) < 5 * se_cov)


# ----------------------------------------------------------------------------------------------------
# Parameterisation


@pytest.mark.parametrize("family_spec", ["arrowhead-reml"], indirect=True)  # every kind of Cholesky factor
def test_unconstrained_round_trip(family_spec):
    params = random_params(5, family_spec)
    back = jax.jit(lambda p: variational.to_constrained(variational.to_unconstrained(p), fixed_sigma=None))(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)  # exp(log x), softplus(softplus^-1 x): rounding
    fixed = jax.jit(lambda p: variational.to_constrained(variational.to_unconstrained(p), fixed_sigma=1.0))(params)
    assert float(fixed.model.sigma) == 1.0


@pytest.mark.parametrize("family_spec", ["meanfield-reml", "arrowhead-reml"], indirect=True)
def test_init_params_shapes_follow_the_spec(crossed, family_spec):
    init = jax.jit(variational.init_params, static_argnums=(1, 2))(crossed.design, family_spec, GAUSSIAN, None)
    for block, bp in zip(family_spec.blocks, init.blocks):
        large, small = block_coordinates(family_spec, block)
        got_large = 0 if bp.loc_large is None else bp.loc_large.size
        got_small = 0 if bp.loc_small is None else bp.loc_small.shape[0]
        assert (got_large, got_small) == (large.size, small.size)
    assert (init.model.beta is None) == family_spec.reml
    assert all(L.shape == (p, p) for L, p in zip(init.model.chol, family_spec.n_coefs))


# ----------------------------------------------------------------------------------------------------
# Tier 3: what each family recovers on nested data


@pytest.fixture(scope="module")
def nested_fits():
    """40 outer levels (SD 0.45), 10 inner levels in each (SD 1), 4 rows per inner level, sigma 0.5.

    Under mean-field q the posterior variance of an outer effect ignores its coupling to the inner effects
    and is tiny (40 rows each), so the M-step for the outer variance ``s`` is about
    ``s <- (s / (s + c))^2 (S + c)``: ``S`` the true variance and ``c = (sd_inner^2 + sigma^2 / rows) /
    per_outer = 0.106`` the noise variance of an outer level's mean. Its only non-zero fixed point needs
    ``S >= 3c = 0.32``; here ``S = 0.2``, so the outer SD must collapse to zero under mean-field, while the
    structured (here exact) q is unaffected.
    """
    frame, outer_effects = simulate_nested(0, n_outer=40, per_outer=10, rows=4, sd_outer=0.45, sd_inner=1.0, sigma=0.5)
    formula = "y ~ 1 + (1 | outer) + (1 | inner)"
    with pytest.warns(lmevi.SingularFitWarning, match="'outer'.*meanfield"):
        meanfield = lmevi.fit(formula, frame, q="meanfield", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no singular-fit or convergence warning
        structured = lmevi.fit(formula, frame, q="structured", progress=False)
    return meanfield, structured, np.std(outer_effects, ddof=1)


def test_meanfield_collapses_a_nested_outer_factor_and_structured_recovers_it(nested_fits):
    meanfield, structured, realized = nested_fits
    assert structured.spec.blocks == (Block(large=1, small=(0,), fixed=True),)  # q exact
    sd_mf, sd_st = meanfield.sd()["outer"], structured.sd()["outer"]
    # REML estimate of the outer variance from 40 levels whose means carry noise c = 0.106: standard
    # error ~ sqrt((2 c^2 + 4 S c) / 40) = 0.052 on S = 0.2, i.e. ~13% on the SD. 40% is 3 such errors.
    assert sd_st == pytest.approx(realized, rel=0.4)
    # collapsed: measured 4e-4, against a realised SD of 0.36
    assert sd_mf < 0.05 * realized
    # the collapse is the outer factor's alone: both families agree on the residual SD (measured 0.06%)
    assert meanfield.sd()["Residual"] == pytest.approx(structured.sd()["Residual"], rel=0.01)


def _schools(n_schools: int = 80, teachers_per_school: int = 6, rows_per_teacher: int = 12, seed: int = 2):
    """Teachers nested in schools, both large (480 and 80 levels), as the education data of lme4's users:
    ``y ~ 1 + (1 | tch) + (1 | sch)`` with a school SD of 1 and a teacher SD of 0.5."""
    rng = np.random.default_rng(seed)
    n_tch = n_schools * teachers_per_school
    tch = np.repeat(np.arange(n_tch), rows_per_teacher)
    sch = tch // teachers_per_school
    y = 1.0 + rng.normal(size=n_schools)[sch] + 0.5 * rng.normal(size=n_tch)[tch] + rng.normal(size=len(tch))
    return pd.DataFrame({"y": y, "tch": tch, "sch": sch})


def test_nesting_is_never_split_between_blocks():
    """80 schools are more than ``small_threshold`` coefficients, yet they nest the teachers: they join the
    teachers' block, q is then the exact posterior (one block), and the school SD is lme4's, where a block of
    its own drained it. Both fits converge to 1e-10 relative ELBO change: 1e-5 relative on the SDs."""
    frame = _schools()
    model = lmevi.build_model("y ~ 1 + (1 | tch) + (1 | sch)", frame, q="structured")
    assert [(b.large, b.small) for b in model.spec.blocks] == [(0, (1,))]
    structured = lmevi.fit("y ~ 1 + (1 | tch) + (1 | sch)", frame, q="structured", progress=False)
    exact = lmevi.fit("y ~ 1 + (1 | tch) + (1 | sch)", frame, q="exact", progress=False)
    assert structured.exact
    np.testing.assert_allclose(structured.sd(), exact.sd(), rtol=1e-5)
    # a parent above NESTED_MAX coefficients keeps a block of its own (its dense part would cost J p_w^2)
    big = _schools(n_schools=layout.NESTED_MAX + 10, teachers_per_school=2, rows_per_teacher=4)
    spec = lmevi.build_model("y ~ 1 + (1 | tch) + (1 | sch)", big, q="structured").spec
    assert sorted(b.large for b in spec.blocks if b.large is not None) == [0, 1]


def _cancelling_rows(n: int = 1 << 21, seed: int = 0):
    """float32 residual-like rows whose sum cancels (large terms of both signs, a small true total), a
    two-column design and 14 levels: what a float32 fit's sums over 10^7 rows look like."""
    rng = np.random.default_rng(seed)
    signs = rng.permutation(np.repeat([-1.0, 1.0], n // 2))  # as many of each: the 100s cancel exactly
    r = (signs * 100.0 + rng.normal(size=n)).astype(np.float32)
    X = np.stack([np.ones(n), rng.random(n)], axis=1).astype(np.float32)
    index = rng.integers(0, 14, n).astype(np.int32)
    return r, X, index


def test_float32_sums_over_rows_accumulate_in_float64():
    """X^T r and per-level sums of float32 rows equal the float64 sums of the same float32 numbers to 1e-6
    relative (float32's own rounding of the result, and of each product ``r_i x_i`` in X^T r), returned as
    float32. Accumulated in float32, as XLA's
    CPU dot and segment sum do, they are off by more than 1e-4 here (checked below, so the data do cancel)."""
    r, X, index = _cancelling_rows()
    exact_dot = r.astype(np.float64) @ X.astype(np.float64)
    exact_levels = np.bincount(index, r.astype(np.float64), minlength=14)
    with jax.enable_x64(True):
        rj, Xj, ij = jnp.asarray(r), jnp.asarray(X), jnp.asarray(index)
        dot = jax.jit(lmevi.runtime.precision.row_dot)(rj, Xj)
        levels = jax.jit(moments.weighted_level_sums, static_argnums=(3, 4))(Xj[:, :1], rj, ij, 14, True)
        naive = np.asarray(jax.jit(lambda a, b: a @ b)(rj, Xj))
    assert dot.dtype == jnp.float32 and levels.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dot), exact_dot, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(levels)[:, 0], exact_levels, rtol=1e-6)
    assert np.max(np.abs(naive / exact_dot - 1)) > 1e-4
