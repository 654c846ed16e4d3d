r"""The evidence lower bound, two ways (Blei, Kucukelbir & McAuliffe 2017).

    ELBO(q, beta, Sigma, sigma) = E_q[log p(y | b, beta, sigma)] + E_q[log p(b | Sigma)] + H[q]

* :func:`closed_form`: for the Gaussian likelihood the first term is exact,
  ``-n/2 log(2 pi sigma^2) - 1/(2 sigma^2) sum_i [(r_i - E eta_i)^2 + Var eta_i]``, so the ELBO has no
  Monte Carlo noise and L-BFGS or coordinate ascent can maximise it.
* :func:`monte_carlo`: the Edward tutorial's ``ed.KLqp``. With normal priors and normal q, Edward's KLqp
  estimates only the expected log-likelihood by reparameterised sampling (``num_samples`` draws) and uses
  the analytic KL term, ``E_q[log p(b)] + H[q]``; so does this function. Its average over draws equals
  :func:`closed_form`.

When beta is in q (``reml=True``) its flat prior contributes no term, so the bound is on the restricted
(REML) likelihood up to a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmevi import variational
from lmevi.design import Design
from lmevi.variational import QSpec, VIParams
from lmevi.model import LOG_2PI, log_likelihood


def fixed_part(design: Design, params: VIParams) -> jax.Array:
    """``X beta`` for point-estimated beta, zeros when beta is in q; ``(n_obs,)``."""
    if params.model.beta is None:
        return jnp.zeros_like(design.y)
    return design.X @ params.model.beta


def expected_log_likelihood(sq_resid_sum: jax.Array, var_sum: jax.Array, n_obs: int, sigma: jax.Array):
    """``E_q[log p(y | ...)]`` from ``sum_i (r_i - E eta_i)^2`` and ``sum_i Var eta_i``; returns ``()``."""
    return -0.5 * n_obs * (LOG_2PI + 2.0 * jnp.log(sigma)) - 0.5 * (sq_resid_sum + var_sum) / sigma**2


def kl_part(spec: QSpec, params: VIParams) -> jax.Array:
    """``E_q[log p(b | Sigma)] + H[q]``, i.e. minus ``KL(q || p(b | Sigma))``; returns ``()``."""
    return variational.expected_log_prior(spec, params) + variational.entropy(spec, params.blocks)


def closed_form(params: VIParams, design: Design, spec: QSpec, data) -> jax.Array:
    """The exact ELBO; one pass over the rows (for the means: the variances' sum comes from ``data``'s
    cross-products, see :func:`lmevi.variational.row_var_sum`). Returns ``()``."""
    mean = variational.row_mean(design, spec, params.blocks)
    resid = design.y - fixed_part(design, params) - mean
    var_sum = variational.row_var_sum(spec, params.blocks, data)
    ell = expected_log_likelihood(variational.sum_of_squares(resid), var_sum, design.y.shape[0], params.model.sigma)
    return ell + kl_part(spec, params)


def monte_carlo(rng_key, params: VIParams, design: Design, spec: QSpec, num_samples: int = 1) -> jax.Array:
    """Edward's KLqp estimate: sampled expected log-likelihood plus analytic KL. Returns ``()``.

    Args:
        rng_key: a ``jax.random`` key; ``num_samples`` draws are taken from it.
        params: point estimates and q.
        design: the model's arrays.
        spec: the family.
        num_samples: draws from q per estimate (the tutorial uses 1).
    """

    def one(key):
        effects, beta = variational.sample(key, spec, params.blocks)
        b0 = params.model.beta if beta is None else beta
        return log_likelihood(design, b0, effects, params.model.sigma)

    ells = jax.vmap(one)(jax.random.split(rng_key, num_samples))
    return jnp.mean(ells) + kl_part(spec, params)
