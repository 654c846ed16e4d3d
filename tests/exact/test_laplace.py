"""glmer's criterion (lmevi.exact.pirls, .agq, .laplace): building blocks, against a dense NumPy computation
written here, and against glmer's committed fits (results/lme4/glmer/, by experiments/lme4_glmer.R)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.special

from lmevi.exact import agq, pirls
from lmevi.exact.covfactors import _lambdas_numpy
from lmevi.families.binomial import BINOMIAL
from lmevi.families.poisson import POISSON

GLMER = Path(__file__).resolve().parents[2] / "results" / "lme4" / "glmer"


def _simulate(family, seed=0, n=240):
    """A small GLMM: ``(1 + x | g)`` (8 levels) and ``(1 | h)`` (5 levels), two fixed effects."""
    rng = np.random.default_rng(seed)
    g, h = rng.integers(0, 8, n), rng.integers(0, 5, n)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    eta = 0.2 + 0.5 * x + rng.normal(0, 0.7, 8)[g] + 0.3 * rng.normal(size=8)[g] * x + rng.normal(0, 0.5, 5)[h]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family is BINOMIAL else rng.poisson(np.exp(eta))
    return pirls.glmm_data(y.astype(float), X, [g, h], [np.column_stack([np.ones(n), x]), np.ones((n, 1))],
                           [8, 5], family)


def _dense_logp(family, y, eta):
    if family is BINOMIAL:
        return y * eta - np.logaddexp(0.0, eta)
    return y * eta - np.exp(eta) - scipy.special.gammaln(y + 1.0)


def _dense_z(data):
    """``(n, q)`` dense ``Z Lambda``-free ``Z`` and the ``(q, q)`` block-diagonal ``Lambda`` (design order)."""
    n = len(data.y)
    Zs = []
    for idx, cov, J in zip(data.index, data.covariates, data.n_levels):
        p = cov.shape[1]
        Z = np.zeros((n, J * p))
        for a in range(p):
            Z[np.arange(n), idx * p + a] = cov[:, a]
        Zs.append(Z)
    return np.hstack(Zs)


def _dense_lambda(data, theta):
    lams = _lambdas_numpy(np.asarray(theta), data.n_coefs)
    blocks = [np.kron(np.eye(J), lam) for J, lam in zip(data.n_levels, lams)]
    return scipy.linalg.block_diag(*blocks)


def _dense_laplace(data, theta, beta):
    """Fisher scoring on the dense system to 1e-13, then ``-2 sum logp + |u|^2 + log det(A)`` at the mode."""
    ZL = _dense_z(data) @ _dense_lambda(data, theta)
    u = np.zeros(ZL.shape[1])
    for _ in range(100):
        eta = data.X @ beta + ZL @ u
        mu = 1 / (1 + np.exp(-eta)) if data.family is BINOMIAL else np.exp(eta)
        w = mu * (1 - mu) if data.family is BINOMIAL else mu
        A = ZL.T @ (w[:, None] * ZL) + np.eye(len(u))
        new = np.linalg.solve(A, ZL.T @ (w * (ZL @ u) + (data.y - mu)))
        if np.max(np.abs(new - u)) < 1e-13:
            break
        u = new
    eta = data.X @ beta + ZL @ u
    mu = 1 / (1 + np.exp(-eta)) if data.family is BINOMIAL else np.exp(eta)
    w = mu * (1 - mu) if data.family is BINOMIAL else mu
    A = ZL.T @ (w[:, None] * ZL) + np.eye(len(u))
    return -2 * np.sum(_dense_logp(data.family, data.y, eta)) + u @ u + np.linalg.slogdet(A)[1], u, A


THETA = np.array([0.8, 0.2, 0.4, 0.6])  # (1 + x | g): 3 entries; (1 | h): 1
BETA = np.array([0.1, 0.4])


# 1. Building blocks


def test_factor_solves_the_weighted_system():
    """The blocked factor solves ``(Lambda' Z' W Z Lambda + I) x = r`` and its log-determinant is the dense one's
    (to 1e-10: double precision on a 29 x 29 system with condition number below 1e3)."""
    data = _simulate(BINOMIAL)
    w = np.random.default_rng(1).uniform(0.05, 0.25, len(data.y))
    F = pirls.factor(pirls.zlambda(data, THETA), w)
    zl = np.hstack([m.toarray() for m in pirls.zlambda(data, THETA)])
    A = zl.T @ (w[:, None] * zl) + np.eye(zl.shape[1])
    r = np.arange(A.shape[0], dtype=float)
    x = pirls.backward(F, pirls.forward(F, r))
    np.testing.assert_allclose(A @ x, r, rtol=0, atol=1e-10)
    assert abs(F.logdet - np.linalg.slogdet(A)[1]) < 1e-10


def test_gauss_hermite_rule_integrates_normal_moments():
    """The standard-normal rule on 9 nodes is exact for polynomials up to degree 17 (rounding: 1e-12)."""
    z, w = agq.standard_normal_rule(9)
    assert abs(np.sum(w) - 1) < 1e-12 and abs(np.sum(w * z**2) - 1) < 1e-12 and abs(np.sum(w * z**4) - 3) < 1e-12


# 2. Against the dense computation


@pytest.mark.parametrize("family", [BINOMIAL, POISSON], ids=["binomial", "poisson"])
def test_laplace_criterion_matches_dense(family):
    """The Laplace criterion and the conditional modes at given (theta, beta) against dense Fisher scoring: to
    1e-10 absolute in -2 log L (values ~300; both iterate to |delta u| < 1e-10, where the criterion is
    stationary in u up to the log-determinant's first-order change, ~1e-11)."""
    data = _simulate(family)
    mode = pirls.pirls(data, THETA, BETA)
    want, u, _ = _dense_laplace(data, THETA, BETA)
    assert mode.converged
    assert abs(mode.objective - want) < 1e-9
    b, _ = pirls.effects(data, THETA, mode)
    lam = _dense_lambda(data, THETA)
    np.testing.assert_allclose(np.concatenate([x.ravel() for x in b]), lam @ u, rtol=0, atol=1e-9)


def test_joint_mode_is_the_laplace_mode_at_its_beta():
    """nAGQ = 0: PIRLS over (u, beta) stops where u-only PIRLS at its beta stops (criterion to 1e-9), and its
    beta maximises the penalised log-likelihood (a perturbation raises the penalised deviance)."""
    data = _simulate(BINOMIAL, seed=3)
    joint = pirls.pirls(data, THETA)
    at_beta = pirls.pirls(data, THETA, joint.beta)
    assert abs(joint.objective - at_beta.objective) < 1e-9
    pen = -2 * np.sum(joint.logp) + joint.u @ joint.u
    other = pirls.pirls(data, THETA, joint.beta + np.array([0.01, 0.0]))
    assert -2 * np.sum(other.logp) + other.u @ other.u > pen


def test_condvar_is_the_inverse_diagonal_block():
    """Conditional covariances: ``Lambda [(A)^{-1}]_jj Lambda'`` per level, against the dense inverse (1e-10)."""
    data = _simulate(POISSON, seed=2)
    mode = pirls.pirls(data, THETA, BETA)
    _, _, A = _dense_laplace(data, THETA, BETA)
    lam = _dense_lambda(data, THETA)
    full = lam @ np.linalg.inv(A) @ lam.T
    _, v = pirls.effects(data, THETA, mode)
    np.testing.assert_allclose(v[0][3], full[6:8, 6:8], rtol=0, atol=1e-10)
    np.testing.assert_allclose(v[1][2, 0, 0], full[16 + 2, 16 + 2], rtol=0, atol=1e-10)


def _scalar_data(seed=4):
    rng = np.random.default_rng(seed)
    n, J = 150, 12
    g = rng.integers(0, J, n)
    x = rng.normal(size=n)
    y = rng.binomial(1, 1 / (1 + np.exp(-(0.3 * x + rng.normal(0, 1.0, J)[g])))).astype(float)
    return pirls.glmm_data(y, np.column_stack([np.ones(n), x]), [g], [np.ones((n, 1))], [J], BINOMIAL)


def test_agq_one_node_is_laplace_and_many_nodes_the_integral():
    """AGQ on 1 node is the Laplace criterion (1e-10); on 25 nodes it is the per-level integral
    ``int p(y_j | u) phi(u) du`` taken on a fine grid (trapezoid on 20,001 points over [-12, 12]: 1e-7)."""
    data = _scalar_data()
    theta, beta = np.array([0.9]), np.array([0.1, 0.3])
    one, _ = agq.agq_objective(data, theta, beta, 1)
    assert abs(one - pirls.pirls(data, theta, beta).objective) < 1e-10
    many, _ = agq.agq_objective(data, theta, beta, 25)
    grid = np.linspace(-12, 12, 20001)
    total = 0.0
    for j in range(12):
        rows = data.index[0] == j
        eta = (data.X[rows] @ beta)[:, None] + theta[0] * grid[None, :]
        logp = np.sum(_dense_logp(BINOMIAL, data.y[rows][:, None], eta), axis=0) - grid**2 / 2
        total += -2 * np.log(np.trapezoid(np.exp(logp), grid) / np.sqrt(2 * np.pi))
    assert abs(many - total) < 1e-7


# 3. Against glmer


# glmer's own fits (Contraception at nAGQ 0, 1, 9) are compared through lmevi.fit in test_glmer_fit.py.
