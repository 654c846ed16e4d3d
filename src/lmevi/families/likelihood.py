r"""Likelihood seam: everything the rest of lmevi asks of the response distribution.

A likelihood is a frozen (hashable) object, so it can sit in the static part of a compiled problem. It says:

* ``log_density(y, eta, dispersion)``: ``(n_obs,)`` ``log p(y_i | eta_i)`` at linear predictor ``eta``;
* ``expected_log_density(y, mean, var, dispersion)``: ``(n_obs,)`` ``E[log p(y_i | eta_i)]`` for
  ``eta_i ~ N(mean_i, var_i)`` (the ELBO's first term under a Gaussian q);
* ``inverse_link(eta)``: the mean of ``y`` given ``eta``;
* ``has_dispersion``: whether there is a scale to estimate (``sigma`` for the Gaussian);
* ``start(X, y, n_obs)``: starting values ``(beta (p,), dispersion ())``;
* ``moment_form``: ``True`` when the summed expected log-density depends on q only through
  ``sum_i (r_i - mean_i)^2`` and ``sum_i var_i`` (:meth:`Gaussian.expected_log_lik_from_sums`), which is what
  lets the closed-form ELBO skip the per-row variances and coordinate ascent update q in closed form;
* ``standardise_y``: whether the design stage may centre and scale the response (the Gaussian's units are
  free; a count's or a 0/1 response's are not);
* ``encode(column, name)``: the response column as numbers where the likelihood reads a non-numeric one (the
  binomial's two levels), else ``None``; ``check(y, name)``: a ``ValueError`` naming what the response may not
  hold (counts, 0/1);
* ``deviance_residuals(y, mu)``: lme4's default ``residuals`` (the response residuals for the Gaussian).

The Gaussian lives here; the generalized ones (Poisson, binomial) are one module, :mod:`lmevi.families.glm`, with
``moment_form = False``: the closed-form ELBO then takes the per-row variances from the q seam, the optax path
fits them as it is, and coordinate ascent takes :func:`lmevi.families.glm.step` as its sweep. Each is registered in
:data:`LIKELIHOODS` under the name lme4's ``family=`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp

from lmevi.families import glm
from lmevi.runtime.precision import wide

LOG_2PI = 1.8378770664093453


class Likelihood(Protocol):
    """What a response distribution provides (see the module docstring)."""

    name: str
    link: str
    has_dispersion: bool
    moment_form: bool
    standardise_y: bool

    def log_density(self, y: jax.Array, eta: jax.Array, dispersion: jax.Array) -> jax.Array: ...

    def expected_log_density(
        self, y: jax.Array, mean: jax.Array, var: jax.Array, dispersion: jax.Array
    ) -> jax.Array: ...

    def inverse_link(self, eta: jax.Array) -> jax.Array: ...

    def start(self, X: jax.Array, y: jax.Array, n_obs) -> tuple[jax.Array, jax.Array]: ...

    def encode(self, column, name: str): ...

    def check(self, y, name: str) -> None: ...

    def deviance_residuals(self, y, mu): ...


@dataclass(frozen=True)
class Gaussian:
    """``y_i ~ N(eta_i, sigma^2)``, identity link; the dispersion is sigma (lme4's residual SD)."""

    name: str = "gaussian"
    link: str = "identity"
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

    def inverse_link(self, eta):
        return eta

    def start(self, X, y, n_obs):
        """Least squares: ``beta (p,)`` and the residual SD ``()`` over ``n_obs`` rows (zero padding rows
        after them change neither)."""
        beta, *_ = jnp.linalg.lstsq(wide(X), wide(y))
        beta = beta.astype(y.dtype)
        return beta, jnp.sqrt(jnp.sum(wide(y - X @ beta) ** 2) / n_obs).astype(y.dtype)

    def encode(self, column, name: str):
        return None  # numbers only (lmevi.frame.design says why otherwise)

    def check(self, y, name: str) -> None:
        return None  # any finite number

    def deviance_residuals(self, y, mu):
        return y - mu


GAUSSIAN = Gaussian()

# lme4's family names -> likelihood objects.
LIKELIHOODS: dict[str, Likelihood] = {"gaussian": GAUSSIAN, "poisson": glm.POISSON, "binomial": glm.BINOMIAL}


def get(name: str) -> Likelihood:
    """The likelihood registered under ``name`` (lme4's ``family=`` spelling)."""
    if not isinstance(name, str) or name not in LIKELIHOODS:
        raise ValueError(f"family must be one of {sorted(LIKELIHOODS)} (the likelihood), got {name!r}")
    return LIKELIHOODS[name]
