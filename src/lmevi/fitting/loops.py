"""Inference stage: the compiled fitting loops.

Two paths maximise the same ELBO:

* :func:`run_optax`: gradient steps of any optax ``GradientTransformation`` on the unconstrained
  parameters (Adam as in the tutorial, with either ELBO; L-BFGS on the closed-form ELBO).
* :func:`run_cavi`: coordinate ascent with closed-form block updates and M-steps (:mod:`lmevi.q.cavi`).

Both run a ``lax.while_loop`` in chunks of ``chunk`` steps between which a progress bar advances, and both
stop on the same rule: the mean ELBO over the last ``window`` steps changed by at most ``tol`` relative to
the mean over the ``window`` steps before (``window=1`` for the deterministic objectives, a longer window
for the noisy Monte Carlo ELBO), or on the step budget ``num_steps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lmevi.q import cavi
from lmevi.fitting import glmm
from lmevi.q import registry as q_registry
from lmevi.q import elbo as elbo_lib
from lmevi.runtime.jit import sized_jit
from lmevi.q.protocol import VIParams

if TYPE_CHECKING:  # imported where used: 0.1 s that exact fits do not pay
    import optax


@dataclass(frozen=True)
class StopRule:
    """When a fit stops: ``num_steps`` at most, or once the windowed relative ELBO change is ``<= tol``."""

    num_steps: int
    tol: float
    window: int = 1


class RunInfo(NamedTuple):
    """What a fitting loop reports besides the parameters.

    Attributes:
        elbo_trace: ``(steps,)`` the ELBO after each step.
        steps: number of steps taken.
        converged: whether the stop rule fired before the step budget ran out.
        seconds: wall time of the loop, compilation included.
        grad_norm: at the end of the fit, the Euclidean norm of the gradient of the closed-form
            ``-ELBO / n_obs`` with respect to the unconstrained parameters (:func:`final_grad_norm`): near
            zero at a stationary point, whichever path and ELBO estimator ran.
        snapshots: parameters after each requested snapshot step, ``{step: VIParams}``.
        beta_cov: ``(p, p)`` the fixed effects' covariance when the fit estimates one outside q (lme4's
            ``vcov`` of an exact fit, also under ML); ``None`` otherwise.
        optimizer: the optimiser of an exact fit (``"BOBYQA"``, ``"Newton"``, ``"Newton, then L-BFGS-B"`` or
            ``"L-BFGS-B"``: :func:`lmevi.exact.optimise.fit_exact`); ``None`` otherwise.
    """

    elbo_trace: np.ndarray
    steps: int
    converged: bool
    seconds: float
    grad_norm: float
    snapshots: dict
    beta_cov: np.ndarray | None = None
    optimizer: str | None = None


def _converged(trace: jax.Array, t: jax.Array, tol: jax.Array, w: int) -> jax.Array:
    if w == 1:
        prev = trace[jnp.maximum(t - 1, 0)]
        cur = trace[t]
        ok = t >= 1
    else:
        cur = jnp.mean(jax.lax.dynamic_slice(trace, (jnp.maximum(t - w + 1, 0),), (w,)))
        prev = jnp.mean(jax.lax.dynamic_slice(trace, (jnp.maximum(t - 2 * w + 1, 0),), (w,)))
        ok = t >= 2 * w - 1
    return ok & (jnp.abs(cur - prev) <= tol * jnp.abs(cur)) & jnp.isfinite(cur)


def _chunk_loop(step, carry, trace, t0, t_end, tol, window: int):
    """Run ``step(carry, t) -> (carry, elbo)`` from ``t0`` until ``t_end`` or convergence (relative change
    ``tol`` ``()``, a traced value so that a new tolerance compiles nothing; ``window`` is static)."""

    def cond(s):
        t, _, _, done = s
        return (t < t_end) & ~done

    def body(s):
        t, c, tr, _ = s
        c, value = step(c, t)
        tr = tr.at[t].set(value)
        return t + 1, c, tr, _converged(tr, t, tol, window)

    return jax.lax.while_loop(cond, body, (t0, carry, trace, jnp.asarray(False)))


def _drive(run_chunk, carry, rule: StopRule, chunk: int, progress: bool | None, dtype, desc: str, snapshot):
    """Host loop: call the compiled chunk runner until it converges or the budget is spent.

    ``snapshot = (steps, to_params)``: after each step in ``steps`` the loop pauses and keeps
    ``to_params(carry)``; the run is the same as without pauses.
    """
    snap_steps, to_params = snapshot
    pending = sorted({int(s) for s in snap_steps if 0 < int(s) <= rule.num_steps})
    snaps: dict[int, VIParams] = {}
    # host values put on the device, not made by jnp (each jnp constructor is a small program to compile)
    trace = jax.device_put(np.full((rule.num_steps,), np.nan, dtype))
    tol = jax.device_put(np.asarray(rule.tol, dtype))
    t = jax.device_put(0)
    done = False
    start = time.perf_counter()
    from tqdm.auto import tqdm  # here: importing it (with asyncio) is 16 ms of `import lmevi`

    with tqdm(total=rule.num_steps, desc=desc, disable=_bar_disabled(progress), leave=False) as bar:
        show = not bar.disable
        while not done and int(t) < rule.num_steps:
            t_end = min([int(t) + chunk, rule.num_steps] + [s for s in pending if s > int(t)])
            t_new, carry, trace, done_arr = run_chunk(carry, trace, t, jax.device_put(t_end), tol)
            done = bool(done_arr)
            if int(t_new) in pending:
                snaps[int(t_new)] = to_params(carry)
            if show:
                bar.update(int(t_new) - int(t))
                bar.set_postfix(elbo=f"{float(np.asarray(trace)[int(t_new) - 1]):.6g}")
            t = t_new
    jax.block_until_ready(carry)
    seconds = time.perf_counter() - start
    steps = int(t)
    # sliced on the host: slicing on the device compiles once per number of steps
    return carry, np.asarray(trace)[:steps], steps, done, seconds, snaps


def _bar_disabled(progress: bool | None):
    # tqdm's ``disable=None`` hides the bar when the output is not a terminal
    return None if progress is None else not progress


# ----------------------------------------------------------------------------------------------------
# optax path


def make_loss(problem, estimator: str, num_samples: int):
    """``loss(raw_params, rng_key) = -ELBO / n_obs`` in the unconstrained coordinates."""
    q = problem.q

    def loss(raw: VIParams, rng_key) -> jax.Array:
        params = q.to_constrained(raw, problem.sigma_if_fixed)
        if estimator == "mc":
            value = elbo_lib.monte_carlo(rng_key, problem, params, num_samples)
        else:
            value = elbo_lib.closed_form(problem, params)
        return -value / problem.n_obs

    return loss


@partial(jax.jit, static_argnames=("optimizer", "estimator", "num_samples", "window"))
def _optax_chunk(problem, carry, trace, t0, t_end, tol, *, optimizer, estimator, num_samples, window):
    import optax

    loss = make_loss(problem, estimator, num_samples)
    n = problem.n_obs
    uses_state = _has_value_state(carry[1])

    def step(c, t):
        raw, state, k = c
        step_key = jax.random.fold_in(k, t)
        value_fn = lambda p: loss(p, step_key)  # noqa: E731
        if uses_state:
            value, grad = optax.value_and_grad_from_state(value_fn)(raw, state=state)
        else:
            value, grad = jax.value_and_grad(value_fn)(raw)
        if isinstance(optimizer, optax.GradientTransformationExtraArgs):
            updates, state = optimizer.update(grad, state, raw, value=value, grad=grad, value_fn=value_fn)
        else:
            updates, state = optimizer.update(grad, state, raw)
        raw = optax.apply_updates(raw, updates)
        return (raw, state, k), -value * n

    return _chunk_loop(step, carry, trace, t0, t_end, tol, window)


@sized_jit
def final_grad_norm(problem, params) -> jax.Array:
    """Norm of the gradient of the closed-form ``-ELBO / n_obs`` at ``params``, in the unconstrained
    coordinates that the optax path steps in (log SDs, log-Cholesky diagonals, locations, log sigma).

    The convergence check of both paths: coordinate ascent never forms this gradient, and a Monte Carlo
    ELBO's sampled gradient is noisy, so both are judged by the exact one. One pass over the rows.
    """
    import optax

    loss = make_loss(problem, "closed_form", 1)
    return optax.tree.norm(jax.grad(loss)(problem.q.to_unconstrained(params), None))


def _has_value_state(state) -> bool:
    """Whether the optimizer keeps the last value and gradient (L-BFGS's line search does)."""
    import optax

    missing = object()
    try:
        return optax.tree_utils.tree_get(state, "value", default=missing) is not missing
    except KeyError:  # several entries named "value": a chain holding L-BFGS
        return True


def run_optax(
    problem,
    params: VIParams,
    optimizer: optax.GradientTransformation,
    rule: StopRule,
    *,
    estimator: str = "closed_form",
    num_samples: int = 1,
    rng_key=None,
    chunk: int = 100,
    progress: bool | None = None,
    snapshot_steps=(),
) -> tuple[VIParams, RunInfo]:
    """Maximise the ELBO with an optax optimizer.

    Args:
        problem: the model's arrays and structure (:class:`lmevi.fitting.build.Problem`).
        params: starting point (constrained).
        optimizer: an optax ``GradientTransformation``; L-BFGS (``optax.lbfgs``) needs
            ``estimator="closed_form"``.
        rule: the stop rule.
        estimator: ``"closed_form"`` or ``"mc"`` (Edward's KLqp).
        num_samples: draws per Monte Carlo estimate.
        rng_key: key of the Monte Carlo draws (``step`` is folded in).
        chunk: steps per compiled call between progress-bar updates.
        progress: show a progress bar (``None``: only on a terminal).
        snapshot_steps: steps after which to keep a copy of the parameters (for figures of a fit in
            progress, as the tutorial's residual histograms every ``n_print`` steps).

    Returns:
        ``(params, info)``.
    """
    q = problem.q
    raw = q.to_unconstrained(params)
    state = optimizer.init(raw)
    if estimator == "mc" and _has_value_state(state):
        raise ValueError("L-BFGS needs a deterministic objective: use elbo='closed_form' with it")
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    run_chunk = partial(
        _optax_chunk, problem, optimizer=optimizer, estimator=estimator, num_samples=num_samples, window=rule.window
    )
    to_params = lambda c: q.to_constrained(c[0], problem.sigma_if_fixed)  # noqa: E731
    carry = (raw, state, key)
    (raw, state, _), trace, steps, done, seconds, snaps = _drive(
        run_chunk, carry, rule, chunk, progress, problem.design.y.dtype, "lmevi optax", (snapshot_steps, to_params)
    )
    params = q.to_constrained(raw, problem.sigma_if_fixed)
    gnorm = final_grad_norm(problem, params)
    return params, RunInfo(trace, steps, done, seconds, float(gnorm), snaps)


# ----------------------------------------------------------------------------------------------------
# coordinate-ascent path


def squarem_step(sweep, params: VIParams, fixed_sigma, mask: VIParams | None = None, q=None):
    """One SQUAREM iteration (Varadhan & Roland 2008, scheme S3) of the variational EM map ``sweep``.

    Variational EM converges linearly, and sublinearly when a variance component heads for zero (a
    boundary fit); SQUAREM extrapolates along two plain sweeps in the unconstrained coordinates (so any
    extrapolated point is a valid q and valid SDs), then takes one sweep from there. That result is kept only
    when its ELBO is at least that of the two plain sweeps (else those are), so the ELBO never decreases.
    The three sweeps run in one ``fori_loop`` so that the sweep is compiled once.

    ``mask`` (0/1 shaped as ``params``, the q family's ``coordinate_mask``) keeps padding levels out of the step
    length and of the extrapolation, so a padded fit takes the steps of the unpadded one. ``q``: the q family
    whose unconstrained coordinates the extrapolation moves in (default: the block-Gaussian one).

    Returns:
        ``(params, elbo)`` after three sweeps.
    """
    q = q_registry.family("structured") if q is None else q
    x0, unravel = ravel_pytree(q.to_unconstrained(params))
    m = 1.0 if mask is None else ravel_pytree(mask)[0]
    pick = lambda c, a, b: jax.tree_util.tree_map(lambda u, v: jnp.where(c, u, v), a, b)  # noqa: E731

    def extrapolate(p1, p2):
        x1, _ = ravel_pytree(q.to_unconstrained(p1))
        x2, _ = ravel_pytree(q.to_unconstrained(p2))
        r = (x1 - x0) * m
        v = (x2 - x1) * m - r
        alpha = -jnp.sqrt(jnp.sum(r**2) / jnp.maximum(jnp.sum(v**2), 1e-300))
        alpha = jnp.minimum(alpha, -1.0)  # alpha = -1 is the plain two-sweep point x2
        return q.to_constrained(unravel(x0 - 2.0 * alpha * r + alpha**2 * v), fixed_sigma)

    def body(i, c):
        cur, p1, p2, e2, e3 = c
        out, e = sweep(pick(i == 2, extrapolate(p1, p2), cur))
        p1 = pick(i == 0, out, p1)
        p2 = pick(i == 1, out, p2)
        return out, p1, p2, jnp.where(i == 1, e, e2), jnp.where(i == 2, e, e3)

    nan = jnp.asarray(jnp.nan, x0.dtype)
    p3, _, p2, e2, e3 = jax.lax.fori_loop(0, 3, body, (params, params, params, nan, nan))
    take = jnp.isfinite(e3) & (e3 >= e2)
    return pick(take, p3, p2), jnp.where(take, e3, e2)


@sized_jit(static_argnames=("window", "accelerate"))
def _cavi_chunk(problem, carry, trace, t0, t_end, tol, *, window, accelerate):
    def sweep(params):
        if problem.likelihood.moment_form:
            return cavi.sweep(problem, params)
        return glmm.step(problem, params)  # Poisson, binomial: a sweep on the Gaussian working problem

    # which parameters belong to padding levels does not change along the loop: built once, outside it
    mask = None
    if accelerate and problem.level_mask is not None:
        mask = problem.q.coordinate_mask(problem.spec, carry, problem.level_mask)

    def step(params, t):
        if accelerate:
            return squarem_step(sweep, params, problem.sigma_if_fixed, mask, problem.q)
        return sweep(params)

    return _chunk_loop(step, carry, trace, t0, t_end, tol, window)


def run_cavi(
    problem,
    params: VIParams,
    rule: StopRule,
    *,
    chunk: int = 50,
    progress: bool | None = None,
    snapshot_steps=(),
    accelerate: bool = True,
    with_grad_norm: bool = True,
) -> tuple[VIParams, RunInfo]:
    """Variational EM by coordinate ascent; one step is a sweep of block updates plus an M-step, or with
    ``accelerate`` one SQUAREM iteration (:func:`squarem_step`, three sweeps).

    Args: as :func:`run_optax`, without optimizer and estimator, and ``with_grad_norm``: compute the final
        gradient norm (its own compiled program; ``False`` leaves NaN, for a fit that only starts another).

    Returns:
        ``(params, info)``.
    """
    if not (cavi.supports(problem) or glmm.supports(problem)):
        raise ValueError(
            f"coordinate ascent needs the block-Gaussian q and a Gaussian likelihood or one with working-response "
            f"steps (family={problem.likelihood.name!r}); use method='optax'"
        )
    run_chunk = partial(_cavi_chunk, problem, window=rule.window, accelerate=accelerate)
    params, trace, steps, done, seconds, snaps = _drive(
        run_chunk, params, rule, chunk, progress, problem.design.y.dtype, "lmevi cavi", (snapshot_steps, lambda c: c)
    )
    gnorm = final_grad_norm(problem, params) if with_grad_norm else float("nan")
    return params, RunInfo(trace, steps, done, seconds, float(gnorm), snaps)
