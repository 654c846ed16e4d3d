"""The binomial likelihood (lme4's ``glmer(..., family = binomial)``) for a 0/1 response (booleans and two-level
columns are read as 0/1, the second level as success): ``y_i ~ Bernoulli(g^{-1}(eta_i))``; no dispersion.
Links: logit (default, canonical), probit and cloglog, as R's ``binomial()``.

Under the logit link ``E[log p] = y_i m_i - E[log(1 + exp(eta_i))]``; the expectation of the softplus has no
closed form and is taken by Gauss-Hermite quadrature (:mod:`lmevi.families.quadrature`), and so are the working
moments ``E[sigmoid(eta)]`` and ``E[sigmoid(eta) sigmoid(-eta)]``. Other links take the quadrature of the
log-density and the automatic derivatives of :class:`lmevi.families.base.Generalized`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmevi.families.base import Generalized
from lmevi.families.links import LOGIT
from lmevi.families.quadrature import gauss_hermite


def _softplus(x):
    return jnp.logaddexp(0.0, x)


def _log_probs(link, eta):
    """``(log mu, log(1 - mu))`` at ``eta``, computed stably for each link."""
    if link.name == "logit":
        return -_softplus(-eta), -_softplus(eta)
    if link.name == "probit":
        return jax.scipy.special.log_ndtr(eta), jax.scipy.special.log_ndtr(-eta)
    if link.name == "cloglog":
        return jnp.log(-jnp.expm1(-jnp.exp(eta))), -jnp.exp(eta)
    mu = link.inverse(eta)
    return jnp.log(mu), jnp.log1p(-mu)


@dataclass(frozen=True)
class Binomial(Generalized):
    """``y_i ~ Bernoulli(g^{-1}(eta_i))``; no dispersion."""

    name: str = "binomial"
    link: object = LOGIT
    links: tuple[str, ...] = ("logit", "probit", "cloglog")

    def log_density(self, y, eta, dispersion):
        """``(n_obs,)`` ``y_i log(mu_i) + (1 - y_i) log(1 - mu_i)`` (``y_i eta_i - log(1 + exp(eta_i))`` under the
        logit link)."""
        if self.link.name == "logit":
            return y * eta - _softplus(eta)
        log_mu, log_1mu = _log_probs(self.link, eta)
        return y * log_mu + (1.0 - y) * log_1mu

    def expected_log_density(self, y, mean, var, dispersion):
        """``(n_obs,)``; under the logit link ``y_i m_i - E[log(1 + exp(eta_i))]`` (Gauss-Hermite)."""
        if self.link.name == "logit":
            return y * mean - gauss_hermite(_softplus, mean, var)
        return super().expected_log_density(y, mean, var, dispersion)

    def working_moments(self, y, mean, var, dispersion):
        """Under the logit link ``(y_i - E[sigmoid(eta_i)], E[sigmoid(eta_i) sigmoid(-eta_i)])`` (Gauss-Hermite)."""
        if self.link.name == "logit":
            sig = jax.nn.sigmoid
            d1 = gauss_hermite(sig, mean, var)
            return y - d1, gauss_hermite(lambda e: sig(e) * sig(-e), mean, var)
        return super().working_moments(y, mean, var, dispersion)

    @staticmethod
    def variance(mu):
        return mu * (1.0 - mu)

    def encode(self, column: pd.Series, name: str) -> np.ndarray | None:
        return _two_levels(column, name)

    def check(self, y: np.ndarray, name: str) -> None:
        """0 or 1 on every row."""
        if np.any((y != 0) & (y != 1)):
            bad = y[(y != 0) & (y != 1)][0]
            raise ValueError(f"the response {name!r} of a binomial model must be 0/1 (or two levels, or booleans), "
                             f"it has {bad:g}; for k successes out of n trials write one row per trial")

    def check_weighted(self, y: np.ndarray, weights: np.ndarray, name: str) -> None:
        """Proportions of ``weights`` trials, as R's ``binomial()`` reads a response with prior weights: ``y_i``
        in [0, 1] and ``y_i w_i`` a whole number of successes (to 1e-7: proportions stored as decimals)."""
        successes = y * weights
        bad = (y < 0) | (y > 1) | (np.abs(successes - np.round(successes)) > 1e-7 * np.maximum(weights, 1.0))
        if np.any(bad):
            i = int(np.argmax(bad))
            raise ValueError(
                f"the response {name!r} of a binomial model with weights must be proportions of the weights' "
                f"trials (successes within 0..trials, a whole number of them): row {i} has {y[i]:g} of "
                f"{weights[i]:g} trials")

    def deviance_residuals(self, y, mu):
        """``(n,)`` signed square roots of each row's deviance (lme4's default ``residuals`` of a glmer)."""
        mu = np.clip(mu, 1e-300, 1.0 - 1e-16)
        dev = -2.0 * (y * np.log(mu) + (1.0 - y) * np.log1p(-mu))
        return np.sign(y - mu) * np.sqrt(np.maximum(dev, 0.0))


def _two_levels(column: pd.Series, name: str) -> np.ndarray | None:
    """A binary response as 0/1: booleans, or a column of exactly two levels (the first, in sorted or
    categorical order, is 0: R's ``glmer`` reads a factor's first level as failure); ``None`` for numbers."""
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64)
    if isinstance(column.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(column):
        cat = column.astype("category") if not isinstance(column.dtype, pd.CategoricalDtype) else column
        levels = [lv for lv in cat.cat.categories if (cat == lv).any()]
        if len(levels) != 2:
            raise ValueError(
                f"the response {name!r} of a binomial model must have two levels (failure, success), it has "
                f"{len(levels)}: {list(map(str, levels))[:5]}"
            )
        return (cat == levels[1]).to_numpy(dtype=np.float64)
    return None


BINOMIAL = Binomial()
