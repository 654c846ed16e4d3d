r"""The likelihood seam: everything the rest of lmevi asks of the response distribution.

A likelihood is a frozen (hashable) object, so it can sit in the static part of a compiled problem. As R's
``family`` objects and statsmodels' ``families``, a family is a variance function plus a link
(:mod:`lmevi.families.links`), and may have a dispersion parameter. It says:

* ``name``, ``link`` (a link object), ``links`` (the names of the links the family allows);
* ``log_density(y, eta, dispersion)``: ``(n_obs,)`` ``log p(y_i | eta_i)`` at linear predictor ``eta``;
* ``expected_log_density(y, mean, var, dispersion)``: ``(n_obs,)`` ``E[log p(y_i | eta_i)]`` for
  ``eta_i ~ N(mean_i, var_i)`` (the ELBO's first term under a Gaussian q);
* ``working_moments(y, mean, var, dispersion)``: ``(g, h)``, ``(n_obs,)`` each, the first derivative of
  :meth:`expected_log_density` in ``mean`` and minus its second: the working response ``z = mean + g / h``
  and weight ``h`` of the coordinate-ascent step of a GLMM (:mod:`lmevi.fitting.glmm`);
* ``inverse_link(eta)``: the mean of ``y`` given ``eta``;
* ``has_dispersion``: whether there is a scale to estimate (the Gaussian's ``sigma``, a Gamma's dispersion);
  it is held where the Gaussian's sigma is (``ModelParams.sigma``), and
  ``update_dispersion(y, mean, var, dispersion, rows)`` is its M-step given q's moments;
* ``start(X, y, n_obs, weights=None, offset=None)``: starting values ``(beta (p,), dispersion ())``, with R's
  prior weights and offset when given;
* ``moment_form``: ``True`` when the summed expected log-density depends on q only through
  ``sum_i (r_i - mean_i)^2`` and ``sum_i var_i`` (the Gaussian's ``expected_log_lik_from_sums``), which is
  what lets the closed-form ELBO skip the per-row variances and coordinate ascent update q in closed form;
* ``standardise_y``: whether the design stage may centre and scale the response (the Gaussian's units are
  free; a count's or a 0/1 response's are not);
* ``encode(column, name)``: the response column as numbers where the likelihood reads a non-numeric one (the
  binomial's two levels), else ``None``; ``check(y, name)``: a ``ValueError`` naming what the response may not
  hold (counts, 0/1); ``check_weighted(y, weights, name)``: the same under prior weights (a binomial's
  proportions of ``weights`` trials);
* ``deviance_residuals(y, mu)``: lme4's default ``residuals`` (the response residuals for the Gaussian).

:class:`Generalized` implements what follows from a log-density, a link and a variance function alone
(expectations by Gauss-Hermite quadrature, working moments and the dispersion's M-step by automatic
differentiation, the start by iteratively reweighted least squares), so a new family is one file with its
log-density and variance function, and one line in :data:`lmevi.families.registry.LIKELIHOODS`; where a family
has closed forms (the Poisson's log link, the binomial's logit), it overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmevi.families.quadrature import gauss_hermite
from lmevi.runtime.precision import wide

LOG_2PI = 1.8378770664093453


class Likelihood(Protocol):
    """What a response distribution provides (see the module docstring)."""

    name: str
    link: object
    links: tuple[str, ...]
    has_dispersion: bool
    moment_form: bool
    standardise_y: bool

    def log_density(self, y: jax.Array, eta: jax.Array, dispersion: jax.Array) -> jax.Array: ...

    def expected_log_density(
        self, y: jax.Array, mean: jax.Array, var: jax.Array, dispersion: jax.Array
    ) -> jax.Array: ...

    def working_moments(
        self, y: jax.Array, mean: jax.Array, var: jax.Array, dispersion: jax.Array
    ) -> tuple[jax.Array, jax.Array]: ...

    def update_dispersion(self, y, mean, var, dispersion, rows) -> jax.Array: ...

    def inverse_link(self, eta: jax.Array) -> jax.Array: ...

    def start(self, X: jax.Array, y: jax.Array, n_obs, weights=None, offset=None) -> tuple[jax.Array, jax.Array]: ...

    def encode(self, column, name: str): ...

    def check(self, y, name: str) -> None: ...

    def check_weighted(self, y, weights, name: str) -> None: ...

    def deviance_residuals(self, y, mu): ...


# The working weight h is floored here (relative to |g|): away from a canonical link the expected curvature can
# vanish or change sign on a row far in a tail, where a Newton step on that row alone would be unbounded.
_MIN_CURVATURE = 1e-10
# Newton steps on log(dispersion) in the dispersion's M-step (a smooth one-dimensional concave problem for the
# exponential families here; a few steps from the current value reach it to rounding).
DISPERSION_STEPS = 8


@dataclass(frozen=True)
class Generalized:
    """The shared part of a generalized family: the link, and what follows from ``log_density``,
    ``variance`` and the link (see the module docstring). Subclasses set ``name``, ``link``, ``links`` and
    ``has_dispersion``, and define ``log_density(y, eta, dispersion)`` and ``variance(mu)``."""

    has_dispersion: bool = False
    moment_form: bool = False
    standardise_y: bool = False

    def inverse_link(self, eta):
        return self.link.inverse(eta)

    def expected_log_density(self, y, mean, var, dispersion):
        """``(n_obs,)`` ``E[log p(y_i | eta_i)]`` by Gauss-Hermite quadrature (:func:`gauss_hermite`)."""
        return gauss_hermite(lambda e: self.log_density(y[:, None], e, dispersion), mean, var)

    def working_moments(self, y, mean, var, dispersion):
        """``(g, h)``: ``d/dm E[log p]`` and ``-d^2/dm^2 E[log p]`` per row, by automatic differentiation (the
        rows are independent, so the Hessian is diagonal and one Hessian-vector product with ones gives it)."""

        def total(m):
            return jnp.sum(self.expected_log_density(y, m, var, dispersion))

        g, hv = jax.jvp(jax.grad(total), (mean,), (jnp.ones_like(mean),))
        return g, jnp.maximum(-hv, _MIN_CURVATURE * (1.0 + jnp.abs(g)))

    def update_dispersion(self, y, mean, var, dispersion, rows):
        """The dispersion maximising ``sum_i rows_i E[log p(y_i | eta_i)]`` given q's row moments, by Newton's
        method on its logarithm from the current value; unchanged for a family without one."""
        if not self.has_dispersion:
            return dispersion

        def total(log_phi):
            per_row = self.expected_log_density(y, mean, var, jnp.exp(log_phi))
            return jnp.sum(jnp.where(rows, per_row, 0.0))

        grad, hess = jax.grad(total), jax.grad(jax.grad(total))

        def step(u, _):
            h = hess(u)
            return jnp.where(h < 0, u - grad(u) / h, u + jnp.sign(grad(u)) * 0.5), None

        u, _ = jax.lax.scan(step, jnp.log(dispersion), None, length=DISPERSION_STEPS)
        return jnp.exp(u).astype(dispersion.dtype)

    def dispersion_start(self, y, mu, n_free):
        """The dispersion's start from the fixed-effects fit: Pearson's ``sum (y - mu)^2 / V(mu) / (n - p)``
        (R's ``summary.glm``), or 1 for a family without one."""
        if not self.has_dispersion:
            return jnp.asarray(1.0, y.dtype)
        return jnp.sum((y - mu) ** 2 / self.variance(mu)) / n_free

    def start(self, X, y, n_obs, weights=None, offset=None):
        """Fixed-effects start ``beta (p,)`` by 25 iteratively reweighted least-squares steps of the GLM
        without random effects, from every row's predictor at the link of the response's mean; and the
        dispersion's start (1 without one: the scale that the random effects' starting SDs are a fraction of,
        :func:`lmevi.q.variational.init_params`). Padding rows (X = 0) add nothing to the normal equations.
        ``weights`` ``(n_obs,)``: R's prior weights (padding rows 0), which multiply the working weights;
        ``offset`` ``(n_obs,)``: added to the linear predictor (as R's ``glm.fit``)."""
        Xw, yw = wide(X), wide(y)
        pw = jnp.ones_like(yw) if weights is None else wide(weights)
        off = jnp.zeros_like(yw) if offset is None else wide(offset)
        rows = jnp.arange(yw.shape[0]) < n_obs
        pw = jnp.where(rows, pw, 0.0)
        ybar = jnp.sum(pw * yw) / jnp.maximum(jnp.sum(pw), 1e-300)
        eta = jnp.full_like(yw, self.link.link(ybar))

        def step(eta, _):
            mu = self.link.inverse(eta)
            d = self.link.mu_eta(eta)
            w = pw * d**2 / self.variance(mu)
            z = eta - off + (yw - mu) / d
            XtW = Xw.T * w
            beta = jnp.linalg.solve(XtW @ Xw + 1e-10 * jnp.eye(Xw.shape[1], dtype=Xw.dtype), XtW @ z)
            return Xw @ beta + off, beta

        _, betas = jax.lax.scan(step, eta, None, length=25)
        beta = betas[-1]
        mu = jnp.where(rows, self.link.inverse(Xw @ beta + off), jnp.mean(yw))
        if weights is None:
            phi = self.dispersion_start(jnp.where(rows, yw, mu), mu, n_obs - Xw.shape[1])
        else:  # Pearson's with prior weights: sum w (y - mu)^2 / V(mu) / (n - p), as summary.glm
            phi = self.dispersion_start(jnp.sqrt(pw) * (jnp.where(rows, yw, mu) - mu) + mu, mu, n_obs - Xw.shape[1])
        return beta.astype(y.dtype), jnp.asarray(phi, y.dtype)

    def check_weighted(self, y: np.ndarray, weights: np.ndarray, name: str) -> None:
        """The response under prior weights: the rows of positive weight as :meth:`check` (a binomial reads
        proportions of trials instead, :class:`lmevi.families.binomial.Binomial`)."""
        self.check(y[weights > 0], name)

    def encode(self, column: pd.Series, name: str) -> np.ndarray | None:
        return None  # numbers
