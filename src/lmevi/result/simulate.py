"""Responses drawn from a fitted Gaussian mixed model, as lme4's ``simulate(m, nsim, seed)``.

Each replicate draws new random effects and new residuals (lme4's default ``use.u = FALSE``):

    y* = X beta + sum_k Z_k b*_k + e*,     b*_kj ~ N(0, Sigma_k) for every level j,     e*_i ~ N(0, sigma^2),

with ``Sigma_k = L_k L_k'`` and ``sigma`` the fit's estimates (in the data's units). ``Z_k b*_k`` is a gather
of each row's level followed by a product with the row's covariates, never a dense ``Z``.

Randomness comes only from explicit ``jax.random`` keys: replicate ``i`` of ``simulate(fit, n, seed)`` is
drawn from ``jax.random.fold_in(jax.random.key(seed), i)``, so the same seed gives the same numbers, and a
replicate depends neither on ``n`` nor on how the replicates are batched (:mod:`lmevi.result.bootstrap` relies on this). The
numbers are not R's: lme4's ``simulate`` uses R's generator.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.frame.design import Design, DesignInfo, build_design
from lmevi.runtime.precision import x64


class FittedModel(NamedTuple):
    """What simulating from (and refitting) a Gaussian fit needs, in the data's units (host-side NumPy).

    Attributes:
        design: the fit's arrays rebuilt from its formula and data (float64, data units, no padding).
        info: the fit's names and labels.
        beta: ``(p,)`` fixed effects.
        chol: per term (design order) ``(p_k, p_k)`` lower Cholesky factor ``L_k`` of ``Sigma_k``.
        sigma: residual SD.
        reml: the criterion the fit used.
    """

    design: Design
    info: DesignInfo
    beta: np.ndarray
    chol: tuple[np.ndarray, ...]
    sigma: float
    reml: bool


def fitted_model(fit) -> FittedModel:
    """The :class:`FittedModel` of a Gaussian :class:`lmevi.result.fitresult.FitResult` that kept its data.

    Reads ``fit.options`` (``family``, ``reml``, ``missing``), ``fit.info`` (the parsed formula, labels),
    ``fit.data``, ``fit.fixef()`` and ``fit.params.model`` (``chol``, ``sigma``, data units).
    """
    if not fit.likelihood.moment_form:
        raise ValueError(f"simulate draws from a Gaussian fit (lmer); this fit's family is {fit.options.family!r}")
    if fit.options.residual_scale is not None:
        raise ValueError("simulate needs sigma estimated (the fit fixed residual_scale)")
    if fit.data is None:
        raise ValueError("this result keeps no data: simulate rebuilds the design from the fit's formula and data")
    with jax.enable_x64(True):
        design, _ = build_design(fit.info.formula, fit.data, jnp.float64, fit.options.missing)
    design = Design(
        y=np.asarray(design.y, np.float64),
        X=np.asarray(design.X, np.float64),
        terms=tuple(t.__class__(index=np.asarray(t.index), covariates=np.asarray(t.covariates, np.float64),
                                n_levels=t.n_levels) for t in design.terms),
    )
    beta = np.asarray(fit.fixef().to_numpy(), np.float64)
    if beta.shape != (design.X.shape[1],):
        raise ValueError(f"{beta.shape[0]} fixed effects for {design.X.shape[1]} columns of X")
    chol = tuple(np.asarray(L, np.float64) for L in fit.params.model.chol)
    return FittedModel(design, fit.info, beta, chol, float(fit.params.model.sigma), bool(fit.options.reml))


def replicate_keys(seed: int, n: int) -> jax.Array:
    """``(n,)`` the keys of replicates ``0..n-1`` of ``seed``: ``jax.random.fold_in(jax.random.key(seed), i)``,
    so that replicate ``i`` is the same whatever ``n`` (the first 10 of 1,000 replicates are the 10 replicates
    of ``n=10``)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(int(seed)), jnp.arange(int(n)))


def _draw(key, X, terms, beta, chol, sigma):
    """``(n_obs,)`` one response drawn with ``key`` (pure; see the module docstring)."""
    keys = jax.random.split(key, len(terms) + 1)
    mean = X @ beta
    for k, (term, L) in enumerate(zip(terms, chol)):
        u = jax.random.normal(keys[k], (term.n_levels, L.shape[0]), X.dtype)
        b = u @ L.T  # (J_k, p_k), rows ~ N(0, L L')
        mean = mean + jnp.sum(term.covariates * b[term.index], axis=1)
    return mean + sigma * jax.random.normal(keys[-1], mean.shape, X.dtype)


@jax.jit
def draw_responses(keys: jax.Array, X, terms, beta, chol, sigma) -> jax.Array:
    """``(n_obs, n)`` one response per key ``(n,)`` (pure, jit-compiled; run it with 64-bit JAX on).

    Args:
        keys: ``(n,)`` typed PRNG keys, one per replicate.
        X: ``(n_obs, p)``; terms: the design's :class:`lmevi.frame.design.TermData`; beta: ``(p,)``;
        chol: per term ``(p_k, p_k)``; sigma: ``()``.
    """
    return jax.vmap(lambda k: _draw(k, X, terms, beta, chol, sigma), out_axes=1)(keys)


@x64
def simulate_model(model: FittedModel, keys: jax.Array) -> np.ndarray:
    """``(n_obs, n)`` responses of :class:`FittedModel` ``model``, one per key (float64 NumPy)."""
    d = model.design
    args = jax.device_put((d.X, d.terms, model.beta, model.chol, np.asarray(model.sigma)))
    return np.asarray(draw_responses(keys, *args), np.float64)


def simulate(fit, n: int = 1, seed: int = 0) -> np.ndarray:
    """Responses drawn from a fitted Gaussian model, as lme4's ``simulate(m, nsim = n, seed = seed)``.

    Args:
        fit: a Gaussian :class:`lmevi.result.fitresult.FitResult` that kept its data (any q; the bootstrap needs
            ``q="exact"``).
        n: number of replicates.
        seed: the integer seed of ``jax.random.key``.

    Returns:
        ``(n_obs, n)`` float64, rows in the fit's row order (``fit.info.rows``).
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return simulate_model(fitted_model(fit), replicate_keys(seed, n))
