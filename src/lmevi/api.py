"""``lmevi.fit``: parse, build, choose q, run, wrap; like ``lmer``, it only calls the stages in order."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from lmevi import cavi, runtime, scaling
from lmevi import variational
from lmevi.design import build_design
from lmevi.formula import parse_formula
from lmevi.inference import StopRule, run_cavi, run_optax
from lmevi.precision import to_host, x64
from lmevi.options import check_bool, check_choice, check_int, check_optional_bool, check_real
from lmevi.results import FitResult

FAMILIES = ("structured", "meanfield")
METHODS = ("cavi", "optax")
ELBOS = ("closed_form", "mc")


# Convergence check: the largest gradient norm of the closed-form ELBO per observation, in the unconstrained
# coordinates, that still counts as an optimum (see inference.final_grad_norm).
GRAD_TOL = 1e-3


class ConvergenceWarning(UserWarning):
    """The fit stopped on its step budget before its convergence rule held, or where the ELBO's gradient is
    still large (``GRAD_TOL``)."""


class SingularFitWarning(UserWarning):
    """A variance component is at the boundary (SD near zero or a correlation near +-1)."""


@functools.cache
def edward_adam() -> optax.GradientTransformation:
    """The optimizer of Edward's ``inference.initialize()``: Adam, learning rate 0.1 decayed by 0.9 every
    100 steps (staircase). TensorFlow 1's Adam adds its epsilon to the denominator before bias
    correction and optax after it; with ``eps=1e-8`` the two differ negligibly here.

    The same object is returned on every call: the compiled fitting loop is keyed on the optimizer, so
    reusing one optimizer object across fits avoids compiling again."""
    return optax.adam(optax.exponential_decay(0.1, transition_steps=100, decay_rate=0.9, staircase=True))


def _defaults(method: str, elbo: str) -> tuple[int, float, int]:
    """Step budget, tolerance and window of the stop rule for each path."""
    if method == "cavi":
        return 3000, 1e-10, 1
    if elbo == "mc":
        return 5000, 1e-5, 200
    return 5000, 1e-10, 1


@x64
def fit(
    formula: str,
    data: pd.DataFrame,
    *,
    family: str = "structured",
    reml: bool = True,
    method: str | None = None,
    elbo: str = "closed_form",
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 1,
    residual_scale: float | None = None,
    num_steps: int | None = None,
    tol: float | None = None,
    window: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    blocks=None,
    small_threshold: int = 50,
    dtype: str = "float64",
    missing: str = "raise",
    accelerate: bool = True,
    init_scale: float = 0.1,
    snapshot_steps=(),
) -> FitResult:
    """Fit a linear mixed model by variational EM.

    Args:
        formula: lme4 syntax, e.g. ``"y ~ service + (1|s) + (1|d) + (1|dept)"``.
        data: one row per observation.
        family: ``"structured"`` (default: small grouping factors share a Gaussian block with the large
            factor they are nested in, see :mod:`lmevi.variational`) or ``"meanfield"`` (the tutorial's fully
            factorised q).
        reml: ``True`` (default, as lme4's ``REML = TRUE``) puts beta in q with a flat prior, so the fit
            targets REML estimates; ``False`` makes beta a point estimate (ML-like, and the tutorial's).
        method: ``"cavi"`` (closed-form coordinate ascent) or ``"optax"``; default ``"optax"`` when an
            optimizer is given or ``elbo="mc"``, else ``"cavi"``.
        elbo: ``"closed_form"`` (exact) or ``"mc"`` (Edward's KLqp estimate; optax only).
        optimizer: an optax ``GradientTransformation``; default ``optax.lbfgs()`` for the closed-form ELBO
            and :func:`edward_adam` for ``elbo="mc"``.
        num_samples: draws per Monte Carlo ELBO estimate.
        residual_scale: fix sigma at this value (the tutorial's 1.0); ``None`` estimates it.
        num_steps, tol, window: the stop rule (see :mod:`lmevi.inference`); defaults depend on the method.
        seed: seed of the Monte Carlo draws; the same seed gives the same fit.
        progress: show a progress bar (``None``: when writing to a terminal).
        blocks: structured family only, blocks named by grouping factor (``[("d", "dept", "fixed"), ("s",)]``).
        small_threshold: a term with at most this many coefficients in all is "small".
        dtype: ``"float64"`` (default) or ``"float32"`` for the arrays and the fit.
        missing: ``"raise"`` (default: a ValueError naming the columns with NA or inf and counting the rows)
            or ``"drop"`` (drop those rows, looking only at the formula's columns, with a warning).
        accelerate: coordinate ascent only: SQUAREM extrapolation (each step is then three sweeps); it cuts
            the steps of slow fits by 5-15x (variances heading for zero, mean-field q) and never lowers the
            ELBO.
        init_scale: initial scale of q for the optax path with ``elbo="mc"`` (with the closed-form ELBO q
            starts at its closed-form optimum given the starting point estimates).
        snapshot_steps: steps after which to keep the parameters; ``result.at_step(t)`` is then the fit as
            it stood after step ``t`` (the tutorial's residual histograms every ``n_print`` steps).

    Returns:
        A :class:`~lmevi.results.FitResult`.
    """
    runtime.prepare()
    family = check_choice("family", family, FAMILIES)
    reml = check_bool("reml", reml)
    elbo = check_choice("elbo", elbo, ELBOS)
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
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
    if blocks is not None and family != "structured":
        raise ValueError("blocks= applies to family='structured' only")
    if blocks is not None and (isinstance(blocks, str) or not isinstance(blocks, (list, tuple))):
        raise TypeError(f"blocks must be a list of tuples of grouping-factor names, got {blocks!r}")
    if residual_scale is not None:
        residual_scale = check_real("residual_scale", residual_scale, positive=True)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    progress = check_optional_bool("progress", progress)
    small_threshold = check_int("small_threshold", small_threshold, minimum=0)
    dtype = check_choice("dtype", dtype, ("float64", "float32"))
    missing = check_choice("missing", missing, ("raise", "drop"))
    accelerate = check_bool("accelerate", accelerate)
    init_scale = check_real("init_scale", init_scale, positive=True)
    if isinstance(snapshot_steps, (str, bytes)) or not hasattr(snapshot_steps, "__iter__"):
        raise TypeError(f"snapshot_steps must be a sequence of step numbers, got {snapshot_steps!r}")
    snapshot_steps = tuple(check_int("snapshot_steps entry", t, minimum=1) for t in snapshot_steps)
    steps0, tol0, window0 = _defaults(method, elbo)
    budget = steps0 if num_steps is None else check_int("num_steps", num_steps, minimum=1)
    rule = StopRule(
        num_steps=budget,
        tol=tol0 if tol is None else check_real("tol", tol, minimum=0.0),
        window=min(window0 if window is None else check_int("window", window, minimum=1), budget),
    )
    jdtype = {"float64": jnp.float64, "float32": jnp.float32}[dtype]

    parsed = parse_formula(formula)
    raw_design, info = build_design(parsed, data, jdtype, missing)
    # fit in standardised units and map back: estimates and warnings do not depend on the data's units
    design, scales = scaling.standardise(raw_design)
    if family == "meanfield":
        spec = variational.meanfield_spec(info, reml)
    else:
        spec = variational.structured_spec(design, info, reml, small_threshold, blocks)
    data_b = _block_data(design, spec)
    fixed_sigma = None if residual_scale is None else residual_scale / scales.y_scale
    init = _init_params(design, spec, fixed_sigma, init_scale)

    if method == "cavi":
        params, run = run_cavi(
            design, spec, data_b, init, rule, residual_scale=fixed_sigma, progress=progress,
            snapshot_steps=snapshot_steps, accelerate=accelerate,
        )
        params, run = _polish_boundary(design, spec, data_b, params, run, rule, fixed_sigma, accelerate)
    else:
        if optimizer is None:
            optimizer = edward_adam() if elbo == "mc" else _lbfgs()
        start = init
        if elbo == "closed_form":
            # start q at its closed-form optimum given the starting point estimates: from a q far from
            # its optimum, the first large quasi-Newton steps can collapse a nested factor's variance
            start = _update_blocks(design, spec, init, data_b)
        params, run = run_optax(
            design,
            spec,
            data_b,
            start,
            optimizer,
            rule,
            estimator=elbo,
            num_samples=num_samples,
            residual_scale=fixed_sigma,
            rng_key=jax.random.PRNGKey(seed),
            progress=progress,
            snapshot_steps=snapshot_steps,
        )
    if not np.isfinite(run.elbo_trace[-1]):
        advice = "" if (dtype == "float64" and method == "cavi") else ": try dtype='float64' and method='cavi'"
        raise FloatingPointError(f"the fit diverged (the ELBO is not finite){advice}")
    if not run.converged:
        warnings.warn(
            f"the fit stopped on its step budget ({rule.num_steps} steps) before the ELBO settled "
            f"(relative change <= {rule.tol:g}; gradient norm {run.grad_norm:.2g} per observation); "
            "estimates may still move: raise num_steps",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif run.grad_norm > GRAD_TOL:
        warnings.warn(
            f"the ELBO settled but its gradient norm at the end is {run.grad_norm:.2g} per observation "
            f"(above {GRAD_TOL:g}): the fit stopped on a plateau, not at an optimum, and estimates may still "
            "move: lower tol or raise num_steps",
            ConvergenceWarning,
            stacklevel=3,
        )
    mean, _ = _row_moments(design, spec, params.blocks, data_b)
    fixed = design.X @ params.model.beta if params.model.beta is not None else 0.0
    fitted = scales.y_shift + scales.y_scale * np.asarray(fixed + mean, dtype=np.float64)
    offset = scaling.elbo_offset(scales, info.n_obs, spec.reml)
    run = run._replace(
        elbo_trace=run.elbo_trace + offset,
        snapshots={t: scaling.to_data_units(p, spec, scales) for t, p in run.snapshots.items()},
    )
    params = scaling.to_data_units(params, spec, scales)
    options = dict(
        family=family, reml=reml, method=method, elbo=elbo, num_samples=num_samples, accelerate=accelerate,
        residual_scale=residual_scale, seed=seed, dtype=dtype, stop_rule=rule,
        optimizer=None if method == "cavi" else repr(optimizer)[:80],
    )
    result = FitResult(
        info=info,
        spec=spec,
        params=to_host(params),
        run=run._replace(snapshots={t: to_host(p) for t, p in run.snapshots.items()}),
        options=options,
        fitted=fitted,
        y=np.asarray(raw_design.y),
        scales=scales,
    )
    for msg in result.singular():
        hint = (
            " Under family='meanfield' this is often mean-field q draining a nested factor's variance; "
            "family='structured' avoids it." if family == "meanfield" else ""
        )
        warnings.warn(
            f"boundary (singular) fit: {msg}: the data do not support this variance component as modelled.{hint}",
            SingularFitWarning,
            stacklevel=3,
        )
    return result


# A coefficient whose SD is below this many residual SDs (in standardised units) may be heading for zero.
BOUNDARY_CHECK = 1e-2


def _polish_boundary(design, spec, data_b, params, run, rule, fixed_sigma, accelerate):
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
    other, other_run = run_cavi(
        design, spec, data_b, start, rule, residual_scale=fixed_sigma, progress=False, accelerate=accelerate
    )
    if other_run.converged and other_run.elbo_trace[-1] > run.elbo_trace[-1]:
        return other, other_run._replace(
            elbo_trace=np.concatenate([run.elbo_trace, other_run.elbo_trace]),
            steps=run.steps + other_run.steps,
            seconds=run.seconds + other_run.seconds,
            snapshots=run.snapshots,
        )
    return params, run


@functools.cache
def _lbfgs() -> optax.GradientTransformation:
    return optax.lbfgs()


_block_data = jax.jit(variational.block_data, static_argnums=1)
_init_params = jax.jit(variational.init_params, static_argnums=(1, 2, 3))
_row_moments = jax.jit(variational.row_moments, static_argnums=1)
_update_blocks = jax.jit(cavi.update_blocks, static_argnums=1)
