r"""The evidence lower bound, two ways (Blei, Kucukelbir & McAuliffe 2017).

    ELBO(q, beta, Sigma, sigma) = E_q[log p(y | b, beta, sigma)] + E_q[log p(b | Sigma)] + H[q]

* :func:`closed_form`: the first term from the rows' means and variances under q. For the Gaussian
  likelihood it is exact and needs only ``sum_i (r_i - E eta_i)^2`` and ``sum_i Var eta_i``
  (``-n/2 log(2 pi sigma^2) - 1/(2 sigma^2) sum_i [(r_i - E eta_i)^2 + Var eta_i]``), so the ELBO has no
  Monte Carlo noise and L-BFGS or coordinate ascent can maximise it.
* :func:`monte_carlo`: the Edward tutorial's ``ed.KLqp``. With normal priors and normal q, Edward's KLqp
  estimates only the expected log-likelihood by reparameterised sampling (``num_samples`` draws) and uses
  the analytic KL term, ``E_q[log p(b)] + H[q]``; so does this function. Its average over draws equals
  :func:`closed_form`.

When beta is in q (``reml=True``) its flat prior contributes no term, so the bound is on the restricted
(REML) likelihood up to a constant. Every function takes the :class:`~lmevi.fitting.build.Problem` first and asks
its likelihood and its q family (the seams of :mod:`lmevi.families.base` and :mod:`lmevi.q.protocol`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmevi.q.model import linear_predictor
from lmevi.q.variational import VIParams


def fixed_part(design, params: VIParams) -> jax.Array:
    """``X beta`` for point-estimated beta, zeros when beta is in q, plus the design's offset where it has one;
    ``(n_obs,)``."""
    if params.model.beta is None:
        out = jnp.zeros_like(design.y)
    else:
        out = design.X @ params.model.beta
    return out if design.offset is None else out + design.offset


def weighted(design, per_row: jax.Array) -> jax.Array:
    """``w_i l_i``: a row's log-likelihood times its prior weight (R's ``weights``), or as it is without them."""
    return per_row if design.weights is None else design.weights * per_row


def kl_part(problem, params: VIParams) -> jax.Array:
    """``E_q[log p(b | Sigma)] + H[q]``, i.e. minus ``KL(q || p(b | Sigma))``; returns ``()``."""
    q = problem.q
    mask = problem.level_mask
    return q.expected_log_prior(problem.spec, params, mask) + q.entropy(problem.spec, params.blocks, mask)


def closed_form(problem, params: VIParams) -> jax.Array:
    """The exact ELBO; one pass over the rows (for the means: under a likelihood with ``moment_form`` the
    variances' sum comes from the q's design-only arrays, see :func:`lmevi.q.moments.row_var_sum`).
    Returns ``()``."""
    design, q, like = problem.design, problem.q, problem.likelihood
    offset = fixed_part(design, params)
    if like.moment_form:
        mean = q.row_mean(design, problem.spec, params.blocks)
        resid = design.y - offset - mean
        var_sum = q.row_var_sum(problem.spec, params.blocks, problem.block_data)
        ell = like.expected_log_lik_from_sums(sum_of_squares(resid), var_sum, problem.n_obs, params.model.sigma)
    else:
        mean, var = q.row_moments(design, problem.spec, params.blocks, problem.block_data)
        # padding rows after the data's drop out (their variance set to 1 and their response to the row's mean
        # first: a zero variance has no finite derivative under quadrature, a zero response may lie outside the
        # family's support (a Gamma's), and NaN times the zero weight of jnp.where's gradient stays NaN)
        rows = observed_rows(problem)
        var = jnp.where(rows, var, 1.0)
        eta = offset + mean
        y = jnp.where(rows, design.y, like.inverse_link(eta))
        per_row = weighted(design, like.expected_log_density(y, eta, var, params.model.sigma))
        ell = jnp.sum(jnp.where(rows, per_row, 0.0))
    return ell + kl_part(problem, params)


def observed_rows(problem) -> jax.Array:
    """``(n_rows,)`` ``True`` on the data's rows, ``False`` on the padding rows after them (one process's rows:
    a multi-process fit interleaves its processes' padding, so the likelihoods that need this run in one)."""
    return jnp.arange(problem.design.y.shape[0]) < problem.n_rows


def sum_of_squares(x: jax.Array) -> jax.Array:
    """``sum_i x_i^2`` of a per-row vector ``(n_obs,)``; returns ``()``.

    Written so that XLA's CPU compiler materialises ``x`` in one fused pass and only then reduces it: summed
    directly, the gathers and column slices that produce ``x`` are fused into one library (YNNPACK) reduction
    that ran 5-10x slower than the pass itself at 1e6 rows (jaxlib 0.10, float64). The appended zero does not
    change the sum.
    """
    x = jnp.concatenate([x, jnp.zeros((1,), x.dtype)])
    return jnp.sum(x**2)


def monte_carlo(rng_key, problem, params: VIParams, num_samples: int = 1) -> jax.Array:
    """Edward's KLqp estimate: sampled expected log-likelihood plus analytic KL. Returns ``()``.

    Args:
        rng_key: a ``jax.random`` key; ``num_samples`` draws are taken from it.
        problem: the model's arrays and structure.
        params: point estimates and q.
        num_samples: draws from q per estimate (the tutorial uses 1).
    """
    design, like = problem.design, problem.likelihood

    def one(key):
        effects, beta = problem.q.sample(key, problem.spec, params.blocks)
        b0 = params.model.beta if beta is None else beta
        eta = linear_predictor(design, b0, effects)
        eta = eta if design.offset is None else eta + design.offset
        return jnp.sum(weighted(design, like.log_density(design.y, eta, params.model.sigma)))

    ells = jax.vmap(one)(jax.random.split(rng_key, num_samples))
    return jnp.mean(ells) + kl_part(problem, params)
