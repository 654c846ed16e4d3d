"""The log joint: segment-sum JAX code against a dense-Z NumPy/SciPy computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dense import random_lower
from lmevi.q import model
from lmevi.q.model import ModelParams

log_joint = jax.jit(model.log_joint)


@pytest.fixture(scope="module")
def point(crossed):
    """Random ``beta``, ``L_k`` (lower triangular, off-diagonal non-zero) and effects on the crossed design."""
    rng = np.random.default_rng(11)
    chol = tuple(jnp.asarray(random_lower(rng, (t.n_coefs, t.n_coefs), 0.8)) for t in crossed.info.terms)
    params = ModelParams(beta=jnp.asarray(rng.normal(size=crossed.X.shape[1])), chol=chol, sigma=jnp.asarray(0.7))
    effects = tuple(jnp.asarray(rng.normal(size=(t.n_levels, t.n_coefs))) for t in crossed.info.terms)
    return params, effects


def dense_log_joint(problem, params, effects, beta=None) -> float:
    """``log N(y | X beta + sum_k Z_k vec(b_k), sigma^2 I) + sum_k sum_j log N(b_kj | 0, L_k L_k^T)``."""
    beta = np.asarray(params.beta if beta is None else beta)
    eta = problem.X @ beta + sum(Z @ np.asarray(b).reshape(-1) for Z, b in zip(problem.Z, effects))
    y = np.asarray(problem.design.y)
    total = stats.norm.logpdf(y, eta, float(params.sigma)).sum()
    for b, L in zip(effects, params.chol):
        L = np.asarray(L)
        total += stats.multivariate_normal(np.zeros(L.shape[0]), L @ L.T).logpdf(np.asarray(b)).sum()
    return total


def test_linear_predictor_matches_dense_z(crossed, point):
    params, effects = point
    got = np.asarray(jax.jit(model.linear_predictor)(crossed.design, params.beta, effects))
    want = crossed.X @ np.asarray(params.beta) + sum(
        Z @ np.asarray(b).reshape(-1) for Z, b in zip(crossed.Z, effects)
    )
    # sums of a few products of O(1) numbers: float64 rounding, 1e-12 absolute
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_log_joint_matches_dense_reference(crossed, point):
    params, effects = point
    got = float(log_joint(crossed.design, params, effects))
    # ~100 log densities summed by two routes: float64 rounding is far below 1e-10 relative
    assert got == pytest.approx(dense_log_joint(crossed, params, effects), rel=1e-10)


def test_log_joint_uses_the_beta_it_is_given(crossed, point):
    """REML-like fits pass a draw of beta; it must replace ``params.beta``."""
    params, effects = point
    beta = params.beta + 0.3
    got = float(log_joint(crossed.design, params, effects, beta))
    assert got == pytest.approx(dense_log_joint(crossed, params, effects, beta), rel=1e-10)  # as above
    assert got != pytest.approx(float(log_joint(crossed.design, params, effects)), rel=1e-6)


def test_gradient_is_the_scatter_add_of_residuals(crossed, point):
    """``d/db_k log p = Z_k^T (y - eta) / sigma^2 - (I kron Sigma_k^{-1}) vec(b_k)`` (dense NumPy)."""
    params, effects = point
    grads = jax.jit(jax.grad(model.log_joint, argnums=2))(crossed.design, params, effects)
    y = np.asarray(crossed.design.y)
    eta = crossed.X @ np.asarray(params.beta) + sum(Z @ np.asarray(b).reshape(-1) for Z, b in zip(crossed.Z, effects))
    for Z, b, L, g in zip(crossed.Z, effects, params.chol, grads):
        L = np.asarray(L)
        J = b.shape[0]
        want = Z.T @ (y - eta) / float(params.sigma) ** 2 - np.kron(np.eye(J), np.linalg.inv(L @ L.T)) @ np.asarray(
            b
        ).reshape(-1)
        assert g.shape == b.shape
        # gradients of size ~10-100 computed by two routes: 1e-9 relative to their largest entry
        np.testing.assert_allclose(np.asarray(g).reshape(-1), want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_log_prior_ignores_the_sign_convention_of_the_cholesky_factor(point):
    """``L`` and ``L diag(+-1)`` are factors of the same ``Sigma``: the prior density must agree."""
    params, effects = point
    flipped = tuple(L * jnp.where(jnp.arange(L.shape[0]) % 2 == 0, -1.0, 1.0) for L in params.chol)
    a = float(jax.jit(model.log_prior)(effects, params.chol))
    b = float(jax.jit(model.log_prior)(effects, flipped))
    assert a == pytest.approx(b, rel=1e-12)  # same numbers, the sign cancels exactly up to rounding
