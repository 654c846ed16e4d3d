"""The ELBO: closed form against a dense computation, Monte Carlo against the closed form."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from dense import dense_design, dense_kl_part, dense_q, kernel_problem, random_params
from lmevi.q import elbo

# Compiled once per family (``spec`` is static in the problem): eager JAX would compile every primitive separately.
closed_form = jax.jit(elbo.closed_form)


def dense_elbo(problem, spec, params) -> float:
    """``E_q[log p(y | b)] + E_q[log p(b)] + H[q]`` with the full covariance of q formed in NumPy.

    ``E_q[log N(y | o + A v, s^2 I)] = sum_i log N(y_i | o_i + A_i m, s^2) - tr(A C A^T) / (2 s^2)`` for
    ``v ~ N(m, C)``; ``E_q[log N(b | 0, P^{-1})] = -D/2 log 2 pi + 1/2 log|P| - 1/2 (m^T P m + tr(P C))``
    over the random effects; ``H = 1/2 log|2 pi e C|`` over all of q (beta included when it is in q).
    """
    mean, cov = dense_q(spec, params.blocks)
    A = dense_design(problem, spec)
    sigma = float(params.model.sigma)
    y = np.asarray(problem.design.y)
    offset = np.zeros_like(y) if spec.reml else problem.X @ np.asarray(params.model.beta)
    ell = stats.norm.logpdf(y, offset + A @ mean, sigma).sum() - np.trace(A @ cov @ A.T) / (2 * sigma**2)
    return ell + dense_kl_part(spec, params, mean, cov)


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_matches_dense_reference(crossed, family_spec, seed):
    params = random_params(seed, family_spec)
    got = float(closed_form(kernel_problem(crossed.design, family_spec), params))
    want = dense_elbo(crossed, family_spec, params)
    # Same quantity by two routes over ~100 terms: float64 rounding (measured at most 1.2e-14 relative);
    # 1e-12 leaves room for the dense solves and nothing for a missing or misplaced term.
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("family_spec", ["arrowhead-reml"], indirect=True)
def test_closed_form_is_finite_and_differentiable(crossed, family_spec):
    params = random_params(3, family_spec)
    kp = kernel_problem(crossed.design, family_spec)
    value, grad = jax.jit(jax.value_and_grad(elbo.closed_form, argnums=1))(kp, params)
    assert value.shape == ()
    assert np.isfinite(float(value))
    leaves = jax.tree_util.tree_leaves(grad)
    assert leaves and all(np.all(np.isfinite(leaf)) for leaf in leaves)


# Between them these two families take every branch of the sampler: blocks with only a large term, only a
# small part (beta), and a large term coupled to a small part that holds beta.
@pytest.mark.parametrize("family_spec", ["meanfield-reml", "arrowhead-reml"], indirect=True)
def test_monte_carlo_average_matches_closed_form(crossed, family_spec):
    params = random_params(5, family_spec)
    kp = kernel_problem(crossed.design, family_spec)
    exact = float(closed_form(kp, params))
    estimate = jax.jit(elbo.monte_carlo, static_argnames="num_samples")
    # 50 independent estimates of 100 draws each (one compilation); their spread gives the standard error
    batches = np.array(
        [estimate(jax.random.PRNGKey(i), kp, params, num_samples=100) for i in range(50)]
    )
    se = batches.std(ddof=1) / np.sqrt(len(batches))
    # The estimator is unbiased: the mean of 5000 draws lies within 4 standard errors of the exact value
    # (two-sided probability 6e-5) unless the sampler's mean or covariance is wrong.
    assert abs(batches.mean() - exact) < 4 * se
