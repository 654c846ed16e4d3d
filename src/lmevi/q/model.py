"""Model stage: the log joint of a Gaussian linear mixed model, as pure JAX functions.

    b_kj ~ N(0, Sigma_k),  Sigma_k = L_k L_k^T            (j = 1..J_k levels of term k, p_k coefficients)
    y_i  ~ N(x_i beta + sum_k z_ik . b_k,g_k(i), sigma^2)

``L_k`` is the lower Cholesky factor of the term's covariance in the data's units (lme4's relative factor
``Lambda_k`` times sigma). Unlike the Edward tutorial, which fixes ``sigma = 1``, sigma is estimated by
default; :class:`ModelParams` holds it either way and the fitting code decides whether it moves.
The per-row predictor uses gathers ``b_k[g_k]``; their gradients are the scatter-adds
(``jax.ops.segment_sum``) of the sufficient statistics (Bates et al. 2015, sec. 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.frame.design import Design
from lmevi.families.base import LOG_2PI, Likelihood
from lmevi.families.gaussian import GAUSSIAN
from lmevi.runtime.precision import level_rows


class ModelParams(NamedTuple):
    """Point estimates of variational EM.

    Attributes:
        beta: ``(p,)`` fixed effects, or ``None`` when they are integrated out in q (``reml=True``).
        chol: one ``(p_k, p_k)`` lower-triangular factor ``L_k`` of ``Sigma_k`` per random term.
        sigma: ``()`` residual standard deviation.
    """

    beta: jax.Array | None
    chol: tuple[jax.Array, ...]
    sigma: jax.Array


def linear_predictor(design: Design, beta: jax.Array, effects: tuple[jax.Array, ...]) -> jax.Array:
    """``x_i beta + sum_k z_ik . b_k[g_k(i)]``.

    Args:
        design: the model's arrays.
        beta: ``(p,)``.
        effects: one ``(J_k, p_k)`` array per term.

    Returns:
        ``(n_obs,)``.
    """
    eta = design.X @ beta
    for term, b in zip(design.terms, effects):
        eta = eta + jnp.sum(term.covariates * level_rows(b, term.index), axis=-1)
    return eta


def log_likelihood(
    design: Design, beta: jax.Array, effects: tuple[jax.Array, ...], sigma: jax.Array, likelihood: Likelihood = GAUSSIAN
) -> jax.Array:
    """``log p(y | b, beta, sigma) = sum_i log p(y_i | x_i beta + eta_i)`` (Gaussian:
    ``log N(y_i | ., sigma^2)``); returns ``()``."""
    eta = linear_predictor(design, beta, effects)
    return jnp.sum(likelihood.log_density(design.y, eta, sigma))


def log_abs_diag(L: jax.Array) -> jax.Array:
    """``log |L_ii|`` of (batched) triangular factors ``(..., p, p)`` -> ``(..., p)``: summed, half the
    log-determinant of ``L L^T``. The one place log-determinants of Cholesky factors are taken."""
    return jnp.log(jnp.abs(jnp.diagonal(L, axis1=-2, axis2=-1)))


def log_prior(effects: tuple[jax.Array, ...], chol: tuple[jax.Array, ...]) -> jax.Array:
    """``sum_k sum_j log N(b_kj | 0, L_k L_k^T)``; returns ``()``."""
    total = 0.0
    for b, L in zip(effects, chol):
        J, p = b.shape
        white = jax.scipy.linalg.solve_triangular(L, b.T, lower=True)  # (p, J)
        logdet = jnp.sum(log_abs_diag(L))
        total = total - 0.5 * J * p * LOG_2PI - J * logdet - 0.5 * jnp.sum(white**2)
    return total


def log_joint(design: Design, params: ModelParams, effects: tuple[jax.Array, ...], beta=None) -> jax.Array:
    """``log p(y, b | beta, Sigma, sigma)``, the density variational inference targets; returns ``()``.

    Args:
        design: the model's arrays.
        params: point estimates; ``params.beta`` is used unless ``beta`` is given (REML-like fits keep
            beta in q, and pass a draw of it here).
        effects: one ``(J_k, p_k)`` array per term.
    """
    b0 = params.beta if beta is None else beta
    return log_likelihood(design, b0, effects, params.sigma) + log_prior(effects, params.chol)


def cov_sd_corr(L) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Sigma = L L^T`` ``(p, p)``, its SDs ``(p,)`` and correlations ``(p, p)`` from the lower Cholesky
    factor ``L``, on the host in float64 (a zero SD gives NaN correlations, as lme4 prints them)."""
    L = np.asarray(L, np.float64)
    cov = L @ L.T
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    return cov, sd, corr
