"""The Poisson likelihood (lme4's ``glmer(..., family = poisson)``): ``y_i ~ Poisson(mu_i)``, ``mu_i = g^{-1}(eta_i)``;
no dispersion (lme4 fixes it at 1). Links: log (default, canonical), identity and sqrt, as R's ``poisson()``.

With the log link the expectations under a Gaussian q have closed forms (the log-normal mean):
``E[log p(y_i | eta_i)] = y_i m_i - exp(m_i + v_i / 2) - log(y_i!)``; other links take the quadrature and the
automatic derivatives of :class:`lmevi.families.base.Generalized`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.families.base import Generalized
from lmevi.families.links import LOG


@dataclass(frozen=True)
class Poisson(Generalized):
    """``y_i ~ Poisson(g^{-1}(eta_i))``; no dispersion."""

    name: str = "poisson"
    link: object = LOG
    links: tuple[str, ...] = ("log", "identity", "sqrt")

    def log_density(self, y, eta, dispersion):
        """``(n_obs,)`` ``y_i log(mu_i) - mu_i - log(y_i!)`` (``y_i eta_i - exp(eta_i) - log(y_i!)`` under the log
        link)."""
        if self.link.name == "log":
            return y * eta - jnp.exp(eta) - jax.scipy.special.gammaln(y + 1.0)
        mu = self.link.inverse(eta)
        return jax.scipy.special.xlogy(y, mu) - mu - jax.scipy.special.gammaln(y + 1.0)

    def expected_log_density(self, y, mean, var, dispersion):
        """``(n_obs,)``; under the log link ``y_i m_i - exp(m_i + v_i / 2) - log(y_i!)`` (the log-normal mean)."""
        if self.link.name == "log":
            return y * mean - jnp.exp(mean + 0.5 * var) - jax.scipy.special.gammaln(y + 1.0)
        return super().expected_log_density(y, mean, var, dispersion)

    def working_moments(self, y, mean, var, dispersion):
        """Under the log link ``(y_i - mu_i, mu_i)`` with ``mu_i = exp(m_i + v_i / 2)``."""
        if self.link.name == "log":
            mu = jnp.exp(mean + 0.5 * var)
            return y - mu, mu
        return super().working_moments(y, mean, var, dispersion)

    @staticmethod
    def variance(mu):
        return mu

    def check(self, y: np.ndarray, name: str) -> None:
        """Counts: non-negative whole numbers."""
        if np.any(y < 0) or np.any(y != np.round(y)):
            bad = y[(y < 0) | (y != np.round(y))][0]
            raise ValueError(f"the response {name!r} of a Poisson model must be counts (whole numbers >= 0), "
                             f"it has {bad:g}")

    def deviance_residuals(self, y, mu):
        """``(n,)`` signed square roots of each row's deviance (lme4's default ``residuals`` of a glmer)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(y > 0, y * np.log(y / mu), 0.0)
        return np.sign(y - mu) * np.sqrt(np.maximum(2.0 * (term - (y - mu)), 0.0))


POISSON = Poisson()
