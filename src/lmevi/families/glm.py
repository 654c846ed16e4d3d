r"""Generalized linear mixed models: the Poisson (log link) and binomial (logit link) likelihoods, lme4's
``glmer(..., family = poisson)`` and ``glmer(..., family = binomial)`` for a 0/1 response.

Each is one frozen class behind the seam of :mod:`lmevi.families.likelihood` (registered there under lme4's family
name). Neither has a dispersion (lme4 fixes it at 1), neither is in moment form, so the closed-form ELBO takes
the rows' means and variances under q, ``eta_i ~ N(m_i, v_i)``, and the optax path maximises it:

* Poisson: ``E[log p(y_i | eta_i)] = y_i m_i - exp(m_i + v_i / 2) - log(y_i!)``, exact;
* binomial (Bernoulli, logit link): ``E[log p] = y_i m_i - E[log(1 + exp(eta_i))]``; the expectation of the
  softplus has no closed form and is taken by Gauss-Hermite quadrature with :data:`GH_NODES` nodes (exact for
  polynomials of degree up to ``2 GH_NODES - 1``; tested against 200 nodes).

The response is not standardised (its units are the likelihood's), the fixed effects' columns are.

Fitting (``method="cavi"``, the default; :func:`lmevi.fitting.loops.run_cavi` takes :func:`step` as its sweep
for these likelihoods): each step replaces the likelihood at the current q
by the Gaussian one of a working response, ``z_i = E eta_i + (y_i - E[A'(eta_i)]) / E[A''(eta_i)]`` with row
weights ``w_i = E[A''(eta_i)]`` (``A`` the log-partition function: ``exp`` for the Poisson, the softplus for
the binomial; expectations under q), and takes one coordinate-ascent sweep of the Gaussian model
(:func:`lmevi.q.cavi.sweep`) on the rows scaled by ``sqrt(w_i)``, sigma fixed at 1. A block's update then sets
its precision to ``Z^T W Z`` plus the prior's, and moves its mean by that precision's inverse times the ELBO's
gradient: the fixed point of Gaussian variational inference for these likelihoods (Opper & Archambeau 2009;
natural-gradient steps of size 1, Khan & Lin 2017), so every fixed point of the step is a stationary point of
the GLMM's ELBO (tested against the gradient). The M-step for the variance components and beta is the Gaussian
model's, on the same q moments. SQUAREM accelerates it as it does the Gaussian sweeps, and keeps a step only
if the GLMM's own ELBO does not fall. ``method="optax"`` maximises the same ELBO with L-BFGS instead
(slower: thousands of steps on nested designs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmevi.runtime.precision import wide

# Gauss-Hermite nodes for E[f(eta)], eta ~ N(m, v): E f = sum_k w_k f(m + sqrt(2 v) x_k) / sqrt(pi). For the
# softplus the rule's error grows with v (against 300 nodes, at |m| <= 3): with 48 nodes under 1e-15 at v = 1,
# 4e-10 at v = 4, 3e-7 at v = 9; with 32 nodes 3e-8 at v = 4.
GH_NODES = 48


@functools.cache
def _hermgauss(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights (made at first use: ``numpy.polynomial`` is not needed to import lmevi)."""
    from numpy.polynomial.hermite import hermgauss

    return hermgauss(nodes)


def gauss_hermite(f, mean: jax.Array, var: jax.Array, nodes: int = GH_NODES) -> jax.Array:
    """``E[f(eta)]`` for ``eta ~ N(mean, var)`` elementwise, by Gauss-Hermite quadrature; ``mean``, ``var``
    ``(n,)`` -> ``(n,)``."""
    x, w = _hermgauss(nodes)
    x = jnp.asarray(x, mean.dtype)
    w = jnp.asarray(w / np.sqrt(np.pi), mean.dtype)
    points = mean[:, None] + jnp.sqrt(2.0 * var)[:, None] * x[None, :]
    return f(points) @ w


@dataclass(frozen=True)
class _NoDispersion:
    """What the Poisson and binomial likelihoods share: no dispersion, not in moment form, a response in its
    own units, and a start by iteratively reweighted least squares from their link functions."""

    has_dispersion: bool = False
    moment_form: bool = False
    standardise_y: bool = False

    def start(self, X, y, n_obs):
        """Fixed-effects start ``beta (p,)`` by 25 iteratively reweighted least-squares steps of the GLM
        without random effects, from every row's predictor at the link of the response's mean; and the scale
        1.0 that the random effects' starting SDs are a fraction of (:func:`lmevi.q.variational.init_params`).
        Padding rows (X = 0) add nothing to the normal equations."""
        Xw, yw = wide(X), wide(y)
        eta = jnp.full_like(yw, self._link(jnp.sum(yw) / n_obs))

        def step(eta, _):
            mu = self.inverse_link(eta)
            d = self._dmu_deta(eta)
            w = d**2 / self._variance(mu)
            z = eta + (yw - mu) / d
            XtW = Xw.T * w
            beta = jnp.linalg.solve(XtW @ Xw + 1e-10 * jnp.eye(Xw.shape[1], dtype=Xw.dtype), XtW @ z)
            return Xw @ beta, beta

        _, betas = jax.lax.scan(step, eta, None, length=25)
        return betas[-1].astype(y.dtype), jnp.asarray(1.0, y.dtype)

    def encode(self, column: pd.Series, name: str) -> np.ndarray | None:
        return None  # numbers


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


@dataclass(frozen=True)
class Poisson(_NoDispersion):
    """``y_i ~ Poisson(exp(eta_i))``, log link; no dispersion."""

    name: str = "poisson"
    link: str = "log"

    def log_density(self, y, eta, dispersion):
        """``(n_obs,)`` ``y_i eta_i - exp(eta_i) - log(y_i!)``."""
        return y * eta - jnp.exp(eta) - jax.scipy.special.gammaln(y + 1.0)

    def expected_log_density(self, y, mean, var, dispersion):
        """``(n_obs,)`` ``y_i m_i - exp(m_i + v_i / 2) - log(y_i!)`` (the log-normal mean)."""
        return y * mean - jnp.exp(mean + 0.5 * var) - jax.scipy.special.gammaln(y + 1.0)

    def inverse_link(self, eta):
        return jnp.exp(eta)

    def moments(self, mean, var):
        """``(E[A'(eta)], E[A''(eta)])`` ``(n,)`` each for ``eta ~ N(mean, var)``: both ``exp(mean + var / 2)``."""
        mu = jnp.exp(mean + 0.5 * var)
        return mu, mu

    # the link, d mu / d eta and the variance function, for the start (_NoDispersion.start)
    _link = staticmethod(jnp.log)
    _dmu_deta = staticmethod(jnp.exp)

    @staticmethod
    def _variance(mu):
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


def _softplus(x):
    return jnp.logaddexp(0.0, x)


@dataclass(frozen=True)
class Binomial(_NoDispersion):
    """``y_i ~ Bernoulli(1 / (1 + exp(-eta_i)))``, logit link, a 0/1 response (booleans and two-level columns
    are read as 0/1); no dispersion."""

    name: str = "binomial"
    link: str = "logit"

    def log_density(self, y, eta, dispersion):
        """``(n_obs,)`` ``y_i eta_i - log(1 + exp(eta_i))``."""
        return y * eta - _softplus(eta)

    def expected_log_density(self, y, mean, var, dispersion):
        """``(n_obs,)`` ``y_i m_i - E[log(1 + exp(eta_i))]`` (Gauss-Hermite, :func:`gauss_hermite`)."""
        return y * mean - gauss_hermite(_softplus, mean, var)

    def inverse_link(self, eta):
        return jax.nn.sigmoid(eta)

    def moments(self, mean, var):
        """``(E[sigmoid(eta)], E[sigmoid(eta) (1 - sigmoid(eta))])`` ``(n,)`` each (Gauss-Hermite)."""
        sig = jax.nn.sigmoid
        return gauss_hermite(sig, mean, var), gauss_hermite(lambda e: sig(e) * sig(-e), mean, var)

    # the link, d mu / d eta and the variance function, for the start (_NoDispersion.start)
    @staticmethod
    def _link(mu):
        return jnp.log(mu / (1.0 - mu))

    @staticmethod
    def _dmu_deta(eta):
        return jax.nn.sigmoid(eta) * (1.0 - jax.nn.sigmoid(eta))

    @staticmethod
    def _variance(mu):
        return mu * (1.0 - mu)

    def encode(self, column: pd.Series, name: str) -> np.ndarray | None:
        return _two_levels(column, name)

    def check(self, y: np.ndarray, name: str) -> None:
        """0 or 1 on every row."""
        if np.any((y != 0) & (y != 1)):
            bad = y[(y != 0) & (y != 1)][0]
            raise ValueError(f"the response {name!r} of a binomial model must be 0/1 (or two levels, or booleans), "
                             f"it has {bad:g}; for k successes out of n trials write one row per trial")

    def deviance_residuals(self, y, mu):
        """``(n,)`` signed square roots of each row's deviance (lme4's default ``residuals`` of a glmer)."""
        mu = np.clip(mu, 1e-300, 1.0 - 1e-16)
        dev = -2.0 * (y * np.log(mu) + (1.0 - y) * np.log1p(-mu))
        return np.sign(y - mu) * np.sqrt(np.maximum(dev, 0.0))


POISSON = Poisson()
BINOMIAL = Binomial()


def supports(problem) -> bool:
    """Whether coordinate ascent can take :func:`step`: the block-Gaussian q of :mod:`lmevi.q.variational` and a
    likelihood outside moment form that gives the moments the working problem needs (``moments``)."""
    from lmevi.q import variational

    like = problem.likelihood
    return problem.q.implementation is variational and not like.moment_form and hasattr(like, "moments")


def working_problem(problem, params):
    """The Gaussian problem whose coordinate-ascent sweep is one step of the GLMM fit at ``params`` (see the
    module docstring): rows scaled by ``sqrt(w_i)``, response ``sqrt(w_i) z_i``, sigma fixed at 1. Padding rows
    keep weight 0. Same shapes and structure as ``problem``, so its programs compile once."""
    import dataclasses

    from lmevi.q import elbo as elbo_lib
    from lmevi.q import variational
    from lmevi.frame.design import Design, TermData
    from lmevi.families.likelihood import GAUSSIAN

    design = problem.design
    rows = elbo_lib.observed_rows(problem).astype(design.y.dtype)
    mean, var = problem.q.row_moments(design, problem.spec, params.blocks, problem.block_data)
    eta = elbo_lib.fixed_part(design, params) + mean
    d1, d2 = problem.likelihood.moments(eta, var)
    w = d2 * rows
    z = eta + (design.y - d1) / jnp.where(rows > 0, d2, 1.0)
    sw = jnp.sqrt(w)
    terms = tuple(TermData(index=t.index, covariates=t.covariates * sw[:, None], n_levels=t.n_levels, unit=False)
                  for t in design.terms)
    work = Design(y=sw * z * rows, X=design.X * sw[:, None], terms=terms)
    return dataclasses.replace(problem, design=work, block_data=variational.block_data(work, problem.spec),
                               likelihood=GAUSSIAN, estimate_sigma=False)


def step(problem, params):
    """One step of the GLMM fit: ``(params, elbo)``, the ELBO the GLMM's own (:func:`lmevi.q.elbo.closed_form`)."""
    from lmevi.q import cavi
    from lmevi.q import elbo as elbo_lib

    new, _ = cavi.sweep(working_problem(problem, params), params)
    return new, elbo_lib.closed_form(problem, new)
