"""Optimising lme4's profiled criterion over theta: BOBYQA (NLopt; the NumPy path), Newton's method with exact
gradients and L-BFGS-B (the JAX and hybrid paths), and the fit they make (:func:`fit_exact`).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np

from lmevi.frame.design import Design
from lmevi.exact import bobyqa
from lmevi.exact.criterion import _np_cho_solve
from lmevi.exact.evaluate import BACKENDS, NUMPY_MAX, _evaluator, _large_backend
from lmevi.exact.estimates import _Evaluator
from lmevi.exact.structure import Structure, build_structure
from lmevi.exact.covfactors import _lambdas_numpy, theta_default, theta_lower_bounds


class ExactFit(NamedTuple):
    """The optimum of lme4's profiled criterion.

    Attributes:
        theta: ``(n_theta,)`` relative Cholesky parameters (design order, see the module docstring).
        chol: per term ``(p_k, p_k)`` ``L_k = sigma Lambda_k``, the lower Cholesky factor of ``Sigma_k`` in the
            data's units (as :class:`lmevi.q.model.ModelParams.chol`).
        sigma: ``()`` residual standard deviation.
        beta: ``(p,)`` fixed effects.
        beta_cov: ``(p, p)`` their covariance (lme4's ``vcov``).
        effects: per term ``(J_k, p_k)`` conditional modes (lme4's ``ranef``).
        effects_cov: per term ``(J_k, p_k, p_k)`` conditional covariances given beta (lme4's ``condVar``).
        objective: ``()`` REML criterion or ``-2 log L`` (lme4's ``REMLcrit`` / ``deviance``).
        loglik: ``()`` ``-objective / 2``, lme4's ``logLik``.
        n_evals: criterion evaluations used (values and values-and-gradients).
        grad_norm: norm of the projected gradient of ``objective / (2 n)`` (minus the log-likelihood per
            observation) with respect to theta at the end: near zero at an optimum. After Newton's method, at
            the point before its last step (which is below ``sqrt(tol)`` relative and is not evaluated).
        converged: whether the optimiser stopped by its tolerances (not its budget), or stopped because no
            step lowered the criterion any more with a projected gradient below ``1e-6`` per observation.
        optimizer: ``"BOBYQA"`` (NLopt, the NumPy path); on the JAX path ``"Newton"`` (up to
            :data:`NEWTON_MAX` parameters), ``"Newton, then L-BFGS-B"`` where Newton's steps handed over, or
            ``"L-BFGS-B"`` (scipy).
        seconds: wall time of the optimisation and the final estimates.
    """

    theta: np.ndarray
    chol: tuple[np.ndarray, ...]
    sigma: np.ndarray
    beta: np.ndarray
    beta_cov: np.ndarray
    effects: tuple[np.ndarray, ...]
    effects_cov: tuple[np.ndarray, ...]
    objective: np.ndarray
    loglik: np.ndarray
    n_evals: int
    grad_norm: float
    converged: bool
    optimizer: str
    seconds: float


_BOUNDARY_STEP = 1e-3


# L-BFGS-B's line search gives up ("ABNORMAL_TERMINATION_IN_LNSRCH") when no step lowers the criterion any
# more, and BOBYQA stops "limited by roundoff" likewise: converged if the projected gradient per observation is
# below this (lmevi warns from 1e-3).
_STALL_GRAD = 1e-6


# BOBYQA stops when its trust region (the change of theta it can still resolve) is below this times ``tol``:
# 1e-11 at the default tol 1e-10, where lme4's nloptwrap stops at 1e-8 in theta (or in the criterion). No stop
# on the criterion's change: on the corpus a relative 1e-10 there stopped up to 5e-6 short in log-likelihood.
_BOBYQA_XTOL = 0.1


class _Optimum(NamedTuple):
    x: np.ndarray  # (n_theta,)
    fun: float
    jac: np.ndarray | None  # (n_theta,) the gradient at x where the optimiser has it
    converged: bool  # stopped by its tolerances, not by the evaluation budget
    stalled: bool  # stopped because no step lowered the criterion any more
    method: str  # the optimiser(s) that produced x, as the summary names them
    # Newton's last step is taken without evaluating the criterion at x: ``previous`` is the point it started
    # from, where ``fun`` and ``jac`` were evaluated (see _newton); None when fun and jac are at x
    previous: np.ndarray | None = None


def _lbfgsb(ev: _Evaluator, x0, lower, tol: float, max_evals: int) -> _Optimum:
    """scipy's L-BFGS-B with the exact gradient: ``ftol`` and ``gtol`` are ``tol``."""
    import scipy.optimize  # imported here: 0.4 s, which a fit on the NumPy path does not pay

    bounds = [(None if np.isinf(lo) else lo, None) for lo in lower]
    options = {"ftol": tol, "gtol": tol, "maxfun": max_evals, "maxiter": max_evals}
    res = scipy.optimize.minimize(ev.value_and_grad, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                  options=options)
    return _Optimum(np.asarray(res.x, np.float64), float(res.fun), np.asarray(res.jac), bool(res.success),
                    res.status == 2, "L-BFGS-B")


def _bobyqa(ev: _Evaluator, x0, lower, tol: float, max_evals: int) -> _Optimum:
    """NLopt's BOBYQA (lme4's default optimiser), derivative-free: stops when its trust region falls below
    ``_BOBYQA_XTOL * tol`` in theta. Returns the best point it evaluated, also when NLopt stops with an
    exception (round-off)."""
    import nlopt

    x, f, _, code = bobyqa.minimise(ev.value, x0, lower, xtol_abs=_BOBYQA_XTOL * tol, max_evals=max_evals)
    done = code in (nlopt.SUCCESS, nlopt.FTOL_REACHED, nlopt.XTOL_REACHED)
    return _Optimum(x, f, None, done, code == nlopt.ROUNDOFF_LIMITED, "BOBYQA")


# Newton's steps change a relative SD (on the log scale) by at most this much, and a step that does not descend
# is halved up to _NEWTON_HALVINGS times: from a start far off (the structured fit's is 30 % off for a factor
# crossed with a nested pair) the log scale's quadratic model can overshoot by far.
_LOG_STEP_MAX, _NEWTON_HALVINGS = 0.5, 2

# Newton's method runs for at most this many parameters: its Hessian costs n (n + 1) / 2 criterion values.
NEWTON_MAX = 4


# Forward-difference step of the Hessian, times max(|theta|, 1). Newton's steps need the Hessian only roughly:
# the start's Hessian differs from the optimum's by a few percent anyway, which the BFGS updates correct.
_HESSIAN_STEP = 1e-4


# Below this a relative SD (a diagonal entry of Lambda_k near its bound 0) is taken linearly by Newton's
# method, not on a log scale, and Newton's stop measures its steps absolutely.
_NEWTON_SCALE = 1e-2


def _fd_hessian(value, x, f, g) -> np.ndarray:
    """``(n, n)`` Hessian of ``value`` at ``x`` (where it is ``f`` with gradient ``g``) from ``n (n + 1) / 2``
    values at forward steps: ``H_ii`` from the second-order Taylor remainder along ``e_i``, ``H_ij`` from the
    four corners ``x, x + h_i e_i, x + h_j e_j, x + h_i e_i + h_j e_j``. Values rather than gradients: on
    InstEval a value costs a third of a value and gradient, and since the criterion's programs are kept as
    executables (:mod:`lmevi.runtime.jit`) a second program costs a fresh process milliseconds to load, not the
    half second its tracing took."""
    n = len(x)
    h = _HESSIAN_STEP * np.maximum(np.abs(x), 1.0)
    E = np.eye(n) * h
    fi = np.array([value(x + E[i]) for i in range(n)])
    H = np.zeros((n, n))
    for i in range(n):
        H[i, i] = 2.0 * (fi[i] - f - h[i] * g[i]) / h[i] ** 2
        for j in range(i):
            H[i, j] = H[j, i] = (value(x + E[i] + E[j]) - fi[i] - fi[j] + f) / (h[i] * h[j])
    return H


def _newton(ev: _Evaluator, x0, lower, tol: float, max_evals: int) -> _Optimum:
    """Newton's method from a start near the optimum (the structured fit's): a Hessian from criterion values
    (:func:`_fd_hessian`), then steps ``-H^{-1} g`` with BFGS updates of ``H``.

    The diagonal entries of the ``Lambda_k`` that start at least :data:`_NEWTON_SCALE` from their bound 0 are
    taken on a log scale (relative SDs): the criterion is closer to quadratic there, and on InstEval the steps
    shrink 200-fold each instead of 30- to 80-fold (relative errors 1.5e-2, 7.4e-5, 7.7e-7 against 1.5e-2,
    2.4e-4, 6.4e-6). Entries near 0 stay linear (the criterion is even in them, flat, not log-quadratic).

    Stops when a step is below ``sqrt(tol)`` relative to theta (absolute below :data:`_NEWTON_SCALE`), or when
    the error left after it, predicted from the last two steps' contraction (``|s_k|^2 / |s_{k-1}|``), is below
    ``sqrt(tol) / 10``: that step is taken without evaluating the criterion after it (``previous``;
    :func:`fit_exact` checks that it descended with the estimates it computes there, and reports the gradient
    from before it). The point returned is within about ``sqrt(tol) / 10`` (``1e-6`` relative at the default
    ``tol``) of the optimum; InstEval REML takes two values and gradients.

    From a start far off the log scale's quadratic model can overshoot by far: a step changes a relative SD by
    at most a factor ``exp(0.5)`` (:data:`_LOG_STEP_MAX`), a step that does not descend is halved (up to
    :data:`_NEWTON_HALVINGS` times), and where the log scale's Hessian is not positive definite theta's own
    curvature (in relative units) is taken. A step that still does not descend, leaves the bounds, takes a
    log-scale SD below :data:`_NEWTON_SCALE` (heading for its bound, which the log scale never reaches), or
    meets a Hessian that is not positive definite hands over to :func:`_lbfgsb` from the best point so far
    (``method`` then names both)."""
    x0 = np.asarray(x0, np.float64)
    logged = (lower == 0.0) & (x0 >= _NEWTON_SCALE)

    def theta(u):
        return np.where(logged, np.exp(np.where(logged, u, 0.0)), u)

    def value_and_grad(u):  # the gradient in u: d theta / d u = theta on the log scale
        t = theta(u)
        f, g = ev.value_and_grad(t)
        return f, np.asarray(g), np.where(logged, g * t, g)

    def size(step, t):  # the step relative to theta (absolutely below _NEWTON_SCALE)
        rel = np.where(logged, np.abs(step) / np.maximum(1.0, _NEWTON_SCALE / t),
                       np.abs(step) / np.maximum(np.abs(t), _NEWTON_SCALE))
        return float(np.max(rel)) if rel.size else 0.0

    x = np.where(logged, np.log(np.where(logged, x0, 1.0)), x0)
    low = np.where(logged, -np.inf, lower)
    f, g_theta, g = value_and_grad(x)
    n = len(x)
    H = _fd_hessian(lambda u: ev.value(theta(u)), x, f, g)
    used = 1 + n * (n + 1) // 2
    last = None  # size of the step before
    while used < max_evals:
        try:
            L = np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            # Far from the optimum the log scale's curvature d2f/du2 = theta^2 f'' + theta f' can be negative
            # where f'' > 0: take theta's own curvature, in relative units, from here on
            H = H - np.diag(np.where(logged, g, 0.0))
            try:
                L = np.linalg.cholesky(H)
            except np.linalg.LinAlgError:
                break
        step = -_np_cho_solve((L, True), g)
        big = float(np.max(np.abs(step[logged]), initial=0.0))
        if big > _LOG_STEP_MAX:  # at most a factor exp(0.5) on a relative SD per step
            step *= _LOG_STEP_MAX / big
        accepted = False
        for _ in range(_NEWTON_HALVINGS + 1):  # a step that does not descend is halved, then handed over
            x1 = x + step
            t1 = theta(x1)
            # leaving the bounds, or a relative SD on the log scale heading for its bound 0 (which the log
            # scale never reaches): L-BFGS-B takes over, as it does for a step that does not descend
            if (np.any(x1 < low) or not np.all(np.isfinite(x1)) or np.any(logged & (t1 < _NEWTON_SCALE))
                    or used >= max_evals):
                break
            m = size(step, t1)
            if m <= np.sqrt(tol) or (last is not None and 10.0 * m * m / last <= np.sqrt(tol)):
                # The last step: taken without its own value and gradient. fit_exact computes the estimates
                # at x1 anyway, and checks with their criterion that the step descended (else it keeps x).
                return _Optimum(t1, float(f), g_theta, True, False, "Newton", previous=theta(x))
            f1, g1_theta, g1 = value_and_grad(x1)
            used += 1
            if f1 <= f + 8 * np.finfo(float).eps * abs(f):  # lower (to rounding)
                accepted = True
                break
            step = step / 2.0
        if not accepted:  # out of bounds, or no descent: not a Newton region
            break
        y = g1 - g
        if step @ y > 0:  # BFGS update: stays positive definite
            Hs = H @ step
            H = H - np.outer(Hs, Hs) / (step @ Hs) + np.outer(y, y) / (step @ y)
        x, f, g, g_theta, last = x1, f1, g1, g1_theta, m
    rest = _lbfgsb(ev, theta(x), lower, tol, max(max_evals - used, 1))
    if rest.fun > f:  # L-BFGS-B ran out of evaluations above the Newton point
        rest = rest._replace(x=theta(x), fun=float(f), jac=g_theta)
    return rest._replace(method="Newton, then L-BFGS-B")


_OPTIMISERS = {"bobyqa": _bobyqa, "newton": _newton, "lbfgsb": _lbfgsb}


OPTIMISERS = tuple(_OPTIMISERS)


def _default_optimiser(backend: str, n_theta: int, warm_start: bool) -> str:
    """BOBYQA on NumPy; on JAX Newton from a start near the optimum (a warm start: the structured fit's) with
    up to :data:`NEWTON_MAX` parameters, else L-BFGS-B. From lme4's start, far from the optimum, Newton's
    Hessian is spent on a region it does not describe."""
    if backend == "numpy":
        return "bobyqa"
    return "newton" if warm_start and n_theta <= NEWTON_MAX else "lbfgsb"


def fit_exact(
    design: Design,
    reml: bool = True,
    *,
    theta0=None,
    tol: float = 1e-10,
    max_evals: int = 1000,
    structure: Structure | None = None,
    backend: str | None = None,
    optimizer: str | None = None,
) -> ExactFit:
    """Maximise the (restricted) likelihood exactly: lme4's profiled criterion, minimised over theta.

    lme4 runs derivative-free BOBYQA (nloptwrap). Here small dense blocks (NumPy) run the same BOBYQA from
    NLopt with tighter tolerances; larger ones (JAX, or hybrid) use the criterion's exact gradient: Newton's
    method on a finite-difference Hessian from a given start (``theta0``) with up to :data:`NEWTON_MAX`
    parameters (:func:`_newton`), else L-BFGS-B. The jit-compiled value and ``value_and_grad`` are shared by
    fits of the same shapes, so only a fit of a new shape compiles. Bounds and default start are lme4's: ``theta >= 0`` on
    the diagonal of every ``Lambda_k``, start at ``Lambda_k = I``.

    Args:
        design: the model's arrays.
        reml: REML criterion (lme4's default) or maximum likelihood.
        theta0: ``(n_theta,)`` start; lme4's default when ``None``.
        tol: L-BFGS-B's ``ftol`` (relative change of the criterion) and ``gtol`` (projected gradient);
            Newton's method stops after a step below ``sqrt(tol)`` relative to theta; BOBYQA stops when its
            trust region in theta is below ``tol / 10``.
        max_evals: the most criterion evaluations.
        structure: a :func:`build_structure` of ``design`` to reuse; built here when ``None``.
        backend: ``"numpy"``, ``"hybrid"`` (JAX with the host's LAPACK for the dense block) or ``"jax"``;
            ``None`` takes NumPy when the dense block has at most :data:`NUMPY_MAX` coefficients, else the
            hybrid path where JAX runs on the CPU and JAX alone on an accelerator (:func:`_large_backend`).
        optimizer: one of :data:`OPTIMISERS` (``"bobyqa"`` needs no gradient and suits NumPy; ``"newton"``
            and ``"lbfgsb"`` use the gradient, exact on JAX); ``None`` chooses as
            :func:`_default_optimiser` says.

    Returns:
        An :class:`ExactFit` of NumPy float64 arrays; ``grad_norm`` is the final projected gradient (exact on
        JAX, central differences on NumPy) per observation.
    """
    start = time.perf_counter()
    s = build_structure(design, reml) if structure is None else structure
    n_coefs = s.n_coefs
    warm_start = theta0 is not None
    theta0 = theta_default(n_coefs) if theta0 is None else np.asarray(theta0, np.float64)
    lower = theta_lower_bounds(n_coefs)
    if backend is None:
        backend = "numpy" if s.size <= NUMPY_MAX else _large_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    optimizer = _default_optimiser(backend, len(theta0), warm_start) if optimizer is None else optimizer
    if optimizer not in OPTIMISERS:
        raise ValueError(f"optimizer must be one of {OPTIMISERS}, got {optimizer!r}")
    n_evals = 0
    with jax.enable_x64(True):
        raw = _evaluator(s, reml, backend)

        def counted(f):
            def g(th):
                nonlocal n_evals
                n_evals += 1
                return f(np.asarray(th, np.float64))

            return g

        ev = raw._replace(value=counted(raw.value), value_and_grad=counted(raw.value_and_grad))
        minimise = _OPTIMISERS[optimizer]
        res = minimise(ev, theta0, lower, tol, max_evals)
        # The criterion is even in a scalar term's theta, so its gradient vanishes on the bound theta = 0:
        # an optimiser that lands there stops even where the criterion falls on moving back in (a saddle,
        # not a minimum). Step off each such bound once and restart if that is lower.
        for _ in range(len(theta0)):
            best, trial = res.fun, None
            for i in np.flatnonzero((lower == 0.0) & (res.x == 0.0)):
                candidate = res.x.copy()
                candidate[i] = _BOUNDARY_STEP
                value = ev.value(candidate)
                if value < best:
                    best, trial = value, candidate
            if trial is None:
                break
            res = minimise(ev, trial, lower, tol, max(max_evals - n_evals, 1))
        theta = res.x
        est = ev.conditional(theta)
        if res.previous is not None and not float(est.objective) <= res.fun + 8 * np.finfo(float).eps * abs(res.fun):
            theta = res.previous  # Newton's unevaluated last step did not descend: the point before it
            est = ev.conditional(theta)
        jac = res.jac if res.jac is not None else raw.value_and_grad(theta)[1]
    sigma = float(est.sigma)
    lams = _lambdas_numpy(theta, n_coefs)
    grad_norm = _projected_grad_norm(theta, jac, lower) / (2.0 * s.n_obs)
    return ExactFit(
        theta=theta,
        chol=tuple(sigma * lam for lam in lams),
        sigma=np.asarray(sigma),
        beta=est.beta,
        beta_cov=est.beta_cov,
        effects=tuple(est.effects),
        effects_cov=tuple(est.effects_cov),
        objective=np.asarray(est.objective),
        loglik=np.asarray(-0.5 * est.objective),
        n_evals=n_evals,
        grad_norm=grad_norm,
        converged=res.converged or (res.stalled and grad_norm <= _STALL_GRAD),
        optimizer=res.method,
        seconds=time.perf_counter() - start,
    )


def _projected_grad_norm(x, grad, lower) -> float:
    """The gradient's norm once the components pushing a parameter at its lower bound outwards are dropped."""
    grad = np.where((x <= lower) & (grad > 0), 0.0, np.asarray(grad, np.float64))
    return float(np.linalg.norm(grad))
