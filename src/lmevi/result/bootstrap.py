"""Parametric bootstrap of an exact Gaussian fit, as lme4's ``bootMer`` and MixedModels.jl's
``parametricbootstrap``: simulate responses from the fitted model (:mod:`lmevi.simulate`), refit each one by
lme4's profiled criterion (:mod:`lmevi.exact`), and collect the estimates.

Why it is fast. The response enters :class:`lmevi.exact.structure.Structure` only through ``zy1 = Z_1'y``, ``ry = R'y``
and ``yy = y'y``; every other cross-product, and the list of level pairs, is the design's and is shared by all
replicates. A batch of replicates is therefore one compiled program: ``jax.vmap`` over those three arrays of
the criterion, each replicate optimised from the fitted theta (a warm start a few steps from every replicate's
optimum). A batched ``lax.while_loop`` costs its widest batch per iteration until its slowest replicate
stops, so a first pass stops every replicate after :data:`FIRST_PASS` evaluations and the few still running
continue in narrow batches (:func:`refit`).

Quasi-Newton, chosen by measurement. Each replicate takes steps ``-H^{-1} g`` with ``H`` starting at the
fitted model's Hessian (:func:`start_hessian`, the same for all replicates) and updated by BFGS: one value and
gradient per iteration (sleepstudy: 9 evaluations at the median, 30 at most, all 1,000 replicates
converged). Newton's method with the exact Hessian (``jax.hessian`` does run through :mod:`lmevi.exact`'s
hand-written gradients) took 5 steps at the median, but a batched Hessian cost ten values and gradients, and
its trials of every step length a further ten values: the whole took 3.7 s against 0.2-0.3 s here. A step
that does not descend (Armijo's rule) is halved. A replicate stops when its decrement ``g' H^{-1} g`` (twice
the predicted decrease of the criterion) is below ``tol``; one that runs out of evaluations or finds no step
that descends is flagged (``converged`` False), never dropped.

No box constraints. Unlike lme4 (BOBYQA with the diagonal of ``Lambda_k`` bounded below by 0), the iteration
is unconstrained: the criterion depends on ``Lambda_k`` only through ``Lambda_k Lambda_k'``, which is unchanged
when a column of ``Lambda_k`` changes sign, so a point with a negative diagonal entry is the mirror image of one
inside lme4's bounds with the same criterion, and an optimum on the bound (a zero SD) is a stationary point of
the unconstrained criterion (which is even in that entry). The estimate is mapped back inside the bounds
(columns with a negative diagonal are flipped) before it is reported.

Differences from lme4: the random numbers are JAX's, not R's; the refits are in the data's units from the
original fit's theta (lme4 also starts ``bootMer``'s refits there); the percentile intervals use
``numpy.quantile``'s linear interpolation, where lme4 (through the boot package) interpolates order statistics
on the normal scale -- the two differ by far less than the intervals' Monte Carlo error.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lmevi.exact.criterion import NUMPY_OPS, profiled_deviance
from lmevi.exact.estimates import conditional_estimates
from lmevi.exact.structure import Structure, build_structure
from lmevi.exact import covfactors
from lmevi.exact.covfactors import lambdas, theta_from_chol
from lmevi.result.simulate import FittedModel, draw_responses, fitted_model, replicate_keys
from lmevi.result.components import percent_label

# Decrement at which a replicate stops: twice the predicted decrease of the criterion (-2 log L units); on
# sleepstudy theta is then within about 2e-7 of a refit to 1e-20.
NEWTON_TOL = 1e-12
MAX_EVALS = 50
# Below this decrement the full step is taken without a line search (see quasi_newton_run).
NEWTON_TRUST = 1e-6
# The first pass over a batch stops every replicate after this many evaluations (sleepstudy: 9 at the median,
# about 9 % above 12; 12 measured faster than 10, 11, 13, 14 or 16); the rest continue in batches of
# 1/STRAGGLER_FRACTION the width.
FIRST_PASS = 12
STRAGGLER_FRACTION = 16
# A step is halved at most this many times before the replicate stops as stalled.
LINE_SEARCH = 10
_ARMIJO = 1e-4
# Eigenvalues of the start Hessian are floored at this times the largest one.
_EIG_FLOOR = 1e-8
# About this many float64 numbers of per-replicate work a batch holds at most (when batch_size is None).
_BATCH_BUDGET = 5e7


class ResponseMap(NamedTuple):
    """How the response enters a :class:`lmevi.exact.structure.Structure` (JAX arrays; mirrors
    :func:`lmevi.exact.structure.build_structure`).

    Attributes:
        index1: ``(n_obs,)`` term 1's level codes.
        z1: ``(n_obs, p_1)`` term 1's covariates.
        rest_cols: ``(n_obs, m)`` rest coordinates of each row's non-zeros of ``R = [Z_rest, X]``.
        rest_values: ``(n_obs, m)`` their values.
    """

    index1: jax.Array
    z1: jax.Array
    rest_cols: jax.Array
    rest_values: jax.Array


def response_map(design, s: Structure) -> ResponseMap:
    """The :class:`ResponseMap` of ``design`` laid out as its structure ``s`` (NumPy arrays)."""
    first = design.terms[s.order[0]]
    cols, vals = [], []
    for k, off in zip(s.order[1:], s.rest_offsets):
        t = design.terms[k]
        q = s.n_coefs[k]
        cols.append(off + np.asarray(t.index, np.int64)[:, None] * q + np.arange(q))
        vals.append(np.asarray(t.covariates, np.float64))
    n, p = design.X.shape
    cols.append(np.broadcast_to(s.n_rest_random + np.arange(p), (n, p)))
    vals.append(np.asarray(design.X, np.float64))
    return ResponseMap(np.asarray(first.index, np.int32), np.asarray(first.covariates, np.float64),
                       np.concatenate(cols, axis=1).astype(np.int32), np.concatenate(vals, axis=1))


def response_parts(rmap: ResponseMap, Y: jax.Array, s: Structure):
    """``(zy1 (B, J_1, p_1), ry (B, P), yy (B,))`` of the responses ``Y`` ``(n_obs, B)``: the fields of the
    structure that depend on y (pure, jit-able)."""
    J1 = s.n_levels[s.order[0]]
    zy1 = jax.ops.segment_sum(rmap.z1[:, :, None] * Y[:, None, :], rmap.index1, num_segments=J1)
    ry = jax.ops.segment_sum((rmap.rest_values[:, :, None] * Y[:, None, :]).reshape(-1, Y.shape[1]),
                             rmap.rest_cols.reshape(-1), num_segments=s.size)
    return jnp.moveaxis(zy1, -1, 0), ry.T, jnp.sum(Y * Y, axis=0)


def _with_response(s: Structure, zy1, ry, yy) -> Structure:
    return dataclasses.replace(s, zy1=zy1, ry=ry, yy=yy)


class NewtonInfo(NamedTuple):
    """How one replicate's Newton iteration ended."""

    converged: jax.Array  # () bool: decrement below tol
    evals: jax.Array  # () int32: criterion evaluations (values and gradients)
    decrement: jax.Array  # () the last Newton decrement g'H^{-1}g


# Central differences of the start Hessian: a step of about eps^(1/4) relative to theta (at least absolute)
# balances truncation (step^2) against the criterion's rounding (about 1e-11 on sleepstudy, over step^2).
_HESSIAN_STEP = 1e-4


def start_hessian(s: Structure, theta, reml: bool) -> np.ndarray:
    """``(n_theta, n_theta)`` the criterion's Hessian at the fit's ``theta``, every replicate's BFGS start.

    Central differences of criterion values on the host (:data:`lmevi.exact.criterion.NUMPY_OPS`: ``2 n_theta^2 + 1``
    values, nothing compiled; JAX's exact Hessian through :mod:`lmevi.exact`'s hand-written gradients agrees
    but took seconds to compile). Its eigenvalues are replaced by their absolute values, floored at ``1e-8``
    of the largest, so that it is positive definite. ``s`` holds NumPy arrays."""
    x = np.asarray(theta, np.float64)
    n = len(x)
    h = _HESSIAN_STEP * np.maximum(np.abs(x), 1.0)

    def f(*moves):
        y = x.copy()
        for i, sign in moves:
            y[i] += sign * h[i]
        return float(profiled_deviance(y, s, reml, NUMPY_OPS))

    f0 = f()
    H = np.empty((n, n))
    for i in range(n):
        H[i, i] = (f((i, 1)) - 2.0 * f0 + f((i, -1))) / h[i] ** 2
        for j in range(i):
            H[i, j] = H[j, i] = (f((i, 1), (j, 1)) - f((i, 1), (j, -1)) - f((i, -1), (j, 1))
                                 + f((i, -1), (j, -1))) / (4.0 * h[i] * h[j])
    lam, V = np.linalg.eigh(H)
    lam = np.maximum(np.abs(lam), max(_EIG_FLOOR * np.max(np.abs(lam)), np.finfo(float).tiny))
    return (V * lam) @ V.T


class _State(NamedTuple):
    x: jax.Array  # (n_theta,)
    f: jax.Array  # ()
    g: jax.Array  # (n_theta,)
    H: jax.Array  # (n_theta, n_theta) the current (BFGS) Hessian
    alpha: jax.Array  # () the step length to try next
    evals: jax.Array  # () int32
    done: jax.Array  # () bool
    converged: jax.Array  # () bool
    decrement: jax.Array  # ()


def quasi_newton_start(f, theta0, H0) -> _State:
    """The :class:`_State` of :func:`quasi_newton_run` at ``theta0`` with the Hessian ``H0`` (one value and
    gradient)."""
    f0, g0 = jax.value_and_grad(f)(theta0)
    inf = jnp.asarray(jnp.inf, theta0.dtype)
    return _State(theta0, f0, g0, H0, jnp.ones((), theta0.dtype), jnp.int32(1), jnp.bool_(False), jnp.bool_(False), inf)


def quasi_newton_run(f, state: _State, tol: float = NEWTON_TOL, max_evals: int = MAX_EVALS) -> _State:
    """Minimise ``f`` ``(n_theta,) -> ()`` from ``state`` by quasi-Newton steps ``-H^{-1} g``, ``H`` updated by
    BFGS (starting from the fitted model's Hessian, :func:`start_hessian`); one value and gradient per
    iteration, a step that does not descend is halved (module docstring). Stops at convergence, when no step
    descends, or after ``max_evals`` evaluations in all (counting those before ``state``).

    Pure and ``vmap``-able: a ``lax.while_loop`` that, batched, runs until every replicate has stopped.
    """
    value_and_grad = jax.value_and_grad(f)
    eps = jnp.finfo(state.x.dtype).eps

    def body(st: _State) -> _State:
        L = jnp.linalg.cholesky(st.H)
        step = -jax.scipy.linalg.cho_solve((L, True), st.g)
        dec = -st.g @ step
        small = dec <= tol
        x1 = st.x + st.alpha * step
        f1, g1 = value_and_grad(x1)
        # Near the optimum the full step is taken whatever the criterion says: its rounding (about 1e-11 on
        # sleepstudy, from y'y - c'c) exceeds the decrease left there, which the gradient still resolves.
        trust = (dec <= NEWTON_TRUST) & (st.alpha == 1.0)
        descent = f1 <= st.f - _ARMIJO * st.alpha * dec + 8.0 * eps * jnp.abs(st.f)
        accept = ~small & jnp.isfinite(f1) & jnp.all(jnp.isfinite(g1)) & (descent | trust)
        s, y = x1 - st.x, g1 - st.g
        sy, Hs = s @ y, st.H @ s
        curved = accept & (sy > 1e-10 * jnp.sqrt((s @ s) * (y @ y)))
        H1 = st.H - jnp.outer(Hs, Hs) / jnp.where(curved, s @ Hs, 1.0) + jnp.outer(y, y) / jnp.where(curved, sy, 1.0)
        alpha = jnp.where(accept, 1.0, 0.5 * st.alpha)
        stalled = alpha < 0.5 ** LINE_SEARCH
        return _State(
            x=jnp.where(accept, x1, st.x), f=jnp.where(accept, f1, st.f), g=jnp.where(accept, g1, st.g),
            H=jnp.where(curved, H1, st.H), alpha=alpha, evals=st.evals + 1,
            done=small | stalled | ~jnp.isfinite(dec), converged=small, decrement=dec,
        )

    def cond(st: _State):
        return ~st.done & (st.evals < max_evals)

    return jax.lax.while_loop(cond, body, state)


def canonical_theta(theta, n_coefs: tuple[int, ...]):
    """``theta`` with the columns of every ``Lambda_k`` whose diagonal entry is negative flipped (the same
    ``Lambda_k Lambda_k'``, inside lme4's bounds)."""
    out, pos = [], 0
    for q in n_coefs:
        rows = np.concatenate([np.arange(c, q) for c in range(q)])
        cols = np.concatenate([np.full(q - c, c) for c in range(q)])
        diag_pos = pos + np.array([np.flatnonzero((rows == c) & (cols == c))[0] for c in range(q)])
        sign = jnp.where(theta[diag_pos] < 0, -1.0, 1.0)
        out.append(theta[pos : pos + len(rows)] * sign[cols])
        pos += len(rows)
    return jnp.concatenate(out)


class Replicate(NamedTuple):
    """One refit's estimates (batched: a leading ``(B,)`` axis)."""

    theta: jax.Array  # (n_theta,)
    beta: jax.Array  # (p,)
    sigma: jax.Array  # ()
    objective: jax.Array  # ()
    chol: tuple  # per term (p_k, p_k) sigma Lambda_k


def _criterion(s: Structure, reml: bool, response):
    sy = _with_response(s, *response)
    return lambda t: profiled_deviance(t, sy, reml)


@partial(jax.jit, static_argnames=("reml", "tol", "max_evals"))
def refit_start(theta0, H0, Y, s: Structure, rmap: ResponseMap, reml: bool, tol: float = NEWTON_TOL,
                max_evals: int = MAX_EVALS):
    """``(states, response)``: the columns of ``Y`` ``(n_obs, B)`` optimised from ``theta0`` ``(n_theta,)`` with
    the starting Hessian ``H0`` ``(n_theta, n_theta)`` for up to ``max_evals`` evaluations, and their
    ``(zy1, ry, yy)`` (:func:`response_parts`). One program for the batch (run it with 64-bit JAX on)."""
    response = response_parts(rmap, Y, s)

    def one(*r):
        f = _criterion(s, reml, r)
        return quasi_newton_run(f, quasi_newton_start(f, theta0, H0), tol, max_evals)

    return jax.vmap(one)(*response), response


@partial(jax.jit, static_argnames=("reml", "tol", "max_evals"))
def refit_continue(states: _State, response, s: Structure, reml: bool, tol: float = NEWTON_TOL,
                   max_evals: int = MAX_EVALS) -> _State:
    """Batched :func:`quasi_newton_run` from ``states`` (the replicates that a first pass left running)."""
    return jax.vmap(lambda st, *r: quasi_newton_run(_criterion(s, reml, r), st, tol, max_evals))(states, *response)


@partial(jax.jit, static_argnames=("reml",))
def estimates(theta, response, s: Structure, reml: bool) -> Replicate:
    """Batched estimates at ``theta`` ``(B, n_theta)`` (mapped inside lme4's bounds, :func:`canonical_theta`)."""

    def one(th, *r):
        th = canonical_theta(th, s.n_coefs)
        est = conditional_estimates(th, _with_response(s, *r), reml)
        chol = tuple(est.sigma * lam for lam in lambdas(th, s.n_coefs))
        return Replicate(th, est.beta, est.sigma, est.objective, chol)

    return jax.vmap(one)(theta, *response)


def refit(theta0, H0, Y, s: Structure, rmap: ResponseMap, reml: bool, tol: float = NEWTON_TOL,
          max_evals: int = MAX_EVALS) -> tuple[Replicate, _State]:
    """Refit every column of ``Y`` ``(n_obs, B)``: a first pass of all columns for :data:`FIRST_PASS`
    evaluations, then the few still running in batches of ``B // STRAGGLER_FRACTION`` (the batched loop costs
    its widest batch per iteration, so one slow replicate would hold all ``B`` lanes). Returns the estimates
    and the final optimiser states (``(B,)`` leading axes)."""
    B = Y.shape[1]
    states, response = refit_start(theta0, H0, Y, s, rmap, reml, tol, min(FIRST_PASS, max_evals))
    running = np.flatnonzero(~np.asarray(states.done) & (np.asarray(states.evals) < max_evals))
    width = max(1, B // STRAGGLER_FRACTION)
    for start in range(0, len(running), width):
        idx = running[start : start + width]
        pad = np.concatenate([idx, np.full(width - len(idx), idx[-1])])
        out = refit_continue(jax.tree.map(lambda a, p=pad: a[p], states), jax.tree.map(lambda a, p=pad: a[p], response), s,
                             reml, tol, max_evals)
        states = jax.tree.map(lambda a, o, i=idx: a.at[i].set(o[: len(i)]), states, out)
    return estimates(states.x, response, s, reml), states


# ----------------------------------------------------------------------------------------------------
# Names as lme4's confint(m, oldNames = FALSE) gives them, and the driver


def lme4_term_order(info) -> tuple[int, ...]:
    """The design's terms in lme4's order (:func:`lmevi.exact.covfactors.lme4_term_order`)."""
    return covfactors.lme4_term_order([t.n_levels for t in info.terms])


def variance_names(info) -> list[tuple[int, int, int, str]]:
    """``(term, row, column, name)`` of every SD (``row == column``) and correlation, in lme4's order: terms
    by :func:`lme4_term_order`, within a term the lower triangle column by column, named ``sd_<coef>|<group>``
    and ``cor_<row coef>.<column coef>|<group>`` as lme4's ``confint(m, oldNames = FALSE)``."""
    out = []
    for k in lme4_term_order(info):
        term = info.terms[k]
        names = term.coef_names
        for c in range(len(names)):
            for r in range(c, len(names)):
                label = f"sd_{names[c]}" if r == c else f"cor_{names[r]}.{names[c]}"
                out.append((k, r, c, f"{label}|{term.group}"))
    return out


def _sd_cor(chol: tuple[np.ndarray, ...], info) -> tuple[dict, dict]:
    """Per name, ``(B,)`` SDs and correlations of the batched factors ``chol`` (per term ``(B, p_k, p_k)``);
    a correlation with a zero SD is NaN, as lme4 reports it."""
    sd, cor = {}, {}
    for k, r, c, name in variance_names(info):
        L = np.asarray(chol[k], np.float64)
        cov = L @ np.swapaxes(L, -1, -2)
        if r == c:
            sd[name] = np.sqrt(cov[:, r, r])
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                cor[name] = cov[:, r, c] / np.sqrt(cov[:, r, r] * cov[:, c, c])
    return sd, cor




@dataclass(frozen=True)
class BootstrapResult:
    """A parametric bootstrap: one row per replicate (index ``0..n-1``, replicate ``i`` drawn from key ``i``
    of :func:`lmevi.result.simulate.replicate_keys`).

    Attributes:
        fixef: ``(n, p)`` fixed effects, one column per coefficient (lme4's names).
        sd: ``(n, n_sd)`` SDs, columns ``sd_<coef>|<group>`` in lme4's order.
        cor: ``(n, n_cor)`` correlations, columns ``cor_<coef>.<coef>|<group>`` (NaN where an SD is 0).
        sigma: ``(n,)`` residual SD.
        objective: ``(n,)`` REML criterion or ``-2 log L`` of each refit.
        converged: ``(n,)`` whether the refit's Newton decrement fell below its tolerance.
        theta: ``(n, n_theta)`` relative Cholesky parameters (design order, :mod:`lmevi.exact`).
        evals: ``(n,)`` criterion evaluations (values and gradients) of each refit.
        decrement: ``(n,)`` the last Newton decrement ``g'H^{-1}g`` of each refit (below ``tol`` when converged).
        seed: the seed of the replicates' keys.
        original: the estimates of the fit itself, as one row of :meth:`table`'s columns.
    """

    fixef: pd.DataFrame
    sd: pd.DataFrame
    cor: pd.DataFrame
    sigma: pd.Series
    objective: pd.Series
    converged: pd.Series
    theta: np.ndarray
    evals: pd.Series
    decrement: np.ndarray
    seed: int
    original: pd.Series

    def table(self) -> pd.DataFrame:
        """``(n, k)`` every estimate in the row order of lme4's ``confint(m, oldNames = FALSE)``: SDs and
        correlations (per term interleaved as lme4 lists them), ``sigma``, then the fixed effects."""
        varcorr = pd.concat([self.sd, self.cor], axis=1)[[c for c in self.original.index if c in self.sd or c in self.cor]]
        return pd.concat([varcorr, self.sigma.rename("sigma"), self.fixef], axis=1)

    def std_error(self, converged_only: bool = True) -> pd.Series:
        """Bootstrap standard errors (SD over replicates, ``ddof=1`` as R's ``sd``; NaN correlations left out)."""
        t = self.table()
        return (t[self.converged] if converged_only else t).std(ddof=1).rename("std_error")

    def confint(self, level: float = 0.95, converged_only: bool = True) -> pd.DataFrame:
        """Percentile intervals, as lme4's ``confint(m, method = "boot", boot.type = "perc")``: rows named
        and ordered as lme4's, columns ``"2.5 %"`` and ``"97.5 %"`` (for ``level=0.95``). Replicates that did not
        converge are left out (``converged_only``), as are NaN correlations."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        t = self.table()
        t = t[self.converged] if converged_only else t
        lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
        with warnings.catch_warnings():  # a column with no value (every replicate left out) is NaN, no warning
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanquantile(t.to_numpy(np.float64), [lo, hi], axis=0)
        return pd.DataFrame({percent_label(lo): q[0], percent_label(hi): q[1]}, index=t.columns)


def default_batch_size(s: Structure, n: int) -> int:
    """All ``n`` replicates in one batch unless a replicate's arrays (the dense block, the rows, the level
    pairs, times about ten for a gradient's intermediates) would make a batch hold more than about 5e7
    numbers (sleepstudy: all 1,000 in one)."""
    per = 10 * (s.size * s.size + s.n_obs + s.pair_value.shape[0] + s.zz1.size)
    return int(max(1, min(n, _BATCH_BUDGET // per)))


def _original(model: FittedModel) -> pd.Series:
    sd, cor = _sd_cor(tuple(L[None] for L in model.chol), model.info)
    names = [name for *_, name in variance_names(model.info)]
    values = {**{k: v[0] for k, v in sd.items()}, **{k: v[0] for k, v in cor.items()}}
    row = [values[name] for name in names] + [model.sigma] + list(model.beta)
    return pd.Series(row, index=names + ["sigma"] + list(model.info.fixed_names), name="estimate")


def bootstrap(fit, n: int = 1000, seed: int = 0, batch_size: int | None = None, progress: bool = True,
              tol: float = NEWTON_TOL, max_evals: int = MAX_EVALS) -> BootstrapResult:
    """Parametric bootstrap of an exact Gaussian fit (lme4's ``bootMer(m, FUN, nsim = n, use.u = FALSE)``).

    Args:
        fit: a :class:`lmevi.result.fitresult.FitResult` of ``q="exact"``, family Gaussian, that kept its data.
        n: number of replicates.
        seed: seed of the replicates' keys (:func:`lmevi.result.simulate.replicate_keys`); the result does not
            depend on ``batch_size``.
        batch_size: replicates refitted by one call of the compiled program; ``None``:
            :func:`default_batch_size`. The last batch is padded to the same size (one program).
        progress: a tqdm bar over the batches.
        tol, max_evals: Newton's stop (decrement) and iteration budget per replicate.

    Returns:
        A :class:`BootstrapResult`.
    """
    if fit.options.q != "exact":
        raise ValueError(f"bootstrap refits lme4's criterion: fit with q='exact' (this fit has q={fit.options.q!r})")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    model = fitted_model(fit)
    d = model.design
    s = build_structure(d, model.reml)
    theta0 = theta_from_chol(model.chol, model.sigma)
    B = default_batch_size(s, n) if batch_size is None else int(batch_size)
    if B < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    keys = replicate_keys(seed, n)
    n_batches = -(-n // B)
    parts = []
    with jax.enable_x64(True):
        sim_args = jax.device_put((d.X, d.terms, model.beta, model.chol, np.asarray(model.sigma)))
        sj, rmap = jax.device_put(s), jax.device_put(response_map(d, s))
        t0 = jax.device_put(theta0)
        H0 = jax.device_put(start_hessian(s, theta0, model.reml))
        for b in tqdm(range(n_batches), disable=not progress, desc="bootstrap", unit="batch"):
            index = np.minimum(np.arange(b * B, (b + 1) * B), n - 1)  # the last batch padded with its last key
            Y = draw_responses(keys[index], *sim_args)
            rep, states = refit(t0, H0, Y, sj, rmap, model.reml, tol, max_evals)
            info = NewtonInfo(states.converged, states.evals, states.decrement)
            keep = min(B, n - b * B)
            parts.append(jax.tree.map(lambda a, k=keep: np.asarray(a)[:k], (rep, info)))
    rep, info = jax.tree.map(lambda *a: np.concatenate(a), *parts)
    return _result(model, rep, info, seed, _original(model))


def _result(model: FittedModel, rep: Replicate, info: NewtonInfo, seed: int, original: pd.Series) -> BootstrapResult:
    index = pd.RangeIndex(len(rep.sigma), name="replicate")
    sd, cor = _sd_cor(rep.chol, model.info)
    return BootstrapResult(
        fixef=pd.DataFrame(rep.beta, index=index, columns=list(model.info.fixed_names)),
        sd=pd.DataFrame(sd, index=index),
        cor=pd.DataFrame(cor, index=index, dtype=np.float64),
        sigma=pd.Series(rep.sigma, index=index, name="sigma"),
        objective=pd.Series(rep.objective, index=index, name="objective"),
        converged=pd.Series(info.converged, index=index, name="converged"),
        theta=rep.theta,
        evals=pd.Series(info.evals, index=index, name="evals"),
        decrement=info.decrement,
        seed=int(seed),
        original=original,
    )
