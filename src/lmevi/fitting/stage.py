"""Fitting stage, as lme4's ``optimizeLmer``: a :class:`~lmevi.fitting.build.Model` in, point estimates, q and a run
record out, all in the model's standardised units (:mod:`lmevi.result.fitresult` maps them back).

:class:`FitSettings` is the typed record of how a fit runs (method, ELBO estimator, optimizer, stop rule,
seed); :func:`settings` checks and completes user options into one; :func:`fit_model` runs it.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lmevi.q import cavi
from lmevi.fitting.build import Model, Problem
from lmevi.fitting.loops import RunInfo, StopRule, run_cavi, run_optax
from lmevi.runtime.precision import x64
from lmevi.runtime.jit import sized_jit
from lmevi.q.model import ModelParams
from lmevi.q import registry as q_registry
from lmevi.q.protocol import VIParams
from lmevi.fitting.control import FitSettings, settings, variational_only


@x64
def fit_model(model: Model, fit_settings: FitSettings | None = None) -> tuple[VIParams, RunInfo]:
    """Variational EM on a built model.

    Args:
        model: from :func:`lmevi.build_model`.
        fit_settings: from :func:`settings` (default: ``settings()``, coordinate ascent).

    Returns:
        ``(params, run)``: point estimates and q in the model's standardised units, and the run record.
    """
    s = settings() if fit_settings is None else fit_settings
    problem = model.problem
    if model.q_name == "exact":
        asked = variational_only(s)
        if asked is not None:
            raise ValueError(f"the model was built with q='exact' (lme4's profiled criterion), but the settings ask "
                             f"for {asked}, which only variational EM has: build the model with a variational q "
                             f"(q='structured' or 'meanfield'), or leave those options at their defaults")
        return _fit_exact(model, s)
    if s.method != "cavi" and model.padded:
        raise ValueError("the optax path fits unpadded models only: build the model with pad=False")
    init = initial_params(problem, s.init_scale)
    if s.method == "cavi":  # Poisson and binomial: working-response steps (lmevi.fitting.glmm.step)
        params, run = run_cavi(
            problem, init, s.rule, progress=s.progress, snapshot_steps=s.snapshot_steps, accelerate=s.accelerate
        )
        if problem.likelihood.moment_form:
            params, run = _polish_boundary(problem, params, run, s.rule, s.accelerate)
    else:
        start = init
        if s.elbo == "closed_form" and cavi.supports(problem):
            # start q at its closed-form optimum given the starting point estimates: from a q far from
            # its optimum, the first large quasi-Newton steps can collapse a nested factor's variance
            start = _update_blocks(problem, init)
        params, run = run_optax(
            problem, start, s.optimizer, s.rule, estimator=s.elbo, num_samples=s.num_samples,
            rng_key=jax.random.PRNGKey(s.seed), progress=s.progress, snapshot_steps=s.snapshot_steps,
        )
    if not np.isfinite(run.elbo_trace[-1]):
        advice = "" if (model.dtype == "float64" and s.method == "cavi") else ": try dtype='float64' and method='cavi'"
        raise FloatingPointError(f"the fit diverged (the ELBO is not finite){advice}")
    return params, run


@sized_jit(static_argnums=1)
def initial_params(problem: Problem, init_scale: float) -> VIParams:
    """The q family's starting point for ``problem`` (see :func:`lmevi.q.variational.init_params`)."""
    return problem.q.init_params(
        problem.design, problem.spec, problem.likelihood, problem.sigma_if_fixed, init_scale, problem.n_obs
    )


def _fit_exact(model: Model, s: FitSettings) -> tuple[VIParams, RunInfo]:
    """lme4's profiled criterion (:func:`lmevi.exact.optimise.fit_exact`) on the standardised design, returned in the
    mean-field layout of ``model.spec``: per term the conditional modes and ``condVar`` per level, beta's
    ``vcov`` as its block under REML (and in ``RunInfo.beta_cov`` under both). The run's "ELBO" is the
    (restricted) log-likelihood; the stop rule's ``num_steps`` bounds the criterion evaluations and its ``tol``
    is the optimiser's relative tolerance (see :func:`lmevi.exact.optimise.fit_exact`)."""

    if not model.problem.likelihood.moment_form:
        return _fit_glmer(model)
    from lmevi.exact import optimise
    fit = optimise.fit_exact(model.problem.design, reml=model.reml, theta0=_exact_start(model), tol=s.rule.tol,
                          max_evals=s.rule.num_steps)
    model_params = ModelParams(beta=None if model.reml else fit.beta, chol=fit.chol, sigma=fit.sigma)
    params = model.problem.q.from_moments(model.spec, model_params, fit.effects, fit.effects_cov, fit.beta,
                                          fit.beta_cov)
    run = RunInfo(np.asarray([float(fit.loglik)]), fit.n_evals, fit.converged, fit.seconds, fit.grad_norm, {},
                  beta_cov=fit.beta_cov, optimizer=fit.optimizer)
    return params, run


def _fit_glmer(model: Model) -> tuple[VIParams, RunInfo]:
    """glmer's criterion (:func:`lmevi.exact.laplace.fit_laplace`: Laplace for ``nagq=1``, its first stage alone for
    ``nagq=0``, adaptive Gauss-Hermite quadrature beyond) on the standardised design, held as :func:`_fit_exact`
    holds lme4's: the conditional modes and covariances per term, beta's ``vcov`` in ``RunInfo.beta_cov``, the
    log-likelihood as the run's "ELBO"."""
    from lmevi.exact import pirls
    from lmevi.exact.covfactors import _lambdas_numpy
    from lmevi.exact.laplace import fit_laplace

    design = model.problem.design
    offset = None if getattr(design, "offset", None) is None else np.asarray(design.offset)[: model.info.n_obs]
    fit = fit_laplace(pirls.from_design(design, model.info.n_obs, model.problem.likelihood, offset), model.nagq)
    n_coefs = tuple(t.covariates.shape[1] for t in design.terms)
    chol = tuple(_lambdas_numpy(np.asarray(fit.theta, np.float64), n_coefs))  # sigma is 1: L_k = Lambda_k
    model_params = ModelParams(beta=fit.beta, chol=chol, sigma=np.asarray(1.0))
    params = model.problem.q.from_moments(model.spec, model_params, fit.effects, fit.effects_cov, fit.beta,
                                          fit.beta_cov)
    how = {0: "nAGQ = 0", 1: "Laplace"}.get(fit.nagq, f"adaptive Gauss-Hermite, nAGQ = {fit.nagq}")
    run = RunInfo(np.asarray([float(fit.loglik)]), fit.n_evals, fit.converged, fit.seconds, float("nan"), {},
                  beta_cov=fit.beta_cov, optimizer=f"{fit.optimizer}, {how}")
    return params, run


# From this dense block size on, the exact fit starts from a structured-q fit: one criterion evaluation
# costs about 0.1 s at 1,144 (InstEval), where the structured fit takes about as long and saves half the
# evaluations (InstEval REML: 21 from lme4's start, 8 from the structured fit's).
EXACT_WARM_START = 256
# The structured fit that starts the exact one stops at this relative change of its ELBO: its estimates differ
# from the exact ones by about 1e-2 (relative) anyway, which Newton's first step corrects; converging it to
# 1e-8 moved them by 1e-4 and took twice the steps (InstEval: 7 against 3).
EXACT_START_TOL = 1e-6


def _exact_start(model: Model):
    """``theta`` from a structured-q variational fit of ``model`` when its dense block is large, else ``None``
    (lme4's start)."""
    from lmevi.exact import covfactors
    from lmevi.exact import structure as structure_lib
    from lmevi.fitting.build import make_problem

    design = model.problem.design
    if structure_lib.dense_block_size(design) < EXACT_WARM_START:
        return None
    spec = q_registry.get("structured").layout(design, model.info, model.reml)
    problem = make_problem(design, spec, likelihood=model.problem.likelihood)
    params, _ = run_cavi(problem, initial_params(problem, 0.1), StopRule(500, EXACT_START_TOL, 1),
                         progress=False, with_grad_norm=False)
    return covfactors.theta_from_chol([np.asarray(L) for L in params.model.chol], float(params.model.sigma))


# A coefficient whose SD is below this many residual SDs (in standardised units) may be heading for zero.
BOUNDARY_CHECK = 1e-2


def _polish_boundary(problem: Problem, params, run, rule, accelerate):
    """Variational EM creeps towards a variance of zero ever more slowly, and the stop rule can fire on the
    way (Dyestuff2: SD 0.0085 where the optimum is 0). For every coefficient whose SD is below
    ``BOUNDARY_CHECK`` residual SDs, restart from that SD shrunk 10^4-fold (its row of the Cholesky factor)
    and keep the restart only if it converges to a higher ELBO. Same compiled loop, no new compilation.
    """
    sigma = float(params.model.sigma)
    chol = [np.asarray(L) for L in params.model.chol]
    small = [(k, a) for k, L in enumerate(chol) for a in range(L.shape[0]) if np.linalg.norm(L[a]) < BOUNDARY_CHECK * sigma]
    if not small:
        return params, run
    shrunk = [L.copy() for L in chol]
    for k, a in small:
        shrunk[k][a] *= 1e-4
    start = params._replace(model=params.model._replace(chol=tuple(jnp.asarray(L, L.dtype) for L in shrunk)))
    other, other_run = run_cavi(problem, start, rule, progress=False, accelerate=accelerate)
    if other_run.converged and other_run.elbo_trace[-1] > run.elbo_trace[-1]:
        return other, other_run._replace(
            elbo_trace=np.concatenate([run.elbo_trace, other_run.elbo_trace]),
            steps=run.steps + other_run.steps,
            seconds=run.seconds + other_run.seconds,
            snapshots=run.snapshots,
        )
    return params, run


_update_blocks = jax.jit(cavi.update_blocks)
