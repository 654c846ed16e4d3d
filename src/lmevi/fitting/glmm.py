r"""The coordinate-ascent step of a generalized linear mixed model (``method="cavi"``, the default;
:func:`lmevi.fitting.loops.run_cavi` takes :func:`step` as its sweep for likelihoods outside moment form).

Each step replaces the likelihood at the current q by the Gaussian one of a working response,
``z_i = E eta_i + g_i / h_i`` with row weights ``w_i = h_i``, where ``g_i`` and ``h_i`` are the first derivative
of ``E[log p(y_i | eta_i)]`` in the row's mean and minus its second (expectations under q; the likelihood's
``working_moments``: for a canonical link ``g_i = y_i - E[A'(eta_i)]`` and ``h_i = E[A''(eta_i)]``, ``A`` the
log-partition function), and takes one coordinate-ascent sweep of the Gaussian model (:func:`lmevi.q.cavi.sweep`)
on the rows scaled by ``sqrt(w_i)``, sigma fixed at 1. A block's update then sets its precision to
``Z^T W Z`` plus the prior's, and moves its mean by that precision's inverse times the ELBO's gradient: the
fixed point of Gaussian variational inference for these likelihoods (Opper & Archambeau 2009; natural-gradient
steps of size 1, Khan & Lin 2017), so every fixed point of the step is a stationary point of the GLMM's ELBO
(tested against the gradient). The M-step for the variance components and beta is the Gaussian model's, on the
same q moments; a likelihood with a dispersion then updates it by its own M-step (``update_dispersion``).
SQUAREM accelerates it as it does the Gaussian sweeps, and keeps a step only if the GLMM's own ELBO does not
fall.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lmevi.families.gaussian import GAUSSIAN
from lmevi.frame.design import Design, TermData
from lmevi.q import cavi
from lmevi.q import elbo as elbo_lib


def supports(problem) -> bool:
    """Whether coordinate ascent can take :func:`step`: a q whose coordinate-ascent sweep exists for the Gaussian
    working problem (:func:`lmevi.q.cavi.supports` of it) and a likelihood outside moment form."""
    return not problem.likelihood.moment_form and cavi.supports(
        dataclasses.replace(problem, likelihood=GAUSSIAN))


def _row_moments(problem, params):
    design = problem.design
    rows = elbo_lib.observed_rows(problem)
    mean, var = problem.q.row_moments(design, problem.spec, params.blocks, problem.block_data)
    return rows, elbo_lib.fixed_part(design, params) + mean, jnp.where(rows, var, 1.0)


def working_problem(problem, params):
    """The Gaussian problem whose coordinate-ascent sweep is one step of the GLMM fit at ``params`` (see the
    module docstring): rows scaled by ``sqrt(w_i)``, response ``sqrt(w_i) z_i``, sigma fixed at 1. Padding rows
    keep weight 0. R's prior weights multiply ``w_i``; an offset is taken off ``z_i``. Same shapes and structure as ``problem``, so its programs compile once."""
    design = problem.design
    rows, eta, var = _row_moments(problem, params)
    y = jnp.where(rows, design.y, problem.likelihood.inverse_link(eta))  # padding rows: inside the support
    g, h = problem.likelihood.working_moments(y, eta, var, params.model.sigma)
    fill = rows.astype(design.y.dtype)
    # prior weights multiply g and h alike: z is unchanged, the working weight is w_i h_i
    w = h * fill if design.weights is None else h * design.weights * fill
    z = eta + g / jnp.where(rows, h, 1.0)
    if design.offset is not None:  # the working model is for the linear predictor less its offset
        z = z - design.offset
    sw = jnp.sqrt(w)
    terms = tuple(TermData(index=t.index, covariates=t.covariates * sw[:, None], n_levels=t.n_levels, unit=False)
                  for t in design.terms)
    work = Design(y=sw * z * fill, X=design.X * sw[:, None], terms=terms)
    return dataclasses.replace(problem, design=work, block_data=problem.q.block_data(work, problem.spec),
                               likelihood=GAUSSIAN, estimate_sigma=False)


def step(problem, params):
    """One step of the GLMM fit: ``(params, elbo)``, the ELBO the GLMM's own (:func:`lmevi.q.elbo.closed_form`)."""
    # the working problem's sigma is 1 (its weights carry the dispersion); the dispersion is kept beside it
    dispersion = params.model.sigma
    unit = params._replace(model=params.model._replace(sigma=jnp.ones_like(dispersion)))
    new, _ = cavi.sweep(working_problem(problem, params), unit)
    new = new._replace(model=new.model._replace(sigma=dispersion))
    like = problem.likelihood
    if like.has_dispersion and problem.estimate_sigma:
        rows, eta, var = _row_moments(problem, new)
        y = jnp.where(rows, problem.design.y, like.inverse_link(eta))
        phi = like.update_dispersion(y, eta, var, new.model.sigma, rows)
        new = new._replace(model=new.model._replace(sigma=phi))
    return new, elbo_lib.closed_form(problem, new)
