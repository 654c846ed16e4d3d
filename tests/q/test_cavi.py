"""Coordinate ascent: exact block optima against the dense Gaussian conditional, and a non-decreasing ELBO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import lmevi

from conftest import simulate_departments, simulate_small_parts
from dense import (
    kernel_problem,
    block_coordinates,
    dense_block,
    dense_design,
    dense_prior_precision,
    dense_q,
    make_problem,
    random_params,
)
from lmevi.q import cavi
from lmevi.q import elbo
from lmevi.q import variational
from lmevi.q import moments
from lmevi.q import layout
from lmevi.families.gaussian import GAUSSIAN

block_data = jax.jit(moments.block_data, static_argnames="spec")
closed_form = jax.jit(elbo.closed_form)
update_block = jax.jit(cavi.update_block, static_argnames=("spec", "block"))
m_step = jax.jit(cavi.m_step)
init_params = jax.jit(variational.init_params, static_argnums=(1, 2))


def test_update_block_is_the_exact_conditional_posterior(crossed, family_spec):
    """q_B* = N(Lambda^{-1} Z_B^T r / sigma^2, Lambda^{-1}), Lambda = Z_B^T Z_B / sigma^2 + prior precision.

    ``r`` is y minus the fixed part and the other blocks' means; all of it is formed densely here.
    """
    check_exact_block_updates(crossed, family_spec, seed=0)


def check_exact_block_updates(problem, spec, seed):
    params = random_params(seed, spec)
    data = block_data(problem.design, spec)
    mean, _ = dense_q(spec, params.blocks)
    A = dense_design(problem, spec)
    P = dense_prior_precision(spec, params.model.chol)
    s2 = float(params.model.sigma) ** 2
    y = np.asarray(problem.design.y)
    fixed = 0.0 if spec.reml else problem.X @ np.asarray(params.model.beta)
    for i, block in enumerate(spec.blocks):
        idx = np.concatenate(block_coordinates(spec, block))
        others = np.setdiff1d(np.arange(A.shape[1]), idx)
        r = y - fixed - A[:, others] @ mean[others]
        A_B = A[:, idx]
        precision = A_B.T @ A_B / s2 + P[np.ix_(idx, idx)]
        want_cov = np.linalg.inv(precision)
        want_mean = want_cov @ A_B.T @ r / s2

        new = update_block(problem.design, spec, block, data[i], params.model, r)
        got_mean, got_cov = dense_block(new)
        # Cholesky solves against a dense inverse of a well-conditioned precision (condition number <= 80):
        # float64 rounding, measured at most 2.4e-15 of the largest entry; 1e-12 of it allowed
        np.testing.assert_allclose(got_mean, want_mean, rtol=0, atol=1e-12 * np.abs(want_mean).max())
        np.testing.assert_allclose(got_cov, want_cov, rtol=0, atol=1e-12 * np.abs(want_cov).max())


@pytest.fixture(scope="module")
def small_parts():
    """``y ~ x + (1 + x | g) + (1 + x | a) + (1 | b)`` on 90 rows in float64: ``g`` 9 levels (large with
    ``small_threshold=12``), ``a`` 3 levels with a slope and ``b`` 4 levels (small), all crossed. Specs: beta
    and both small terms in g's block; and the small terms with beta in a block of their own."""
    frame = simulate_small_parts()
    with jax.enable_x64(True):
        problem = make_problem(frame, "y ~ x + (1 + x | g) + (1 + x | a) + (1 | b)")
        specs = (
            layout.structured_spec(problem.design, problem.info, True, small_threshold=12),
            layout.structured_spec(problem.design, problem.info, True, small_threshold=12,
                                   blocks=[("a", "b", "fixed"), ("g",)]),
        )
    assert specs[0].blocks == (layout.Block(large=0, small=(1, 2), fixed=True),)
    assert specs[1].blocks == (layout.Block(large=None, small=(1, 2), fixed=True), layout.Block(large=0))
    return problem, specs


@pytest.mark.parametrize("which", [0, 1], ids=["with-large", "without-large"])
def test_update_block_with_several_small_terms_is_the_exact_conditional(small_parts, which):
    """The segment-sum cross-products and ``W^T r`` of a block with two small terms (one with a slope) and
    beta give the dense Gaussian conditional."""
    problem, specs = small_parts
    with jax.enable_x64(True):
        check_exact_block_updates(problem, specs[which], seed=3)


@pytest.mark.parametrize("which", [0, 1], ids=["with-large", "without-large"])
def test_sweep_is_update_blocks_then_m_step(small_parts, which):
    """``sweep`` shares the rows' means between its two halves and sums the variances by traces; it must
    equal the two public steps run one after the other, and its ELBO the closed form at its output."""
    problem, specs = small_parts
    spec = specs[which]
    with jax.enable_x64(True):
        design = problem.design
        kp = kernel_problem(design, spec)
        params = init_params(design, spec, GAUSSIAN, None)
        got, got_elbo = jax.jit(cavi.sweep)(kp, params)
        mid = jax.jit(cavi.update_blocks)(kp, params)
        want, want_elbo = m_step(kp, mid)
        # the same operations, fused differently by XLA: float64 rounding only
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert float(got_elbo) == pytest.approx(float(want_elbo), rel=1e-12)
        assert float(got_elbo) == pytest.approx(float(closed_form(kp, got)), rel=1e-12)


# Two opposite families: several blocks with beta a point estimate and sigma estimated, and one arrowhead
# block holding beta with sigma fixed (the tutorial's setting). The block updates of all five families are
# checked exactly above and the M-step below; the default fit's (accelerated) trace in test_inference.
@pytest.mark.parametrize(
    "family_spec, residual_scale",
    [("meanfield-ml", None), ("arrowhead-reml", 1.0)],
    indirect=["family_spec"],
    ids=["meanfield-ml-sigma-estimated", "arrowhead-reml-sigma-fixed"],
)
def test_sweeps_never_decrease_the_elbo(crossed, family_spec, residual_scale):
    """50 sweeps from the fit's starting point; the ELBO after every block pass and every M-step."""
    design = crossed.design
    kp = kernel_problem(design, family_spec, fixed_sigma=residual_scale)

    @jax.jit
    def run(params):
        def sweep(p, _):
            p = cavi.update_blocks(kp, p)
            after_blocks = elbo.closed_form(kp, p)
            p, reported = cavi.m_step(kp, p)
            after_m = elbo.closed_form(kp, p)
            return p, (after_blocks, after_m, reported)

        return jax.lax.scan(sweep, params, length=50)

    params = init_params(design, family_spec, GAUSSIAN, kp.sigma_if_fixed)
    start = float(closed_form(kp, params))
    params, (after_blocks, after_m, reported) = run(params)
    # m_step's own ELBO is the closed form at its output (same sums, other order: 1e-12 relative)
    np.testing.assert_allclose(reported, after_m, rtol=1e-12)
    trace = np.concatenate([[start], np.stack([after_blocks, after_m], axis=1).reshape(-1)])
    # every step maximises the ELBO exactly in its variables, so it can only go up; near the optimum the
    # steps shrink to rounding of a ~100-term float64 sum (measured down-steps at most 2e-16 relative)
    assert np.all(np.diff(trace) >= -1e-12 * np.abs(trace[1:]))
    assert trace[-1] > trace[0] + 1.0  # and the sweeps do move it
    if residual_scale is not None:
        assert float(params.model.sigma) == residual_scale


# the M-step's formulas differ only where beta is a point estimate (ML) or in a block with a large term
@pytest.mark.parametrize("family_spec", ["meanfield-ml", "arrowhead-reml"], indirect=True)
def test_m_step_is_the_exact_maximiser_given_q(crossed, family_spec):
    """Given q: ``Sigma_k = (1/J_k) sum_j E_q[b_kj b_kj^T]`` and ``sigma^2`` the mean ``E_q[residual^2]``
    (checked against the dense q), and the ELBO's gradient in beta, L_k and sigma vanishes there."""
    design = crossed.design
    kp = kernel_problem(design, family_spec)
    params = random_params(2, family_spec)
    new, _ = m_step(kp, params)

    mean, cov = dense_q(family_spec, params.blocks)
    second = cov + np.outer(mean, mean)
    pos = 0
    for J, p, L in zip(family_spec.n_levels, family_spec.n_coefs, new.model.chol):
        blocks = [second[pos + j * p : pos + (j + 1) * p, pos + j * p : pos + (j + 1) * p] for j in range(J)]
        pos += J * p
        L = np.asarray(L)
        np.testing.assert_allclose(L @ L.T, np.mean(blocks, axis=0), rtol=1e-10)  # rounding only
    A = dense_design(crossed, family_spec)
    y = np.asarray(design.y)
    fixed = 0.0 if family_spec.reml else crossed.X @ np.asarray(new.model.beta)
    resid = y - fixed - A @ mean
    sigma2 = (resid @ resid + np.trace(A @ cov @ A.T)) / len(y)
    assert float(new.model.sigma) ** 2 == pytest.approx(sigma2, rel=1e-10)  # rounding only

    def of_model(model):
        return elbo.closed_form(kp, new._replace(model=model))

    grad = jax.jit(jax.grad(of_model))(new.model)
    leaves = jax.tree_util.tree_leaves(grad)
    # before the M-step these gradients are O(10-100); after it, rounding (measured <= 1.4e-14)
    assert leaves and max(float(np.abs(g).max()) for g in leaves) < 1e-10


def test_float32_block_with_nested_small_term_survives_huge_counts():
    """The instructors' block (departments nested in it, beta under REML) of a float32 model, with every row
    counted K times: its design-only cross-products and its residual multiplied by K give the update for the
    data with each row repeated K times. Its Schur complement is a difference of nearly equal sums (the
    departments' columns add up to the intercept); in float32 it lost the small part at K = 1e5 (0.83 posterior
    SDs off) and was not finite at K = 1e6, as a 1e8-row fit was at its first sweep. Solved in float64 (inputs
    the same float32 numbers), the small part must stay within 0.1 of its posterior SDs at K = 1e5 (measured
    0.024, the rest being the float32 rounding of the rows' products) and to 1e-5 at K = 1."""
    upd = jax.jit(cavi.update_block, static_argnames=("spec", "block"))
    with jax.enable_x64(True):
        data = simulate_departments(3000, 300, 80, n_departments=6)
        model = lmevi.build_model("y ~ service + (1|s) + (1|d) + (1|dept)", data, q="structured", dtype="float32")
        problem = model.problem
        i = next(i for i, b in enumerate(problem.spec.blocks) if b.small)
        block = problem.spec.blocks[i]
        assert block.large == 1 and block.small == (2,) and block.fixed
        params = lmevi.fitting.stage.initial_params(problem, 0.1)

        def widened(tree):
            return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, tree)

        for K, bound in [(1.0, 1e-5), (1e5, 0.1)]:
            got = {}
            for name, design, bd, point in [
                ("float32", problem.design, problem.block_data[i], params.model),
                ("float64", widened(problem.design), widened(problem.block_data[i]), widened(params.model)),
            ]:
                scaled = jax.tree_util.tree_map(lambda a: a * jnp.asarray(K, a.dtype), bd)
                new = upd(design, problem.spec, block, scaled, point, design.y * jnp.asarray(K, design.y.dtype))
                got[name] = new
            low, ref = got["float32"], got["float64"]
            assert low.loc_small.dtype == jnp.float32 and low.loc_large.dtype == jnp.float32
            for leaf in jax.tree_util.tree_leaves(low):
                assert np.all(np.isfinite(np.asarray(leaf)))
            diff = np.asarray(ref.loc_small) - np.asarray(low.loc_small, np.float64)
            in_sds = scipy.linalg.solve_triangular(np.asarray(ref.chol_small), diff, lower=True)
            assert np.abs(in_sds).max() < bound, (K, np.abs(in_sds).max())
