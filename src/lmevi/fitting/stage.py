"""Fitting stage, as lme4's ``optimizeLmer``: a :class:`~lmevi.fitting.build.Model` in, point estimates, q and a run
record out, all in the model's standardised units (:mod:`lmevi.result.fitresult` maps them back).

:class:`FitSettings` is the typed record of how a fit runs (method, ELBO estimator, optimizer, stop rule,
seed); :func:`settings` checks and completes user options into one; :func:`fit_model` runs it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.q import cavi
from lmevi.fitting.build import Model, Problem
from lmevi.fitting.loops import RunInfo, StopRule, run_cavi, run_optax
from lmevi.runtime.options import check_bool, check_choice, check_int, check_optional_bool, check_real
from lmevi.runtime.precision import x64
from lmevi.runtime.jit import sized_jit
from lmevi.q.model import ModelParams
from lmevi.q.variational import BlockParams, VIParams

if TYPE_CHECKING:  # imported where used: 0.1 s that exact fits do not pay
    import optax

METHODS = ("cavi", "optax")
ELBOS = ("closed_form", "mc")


class FitSettings(NamedTuple):
    """How a fit runs.

    Attributes:
        method: ``"cavi"`` (coordinate ascent) or ``"optax"``.
        elbo: ``"closed_form"`` or ``"mc"`` (Edward's KLqp estimate).
        optimizer: the optax ``GradientTransformation`` (``None`` for coordinate ascent).
        num_samples: draws per Monte Carlo ELBO estimate.
        rule: the stop rule.
        seed: seed of the Monte Carlo draws.
        progress: show a progress bar (``None``: on a terminal).
        accelerate: SQUAREM extrapolation of coordinate ascent.
        init_scale: initial scale of q (optax path with the Monte Carlo ELBO).
        snapshot_steps: steps after which the parameters are kept.
    """

    method: str
    elbo: str
    optimizer: optax.GradientTransformation | None
    num_samples: int
    rule: StopRule
    seed: int
    progress: bool | None
    accelerate: bool
    init_scale: float
    snapshot_steps: tuple[int, ...]


@functools.cache
def edward_adam() -> optax.GradientTransformation:
    """The optimizer of Edward's ``inference.initialize()``: Adam, learning rate 0.1 decayed by 0.9 every
    100 steps (staircase). TensorFlow 1's Adam adds its epsilon to the denominator before bias
    correction and optax after it; with ``eps=1e-8`` the two differ negligibly here.

    The same object is returned on every call: the compiled fitting loop is keyed on the optimizer, so
    reusing one optimizer object across fits avoids compiling again."""
    import optax

    return optax.adam(optax.exponential_decay(0.1, transition_steps=100, decay_rate=0.9, staircase=True))


@functools.cache
def _lbfgs() -> optax.GradientTransformation:
    import optax

    return optax.lbfgs()


def _is_optax(optimizer) -> bool:
    import optax

    return isinstance(optimizer, optax.GradientTransformation)


def describe_optimizer(optimizer) -> str:
    """How a result names its optimizer: lmevi's defaults by name, any other optax object generically."""
    if optimizer is _lbfgs():
        return "optax.lbfgs()"
    if optimizer is edward_adam():
        return "lmevi.edward_adam()"
    return f"user-supplied optax {type(optimizer).__name__}"


def _defaults(method: str, elbo: str) -> tuple[int, float, int]:
    """Step budget, tolerance and window of the stop rule for each path."""
    if method == "cavi":
        return 3000, 1e-10, 1
    if elbo == "mc":
        return 5000, 1e-5, 200
    return 5000, 1e-10, 1


# The default tolerance of a float32 fit: its ELBO is rounded to about 6e-8 relative and its parameters move in
# their last bits, so a relative change of 1e-10 may never be seen and the fit would run to its step budget;
# 1e-6 is about 17 float32 roundings. An explicit ``tol`` is taken as given.
FLOAT32_TOL = 1e-6


def settings(
    *,
    method: str | None = None,
    elbo: str = "closed_form",
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 1,
    num_steps: int | None = None,
    tol: float | None = None,
    window: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    accelerate: bool = True,
    init_scale: float = 0.1,
    snapshot_steps=(),
    dtype: str = "float64",
) -> FitSettings:
    """Check the fitting options (see :func:`lmevi.fit`) and fill in the defaults of the chosen path; ``dtype``
    (the fit's, as :func:`lmevi.build_model` takes it) sets the floor of the default tolerance
    (:data:`FLOAT32_TOL`)."""
    elbo = check_choice("elbo", elbo, ELBOS)
    if optimizer is not None and not _is_optax(optimizer):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation such as optax.adam(0.01), got {optimizer!r}"
        )
    if method is None:
        method = "optax" if (optimizer is not None or elbo == "mc") else "cavi"
    method = check_choice("method", method, METHODS)
    if method == "cavi" and elbo == "mc":
        raise ValueError("method='cavi' maximises the closed-form ELBO; use elbo='closed_form' or method='optax'")
    if method == "cavi" and optimizer is not None:
        raise ValueError("method='cavi' takes no optimizer; pass method='optax' to use one")
    if method == "optax" and optimizer is None:
        optimizer = edward_adam() if elbo == "mc" else _lbfgs()
    num_samples = check_int("num_samples", num_samples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    progress = check_optional_bool("progress", progress)
    accelerate = check_bool("accelerate", accelerate)
    init_scale = check_real("init_scale", init_scale, positive=True)
    if isinstance(snapshot_steps, (str, bytes)) or not hasattr(snapshot_steps, "__iter__"):
        raise TypeError(f"snapshot_steps must be a sequence of step numbers, got {snapshot_steps!r}")
    snapshot_steps = tuple(check_int("snapshot_steps entry", t, minimum=1) for t in snapshot_steps)
    steps0, tol0, window0 = _defaults(method, elbo)
    if dtype == "float32":
        tol0 = max(tol0, FLOAT32_TOL)
    budget = steps0 if num_steps is None else check_int("num_steps", num_steps, minimum=1)
    rule = StopRule(
        num_steps=budget,
        tol=tol0 if tol is None else check_real("tol", tol, minimum=0.0),
        window=min(window0 if window is None else check_int("window", window, minimum=1), budget),
    )
    return FitSettings(method, elbo, optimizer, num_samples, rule, seed, progress, accelerate, init_scale,
                       snapshot_steps)


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
        return _fit_exact(model, s)
    if s.method != "cavi" and model.padded:
        raise ValueError("the optax path fits unpadded models only: build the model with pad=False")
    init = initial_params(problem, s.init_scale)
    if s.method == "cavi":  # Poisson and binomial: working-response steps (lmevi.families.glm.step)
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


def psd_factor(cov) -> np.ndarray:
    """A lower-triangular ``L`` with ``L L^T = cov`` for (batched) positive semi-definite ``cov`` ``(..., p, p)``,
    also where Cholesky fails (a variance at zero makes ``condVar`` singular): ``L = R^T`` from the QR
    factorisation of ``(V sqrt(Lambda))^T``, ``cov = V Lambda V^T``."""
    cov = np.asarray(cov, np.float64)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        lam, V = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        B = V * np.sqrt(np.maximum(lam, 0.0))[..., None, :]
        return np.swapaxes(np.linalg.qr(np.swapaxes(B, -1, -2), mode="r"), -1, -2)


def _fit_exact(model: Model, s: FitSettings) -> tuple[VIParams, RunInfo]:
    """lme4's profiled criterion (:func:`lmevi.exact.optimise.fit_exact`) on the standardised design, returned in the
    mean-field layout of ``model.spec``: per term the conditional modes and ``condVar`` per level, beta's
    ``vcov`` as its block under REML (and in ``RunInfo.beta_cov`` under both). The run's "ELBO" is the
    (restricted) log-likelihood; the stop rule's ``num_steps`` bounds the criterion evaluations and its ``tol``
    is the optimiser's relative tolerance (see :func:`lmevi.exact.optimise.fit_exact`)."""

    from lmevi.exact import optimise
    fit = optimise.fit_exact(model.problem.design, reml=model.reml, theta0=_exact_start(model), tol=s.rule.tol,
                          max_evals=s.rule.num_steps)
    blocks = []
    for block in model.spec.blocks:
        if block.large is not None:
            k = block.large
            blocks.append(BlockParams(fit.effects[k], psd_factor(fit.effects_cov[k]), None, None, None))
        else:  # beta's block (REML)
            blocks.append(BlockParams(None, None, None, fit.beta, psd_factor(fit.beta_cov)))
    beta = None if model.reml else fit.beta
    params = VIParams(ModelParams(beta=beta, chol=fit.chol, sigma=fit.sigma), tuple(blocks))
    run = RunInfo(np.asarray([float(fit.loglik)]), fit.n_evals, fit.converged, fit.seconds, fit.grad_norm, {},
                  beta_cov=fit.beta_cov, optimizer=fit.optimizer)
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
    from lmevi.exact import theta
    from lmevi.exact import structure
    from lmevi.q import variational
    from lmevi.fitting.build import make_problem

    design = model.problem.design
    if structure.dense_block_size(design) < EXACT_WARM_START:
        return None
    spec = variational.structured_spec(design, model.info, model.reml)
    problem = make_problem(design, spec, likelihood=model.problem.likelihood)
    params, _ = run_cavi(problem, initial_params(problem, 0.1), StopRule(500, EXACT_START_TOL, 1),
                         progress=False, with_grad_norm=False)
    return theta.theta_from_chol([np.asarray(L) for L in params.model.chol], float(params.model.sigma))


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
