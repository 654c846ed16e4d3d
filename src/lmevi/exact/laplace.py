r"""Fitting glmer's criterion: ``nagq = 0`` (theta alone, beta inside PIRLS: glmer's first stage), ``nagq = 1``
(the Laplace approximation over ``(theta, beta)``: glmer's default, second stage, started from the first) and
``nagq > 1`` (adaptive Gauss-Hermite quadrature over ``(theta, beta)``, one scalar term; :mod:`lmevi.exact.agq`).

Both stages are minimised with NLopt's BOBYQA (lme4's first stage uses BOBYQA, its second Nelder-Mead; we take
BOBYQA for both, with tighter stopping). The fixed effects' covariance is lme4's default ``vcov``: for
``nagq >= 1`` twice the inverse of the finite-difference Hessian of the criterion in ``(theta, beta)`` (its
``beta`` block; lme4's ``deriv12`` with step ``1e-4``), for ``nagq = 0`` (no Hessian, as lme4)
``(RX' RX)^{-1}`` from the PIRLS factor.

Where we differ from lme4: our PIRLS runs to ``|delta u| < 1e-10`` and factors ``L`` at the weights of the final
modes, where lme4's stops at a relative change ``1e-7`` of the penalised deviance (``tolPwrss``) with ``L`` at the
weights of the step before. glmer's reported ``logLik`` carries that: on VerbAgg at glmer's own estimates its
``nAGQ = 0`` ``-2 logLik`` is ``6.6e-3`` above the criterion's value there (``3.8e-3`` with ``tolPwrss = 1e-13``
in R it agrees with ours to ``5e-9``), so our log-likelihoods are as high or slightly higher.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from lmevi.exact import bobyqa
from lmevi.exact.agq import agq_objective
from lmevi.exact.covfactors import theta_default, theta_lower_bounds
from lmevi.exact.pirls import GlmmData, Mode, effects, fixed_factor, pirls, response

# BOBYQA stops when a step in the parameters is below this (absolute) or the criterion changes by less than
# _FTOL (absolute, in -2 log L).
_XTOL, _FTOL = 1e-7, 1e-9
_MAX_EVALS = 5000
# lme4's deriv12 step for the Hessian of the criterion at the optimum
_HESSIAN_STEP = 1e-4


class LaplaceFit(NamedTuple):
    """The optimum of glmer's criterion.

    Attributes:
        theta: ``(n_theta,)`` relative Cholesky parameters (design order). beta: ``(p,)``.
        beta_cov: ``(p, p)`` lme4's default ``vcov`` (see the module docstring); ``vcov_method`` says which.
        effects: per term ``(J_k, p_k)`` conditional modes. effects_cov: per term ``(J_k, p_k, p_k)``
            conditional covariances (lme4's ``condVar``).
        objective: ``()`` ``-2 log L`` (every constant of the log-density kept). loglik: ``-objective / 2``.
        deviance: ``()`` sum of squared deviance residuals at the modes (lme4's ``deviance()`` of a glmer).
        nagq: 0, 1 or the number of quadrature nodes. n_evals: criterion evaluations.
        converged: whether BOBYQA stopped by its tolerances and PIRLS converged at the end.
        optimizer, vcov_method, seconds.
        mode: :class:`lmevi.exact.pirls.Mode` at the optimum.
    """

    theta: np.ndarray
    beta: np.ndarray
    beta_cov: np.ndarray
    effects: tuple
    effects_cov: tuple
    objective: float
    loglik: float
    deviance: float
    nagq: int
    n_evals: int
    converged: bool
    optimizer: str
    vcov_method: str
    seconds: float
    mode: Mode


def criterion(data: GlmmData, nagq: int):
    """``f(theta, beta, u0) -> (-2 log L, mode)`` for ``nagq`` (``beta`` ignored, PIRLS's own, at 0)."""
    if nagq == 0:
        return lambda theta, beta, u0: _value(pirls(data, theta, None, u0))
    if nagq == 1:
        return lambda theta, beta, u0: _value(pirls(data, theta, beta, u0))
    return lambda theta, beta, u0: agq_objective(data, theta, beta, nagq, u0)


def _value(mode: Mode):
    return mode.objective, mode


def _bobyqa(fun, x0, lower, step) -> tuple[np.ndarray, float, int, bool]:
    """NLopt's BOBYQA from ``x0`` with initial steps ``step``: ``(x, f, n_evals, converged)`` (the best point
    it evaluated)."""
    import nlopt

    x, f, n, code = bobyqa.minimise(fun, x0, lower, xtol_abs=_XTOL, ftol_abs=_FTOL, max_evals=_MAX_EVALS,
                                    initial_step=step)
    return x, f, n, code in (nlopt.SUCCESS, nlopt.FTOL_REACHED, nlopt.XTOL_REACHED, nlopt.ROUNDOFF_LIMITED)


def _minimise(f, x0, lower, split: int | None):
    """BOBYQA over ``x = theta`` (``split=None``) or ``x = (theta, beta)`` (theta its first ``split``), with the
    conditional modes of the last evaluation as the next one's start (PIRLS converges the same from either)."""
    last = [None]

    def fun(x):
        theta, beta = (x, None) if split is None else (x[:split], x[split:])
        value, mode = f(theta, beta, last[0])
        last[0] = mode.u
        return value

    # the second stage starts near its optimum (the first stage's): a smaller first trust region
    scale = 0.2 if split is None else 0.02
    return _bobyqa(fun, x0, lower, np.maximum(scale * np.abs(np.asarray(x0, np.float64)), scale / 2))


def fd_hessian(fun, x: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """``(n, n)`` central-difference Hessian of ``fun`` at ``x`` (lme4's ``deriv12``: step ``1e-4``; a
    coordinate at its lower bound takes a one-sided step)."""
    n = len(x)
    h = np.full(n, _HESSIAN_STEP)
    at_bound = x - h < lower
    f0 = fun(x)
    H = np.zeros((n, n))
    E = np.eye(n) * h
    shift = np.where(at_bound, h, 0.0)  # evaluate around x + shift where x sits on the bound
    for i in range(n):
        H[i, i] = (fun(x + shift + E[i]) - 2 * fun(x + shift) + fun(x + shift - E[i])) / h[i] ** 2 \
            if not at_bound[i] else (fun(x + 2 * E[i]) - 2 * fun(x + E[i]) + f0) / h[i] ** 2
        for j in range(i):
            c = x + shift
            H[i, j] = H[j, i] = (fun(c + E[i] + E[j]) - fun(c + E[i] - E[j]) - fun(c - E[i] + E[j])
                                 + fun(c - E[i] - E[j])) / (4 * h[i] * h[j])
    return H


def _vcov(data: GlmmData, f, theta, beta, mode: Mode, nagq: int, lower) -> tuple[np.ndarray, str]:
    """lme4's default ``vcov``: from the Hessian for ``nagq >= 1`` (falling back to ``RX`` where it is not
    positive definite, as lme4 warns and does), from ``RX`` for ``nagq = 0``."""
    rx_inv = np.linalg.inv(mode.rx if mode.rx is not None else fixed_factor(data, theta, mode)[1])
    by_rx = rx_inv.T @ rx_inv
    if nagq == 0:
        return by_rx, "RX"
    k = len(theta)
    x = np.concatenate([theta, beta])
    H = fd_hessian(lambda z: f(z[:k], z[k:], mode.u)[0], x, np.concatenate([lower, np.full(len(beta), -np.inf)]))
    try:
        np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return by_rx, "RX"
    V = 2.0 * np.linalg.inv(H)[k:, k:]
    return (V + V.T) / 2.0, "Hessian"


def fit_laplace(data: GlmmData, nagq: int = 1, theta0=None) -> LaplaceFit:
    """glmer's fit: the first stage (theta, beta in PIRLS) then, for ``nagq >= 1``, the second over
    ``(theta, beta)`` from it.

    Args:
        data: :func:`lmevi.exact.pirls.glmm_data`. nagq: 0, 1 (Laplace) or more nodes (AGQ, one scalar term).
        theta0: ``(n_theta,)`` start (lme4's: every ``Lambda_k`` the identity).
    """
    if nagq < 0 or int(nagq) != nagq:
        raise ValueError(f"nagq must be a whole number >= 0, got {nagq!r}")
    t0 = time.perf_counter()
    lower = theta_lower_bounds(data.n_coefs)
    x0 = theta_default(data.n_coefs) if theta0 is None else np.asarray(theta0, np.float64)
    first = criterion(data, 0)
    theta, value, n_evals, ok = _minimise(first, x0, lower, None)
    mode = pirls(data, theta)
    beta = mode.beta
    f = first
    if nagq >= 1:
        f = criterion(data, nagq)
        k = len(theta)
        x, value, n2, ok = _minimise(f, np.concatenate([theta, beta]), np.concatenate(
            [lower, np.full(len(beta), -np.inf)]), k)
        theta, beta, n_evals = x[:k], x[k:], n_evals + n2
        value, mode = f(theta, beta, mode.u)
    beta_cov, how = _vcov(data, f, theta, beta, mode, nagq, lower)
    b, v = effects(data, theta, mode)
    mu = response(data, data.offset + data.X @ beta + _eta_random(data, b))[1]
    dev = float(np.sum(data.family.deviance_residuals(data.y, mu) ** 2))
    return LaplaceFit(np.asarray(theta), np.asarray(beta), beta_cov, b, v, float(value), -float(value) / 2.0,
                      dev, int(nagq), n_evals, bool(ok and mode.converged), "BOBYQA", how,
                      time.perf_counter() - t0, mode)


def _eta_random(data: GlmmData, b: tuple) -> np.ndarray:
    """``(n,)`` ``sum_k z_ik' b_k[g_k(i)]``."""
    return sum(np.sum(c * bk[i], axis=1) for c, bk, i in zip(data.covariates, b, data.index))
