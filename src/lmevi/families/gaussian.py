"""The Gaussian likelihood (lme4's ``lmer``): ``y_i ~ N(eta_i, sigma^2)``, identity link; the dispersion is sigma.

It is in moment form (see :mod:`lmevi.families.base`), so coordinate ascent updates q and sigma in closed form
(:mod:`lmevi.q.cavi`) and lme4's exact criterion applies (:mod:`lmevi.exact`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from lmevi.families.base import LOG_2PI
from lmevi.families.links import IDENTITY, Identity
from lmevi.runtime.precision import wide


@dataclass(frozen=True)
class Gaussian:
    """``y_i ~ N(eta_i, sigma^2)``, identity link; the dispersion is sigma (lme4's residual SD)."""

    name: str = "gaussian"
    link: Identity = IDENTITY
    links: tuple[str, ...] = ("identity",)
    has_dispersion: bool = True
    moment_form: bool = True
    standardise_y: bool = True

    def log_density(self, y, eta, dispersion):
        """``(n_obs,)`` ``log N(y_i | eta_i, sigma^2)``."""
        return -0.5 * (LOG_2PI + 2.0 * jnp.log(dispersion)) - 0.5 * (y - eta) ** 2 / dispersion**2

    def expected_log_density(self, y, mean, var, dispersion):
        """``(n_obs,)`` ``-1/2 log(2 pi sigma^2) - ((y_i - mean_i)^2 + var_i) / (2 sigma^2)``."""
        return -0.5 * (LOG_2PI + 2.0 * jnp.log(dispersion)) - 0.5 * ((y - mean) ** 2 + var) / dispersion**2

    def expected_log_lik_from_sums(self, sq_resid_sum, var_sum, n_obs: int, dispersion):
        """The sum over rows of :meth:`expected_log_density` from ``sum_i (y_i - mean_i)^2`` and
        ``sum_i var_i``; returns ``()``."""
        return -0.5 * n_obs * (LOG_2PI + 2.0 * jnp.log(dispersion)) - 0.5 * (sq_resid_sum + var_sum) / dispersion**2

    def working_moments(self, y, mean, var, dispersion):
        """``(g, h)``: ``(y - mean) / sigma^2`` and ``1 / sigma^2`` (the working response is ``y`` itself)."""
        return (y - mean) / dispersion**2, jnp.full_like(mean, 1.0 / dispersion**2)

    def update_dispersion(self, y, mean, var, dispersion, rows):
        """``sqrt(sum_i rows_i ((y_i - mean_i)^2 + var_i) / n)``: sigma's M-step."""
        r = jnp.where(rows, (y - mean) ** 2 + var, 0.0)
        return jnp.sqrt(jnp.sum(r) / jnp.sum(rows))

    def inverse_link(self, eta):
        return eta

    def start(self, X, y, n_obs, weights=None, offset=None):
        """Least squares: ``beta (p,)`` and the residual SD ``()`` over ``n_obs`` rows (zero padding rows
        after them change neither)."""
        beta, *_ = jnp.linalg.lstsq(wide(X), wide(y))
        beta = beta.astype(y.dtype)
        return beta, jnp.sqrt(jnp.sum(wide(y - X @ beta) ** 2) / n_obs).astype(y.dtype)

    def encode(self, column, name: str):
        return None  # numbers only (lmevi.frame.design says why otherwise)

    def check(self, y, name: str) -> None:
        return None  # any finite number

    def check_weighted(self, y, weights, name: str) -> None:
        """Any finite number; every prior weight positive (a zero weight is an infinite residual variance:
        lme4's log-likelihood is then -Inf)."""
        if np.any(weights <= 0):
            raise ValueError(f"the weights of a Gaussian model must be positive; {int(np.sum(weights <= 0))} row(s) "
                             "have weight 0 (drop them from the data)")

    def deviance_residuals(self, y, mu):
        return y - mu


GAUSSIAN = Gaussian()
