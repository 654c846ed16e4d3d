"""Profile likelihood and profile confidence intervals of an exact Gaussian fit (lme4's ``profile.merMod`` and
``confint.merMod(method = "profile")``).

lme4 (Bates et al. 2015, J. Stat. Softw. 67(1), sec. 5.1; R/profile.R) profiles the ML deviance on the
"varpar" scale: standard deviations, correlations and ``sigma`` (named as ``confint(m, oldNames = FALSE)``
names them), then the fixed effects; :mod:`lmevi.exact.varpar` has the criterion (lme4's ``devfun2``, and
a fixed effect held at a value with the others and sigma profiled out). The profile of a parameter ``p`` is
the signed square root ``zeta(p) = sign(p - p_hat) sqrt(dev(p) - dev_hat)``, every point re-optimising the
other parameters (NLopt's BOBYQA, lme4's optimiser).

REML fits: as lme4, the profile is that of the ML deviance. lme4's ``devfun2`` starts with ``refitML(fm)``, so
``confint(m, method = "profile")`` of a REML fit gives intervals around the ML estimates; so do these. The
Wald intervals (:func:`wald_confint`) use the fit's own ``vcov`` (the REML one for a REML fit), as lme4's.

Where we differ from lme4: lme4 evaluates zeta on a grid and interpolates a spline through it
(``backSpline``); here each interval end is a root of ``zeta(p) = +-qnorm((1 + level) / 2)`` found by
bracketing and a safeguarded secant method (Illinois), each evaluation warm-started from the line through the
nearest two points evaluated before. The ends' conventions are lme4's: where the profile does not reach the
quantile before the parameter's bound, the end is the bound (0 for an SD, -1 or 1 for a correlation, ``inf``
above an SD), and ``NaN`` for a fixed effect.

The criterion is evaluated in NumPy, densely after the largest term's elimination: it suits models whose
dense block is small (:data:`lmevi.exact.evaluate.NUMPY_MAX`); larger ones work, at ``O(P^3)`` per evaluation.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmevi.exact.optimise import fit_exact
from lmevi.exact.structure import Structure, build_structure
from lmevi.exact.covfactors import theta_from_chol, theta_lower_bounds
from lmevi.frame.design import build_design
from lmevi.runtime.precision import x64
from lmevi.result.components import percent_label
from lmevi.exact.varpar import (
    DenseCriterion,
    Layout,
    dense_criterion,
    deviance_fixed,
    deviance_varpar,
    layout_of,
    varpar_of_theta,
)

# lme4's profile runs out to |zeta| = sqrt(qchisq(1 - alphamax, n_params)) with alphamax = 0.01.
ALPHAMAX = 0.01
# The profile fails to reach the quantile above an SD (or sigma) once it has gone this many multiples of the
# first step past the estimate: the end is then inf, as in lme4.
_MAX_REACH = 1e4
# The root finder stops when the bracket is below this fraction of the first step (a quarter of the estimate
# or about a Wald half-width) or when zeta is within _ZETA_TOL of the quantile (the end is then within about
# _ZETA_TOL / 2 of its distance from the estimate). With tolerances 1e-8 and 1e-9 instead the ends of
# sleepstudy, Penicillin and Pastes move by at most 3e-6 of the interval's width.
_ROOT_XTOL = 1e-4
_ZETA_TOL = 1e-5
# BOBYQA's stopping rule (trust region radius) for the re-optimised parameters, in units of their estimates
# (_Trace's scale), and its first step. Near an interval end an error e in the deviance moves zeta by about
# e / 4; at 1e-5 the zeta of sleepstudy's parameters agree with those at 1e-10 to 1e-11 (BOBYQA's last
# quadratic model lands far inside its final radius).
_INNER_XTOL = 1e-5
_INNER_STEP = 0.02
# Deviances this far below the optimum mean the optimum was not one (lme4 stops with "profiling detected new,
# lower deviance" beyond its devtol 1e-9; here a looser bound, relative to the deviance, for the ML refit's
# own tolerance).
_DEVTOL = 1e-6


# ----------------------------------------------------------------------------------------------------
# Re-optimising the other parameters


def _minimise(fun, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, float]:
    """NLopt's BOBYQA (lme4's optimiser) in units of ``scale``, from ``x0``; returns the best point evaluated."""
    import nlopt

    x0 = np.clip(np.asarray(x0, np.float64), lower, upper)
    if len(x0) == 0:
        return x0, float(fun(x0))
    best = [math.inf, x0]

    def objective(z, grad):
        x = np.asarray(z) * scale
        f = float(fun(x))
        if f < best[0]:
            best[:] = [f, x]
        return f if math.isfinite(f) else 1e300

    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_lower_bounds(lower / scale)
    opt.set_upper_bounds(upper / scale)
    opt.set_min_objective(objective)
    opt.set_xtol_abs(_INNER_XTOL)
    opt.set_maxeval(2000)
    z0 = x0 / scale
    room = np.minimum(z0 - lower / scale, upper / scale - z0)
    # BOBYQA needs its first steps inside the box; a coordinate on its bound takes the step inwards
    opt.set_initial_step(np.where(room > 0, np.minimum(_INNER_STEP, room), _INNER_STEP))
    try:
        opt.optimize(z0)
    except nlopt.RoundoffLimited:
        pass
    return best[1], best[0]


# ----------------------------------------------------------------------------------------------------
# The model to profile: the ML optimum on the varpar scale


class ProfileModel(NamedTuple):
    """An exact Gaussian model at its ML optimum, ready to profile (what lme4's ``devfun2`` holds).

    Attributes:
        structure: :func:`lmevi.exact.structure.build_structure` of the design (data units, ML).
        criterion: its :func:`dense_criterion`.
        layout: the varpar names and their places in theta.
        theta: ``(n_theta,)`` the ML optimum (design order).
        varpar: ``(n_vp,)`` sd, cor per term (lme4's term order), then sigma, at the ML optimum.
        beta: ``(p,)`` ML fixed effects.
        se: ``(p,)`` their ML standard errors (lme4's ``stderr`` of ``refitML(fm)``).
        base: the ML deviance at the optimum.
        lower, upper: ``(n_vp,)`` bounds of the varpars (lme4's: 0 and inf for an SD or sigma, -1 and 1 for a
            correlation).
    """

    structure: Structure
    criterion: DenseCriterion
    layout: Layout
    theta: np.ndarray
    varpar: np.ndarray
    beta: np.ndarray
    se: np.ndarray
    base: float
    lower: np.ndarray
    upper: np.ndarray

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def estimates(self) -> np.ndarray:
        """``(n_vp + p,)`` varpars then fixed effects at the ML optimum."""
        return np.concatenate([self.varpar, self.beta])


def profile_model(design, groups, coef_names, fixed_names, theta0=None) -> ProfileModel:
    """Refit ``design`` by ML (lme4's ``refitML``) and lay its parameters out on the varpar scale.

    Args:
        design: :class:`lmevi.frame.design.Design` in the data's units (float64).
        groups: per random term (design order) its grouping factor as lme4 names it (``"Subject"``).
        coef_names: per random term its coefficient names (``("(Intercept)", "Days")``).
        fixed_names: ``(p,)`` fixed-effect names.
        theta0: ``(n_theta,)`` a start for the ML refit (the REML optimum, say); lme4's default when ``None``.
    """
    s = build_structure(design, reml=False)
    ml = fit_exact(design, reml=False, theta0=theta0, structure=s, backend="numpy")
    if not ml.converged:
        warnings.warn(f"the ML refit did not converge (projected gradient {ml.grad_norm:.3g} per observation): "
                      "the profile is taken around its last point", RuntimeWarning, stacklevel=3)
    layout = layout_of(groups, coef_names, s.n_levels, fixed_names)
    varpar = varpar_of_theta(ml.theta, float(ml.sigma), layout)
    lower = np.where(layout.is_cor, -1.0, 0.0)
    upper = np.where(layout.is_cor, 1.0, np.inf)
    return ProfileModel(s, dense_criterion(s), layout, np.asarray(ml.theta), varpar, np.asarray(ml.beta, np.float64),
                        np.sqrt(np.diag(ml.beta_cov)), float(ml.objective), lower, upper)


@x64
def model_of_fit(fit) -> ProfileModel:
    """:func:`profile_model` of an exact Gaussian :class:`lmevi.result.fitresult.FitResult`: the design rebuilt in the
    data's units from ``fit.info.formula`` and ``fit.data``, the ML refit started at the fit's theta."""
    if not fit.likelihood.moment_form or fit.options.q != "exact":
        raise ValueError("profiles need an exact Gaussian fit (lmevi.fit(..., q='exact'))")
    if fit.options.residual_scale is not None:
        raise ValueError("profiles need sigma estimated (residual_scale=None)")
    design, info = build_design(fit.info.formula, fit.data, jnp.float64, fit.options.missing)
    theta0 = theta_from_chol(fit.params.model.chol, float(fit.params.model.sigma))
    return profile_model(design, [t.group for t in info.terms], [t.coef_names for t in info.terms],
                         info.fixed_names, theta0)


# ----------------------------------------------------------------------------------------------------
# One parameter's profile


class _Trace:
    """zeta of one parameter ``w`` (a position in :attr:`ProfileModel.names`), each value's other parameters
    re-optimised from those of the nearest value evaluated before. Rows (``[zeta, varpar..., beta...]``) are
    kept per value, so a value is optimised once."""

    def __init__(self, model: ProfileModel, w: int):
        self.model, self.w = model, w
        n_vp = model.layout.n_vp
        self.center = float(model.estimates[w])
        self.rows: dict[float, np.ndarray] = {}
        if w < n_vp:
            self.others = np.array([i for i in range(n_vp) if i != w], dtype=int)
            sigma = model.varpar[-1]
            scale = np.where(model.layout.is_cor, 1.0, np.where(model.varpar > 0, model.varpar, 0.1 * sigma))
            lower = model.lower.copy()
            lower[-1] = 1e-6 * sigma  # sigma = 0 is no covariance
            self.box = (lower[self.others], model.upper[self.others], scale[self.others])
            start = np.nan_to_num(model.varpar[self.others])  # a correlation of a zero SD is NaN: start at 0
        else:
            theta = model.theta
            diag = theta_lower_bounds(model.structure.n_coefs) == 0.0
            floor = 0.1 * (np.mean(np.abs(theta[diag])) if np.any(theta[diag] > 0) else 1.0)
            self.box = (theta_lower_bounds(model.structure.n_coefs), np.full(len(theta), np.inf),
                        np.maximum(np.abs(theta), floor))
            start = theta
        self.starts: dict[float, np.ndarray] = {self.center: start}
        self.rows[self.center] = np.concatenate([[0.0], model.estimates])

    def row(self, x: float) -> np.ndarray:
        x = float(x)
        if x not in self.rows:
            self.rows[x] = self._evaluate(x)
        return self.rows[x]

    def zeta(self, x: float) -> float:
        return float(self.row(x)[0])

    def _evaluate(self, x: float) -> np.ndarray:
        m = self.model
        lower, upper, scale = self.box
        start = self._start(x, lower, upper)
        if self.w < m.layout.n_vp:
            v = m.varpar.copy()
            v[self.w] = x

            def fun(z):
                v[self.others] = z
                return deviance_varpar(v, m.criterion, m.layout)[0]

            z, dev = _minimise(fun, start, lower, upper, scale)
            v[self.others] = z
            parts = deviance_varpar(v, m.criterion, m.layout)[1]
            beta = parts.beta if parts is not None else np.full(len(m.beta), np.nan)
        else:
            j = self.w - m.layout.n_vp
            z, dev = _minimise(lambda th: deviance_fixed(th, j, x, m.criterion)[0], start, lower, upper, scale)
            _, parts, pwrss = deviance_fixed(z, j, x, m.criterion)
            v = varpar_of_theta(z, math.sqrt(pwrss / m.structure.n_obs), m.layout)
            beta = parts.beta + parts.V[:, j] / parts.V[j, j] * (x - parts.beta[j])
        self.starts[x] = np.asarray(z, np.float64).copy()
        diff = dev - m.base
        if diff < -_DEVTOL * max(1.0, abs(m.base)):
            raise RuntimeError(f"profiling {m.names[self.w]} found a deviance {-diff:.3g} below the optimum's: "
                               "the fit did not converge")
        zeta = math.copysign(math.sqrt(max(diff, 0.0)), x - self.center) if x != self.center else 0.0
        return np.concatenate([[zeta], v, beta])

    def _start(self, x: float, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """The others' start at ``x``: the line through the optima at the two evaluated values nearest ``x``
        (extrapolated outwards along the profile, interpolated within a bracket), inside the bounds."""
        near = sorted(self.starts, key=lambda t: abs(t - x))[:2]
        if len(near) < 2:
            return self.starts[near[0]]
        (a, b), (za, zb) = near, (self.starts[near[0]], self.starts[near[1]])
        return np.clip(za + (zb - za) * (x - a) / (b - a), lower, upper)

    def first_step(self, target: float) -> float:
        """The first step away from the estimate: a little past the Wald end ``target * se`` for a fixed
        effect (lme4's ML standard error), a quarter of the estimate for an SD or sigma, 0.2 for a
        correlation."""
        m = self.model
        if self.w >= m.layout.n_vp:
            return 1.05 * target * float(m.se[self.w - m.layout.n_vp])
        if m.layout.is_cor[self.w]:
            return 0.2
        return 0.25 * (self.center if self.center > 0 else m.varpar[-1])


def _find_end(trace: _Trace, direction: float, target: float, bound: float) -> float | None:
    """The value where ``zeta = direction * target`` on one side of the estimate (``direction`` +1 or -1),
    or ``None`` where the profile reaches ``bound`` (or runs past ``_MAX_REACH`` first steps) first.

    Secant steps on zeta (nearly linear in most parameters) aim a little past the end until they bracket it,
    each step at most four times the previous one; then :func:`_root` finds it."""
    step = trace.first_step(target)
    x_prev, z_prev = trace.center, 0.0
    x = min(trace.center + step, bound) if direction > 0 else max(trace.center - step, bound)
    for _ in range(100):
        z = trace.zeta(x)
        if direction * z >= target:
            f = lambda t: trace.zeta(t) - direction * target
            return _root(f, x_prev, z_prev - direction * target, x, z - direction * target, _ROOT_XTOL * step)
        if x == bound or abs(x - trace.center) > _MAX_REACH * step:
            return None
        last = abs(x - x_prev)
        slope = (z - z_prev) / (x - x_prev)
        jump = (direction * target * 1.1 - z) / slope if slope > 0 else 4.0 * last
        x_prev, z_prev = x, z
        x = x + direction * min(max(abs(jump), 0.1 * last), 4.0 * last)
        x = min(x, bound) if direction > 0 else max(x, bound)
    return None


def _root(f, a: float, fa: float, b: float, fb: float, xtol: float, ftol: float = _ZETA_TOL) -> float:
    """A root of ``f`` between ``a`` and ``b`` (``f(a)``, ``f(b)`` of opposite signs, or one of them 0) by the
    Illinois method: regula falsi, halving the value kept at an end that stays twice in a row, so that the
    bracket shrinks from both sides. On a nearly linear ``f`` (zeta) it converges superlinearly, in two or
    three evaluations here. Stops at ``|f| <= ftol`` or a bracket below ``xtol``."""
    if fa == 0.0 or fb == 0.0:
        return a if fa == 0.0 else b
    side = 0
    c = a
    for _ in range(60):
        c = (a * fb - b * fa) / (fb - fa)
        fc = f(c)
        if abs(fc) <= ftol or abs(b - a) <= xtol:
            return c
        if (fc > 0) == (fb > 0):
            b, fb = c, fc
            fa = fa / 2.0 if side == -1 else fa
            side = -1
        else:
            a, fa = c, fc
            fb = fb / 2.0 if side == 1 else fb
            side = 1
    return c


def _bounds(model: ProfileModel, w: int) -> tuple[float, float]:
    if w < model.layout.n_vp:
        return float(model.lower[w]), float(model.upper[w])
    return -math.inf, math.inf


def _search_bounds(model: ProfileModel, w: int) -> tuple[float, float]:
    """The bounds the search for an end may step to: sigma's lower one is a thousandth of the estimate, not 0
    (no covariance), where the deviance is far past any quantile."""
    lo, hi = _bounds(model, w)
    if w == model.layout.n_vp - 1:
        lo = 1e-3 * float(model.varpar[w])
    return lo, hi


def _interval(model: ProfileModel, w: int, z: float, trace: _Trace | None = None) -> tuple[float, float]:
    """Both ends at ``|zeta| = z``, with lme4's conventions where the profile does not reach ``z``: the
    bound for a variance parameter (0, -1, 1 or inf), ``NaN`` for a fixed effect."""
    if not math.isfinite(model.estimates[w]):  # a correlation of a zero SD (lme4's NaN): nothing to profile
        return math.nan, math.nan
    trace = _Trace(model, w) if trace is None else trace
    lo_bound, hi_bound = _search_bounds(model, w)
    fallback = _bounds(model, w) if w < model.layout.n_vp else (math.nan, math.nan)
    ends = []
    for direction, bound, default in ((-1.0, lo_bound, fallback[0]), (1.0, hi_bound, fallback[1])):
        end = None if trace.center == bound else _find_end(trace, direction, z, bound)
        ends.append(default if end is None else end)
    return ends[0], ends[1]


# ----------------------------------------------------------------------------------------------------
# Public: intervals and traces


def _which(which, model: ProfileModel) -> list[int]:
    """lme4's ``get.which``: ``None`` for every parameter; names, ``"theta_"`` (the variance parameters) and
    ``"beta_"`` (the fixed effects); or 0-based positions in :attr:`ProfileModel.names`."""
    n, n_vp = len(model.names), model.layout.n_vp
    if which is None:
        return list(range(n))
    items = [which] if isinstance(which, (str, int, np.integer)) else list(which)
    out = set()
    for item in items:
        if item == "theta_":
            out.update(range(n_vp))
        elif item == "beta_":
            out.update(range(n_vp, n))
        elif isinstance(item, str):
            if item not in model.names:
                raise ValueError(f"no parameter {item!r}; the parameters are {list(model.names)}")
            out.add(model.names.index(item))
        elif isinstance(item, (int, np.integer)) and 0 <= item < n:
            out.add(int(item))
        else:
            raise ValueError(f"which must name parameters or give positions below {n}, got {item!r}")
    return sorted(out)




def _chi2_quantile(p: float, k: int) -> float:
    """R's ``qchisq(p, k)`` by bisection on the regularised lower incomplete gamma function ``P(k / 2, x / 2)``,
    from its series ``e^-y y^a sum_n y^n / Gamma(a + n + 1)`` (to 1e-12; scipy.stats costs a second to import)."""
    a = k / 2.0

    def cdf(x):
        y = x / 2.0
        term = math.exp(-y + a * math.log(y) - math.lgamma(a + 1.0))
        total, n = term, 0
        while term > 1e-17 * total:
            n += 1
            term *= y / (a + n)
            total += term
        return total

    lo, hi = 0.0, max(1.0, 4.0 * k)
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _quantile(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def confint_of_model(model: ProfileModel, level: float = 0.95, which=None) -> pd.DataFrame:
    """:func:`profile_confint` of a :class:`ProfileModel`."""
    z = _quantile(level)
    rows = _which(which, model)
    ends = [_interval(model, w, z) for w in rows]
    a = (1.0 - level) / 2.0
    return pd.DataFrame(ends, index=[model.names[w] for w in rows], columns=[percent_label(a), percent_label(1.0 - a)])


def profile_confint(fit, level: float = 0.95, which=None) -> pd.DataFrame:
    """Profile likelihood confidence intervals, as lme4's ``confint(m, method = "profile", oldNames = FALSE)``.

    Each end solves ``zeta(p) = -+qnorm((1 + level) / 2)`` by bracketing and Brent's method, every evaluation
    re-optimising the other parameters (see the module docstring). For a REML fit the profile is of the ML
    deviance around the ML estimates, as lme4's.

    Args:
        fit: an exact Gaussian :class:`lmevi.result.fitresult.FitResult` (``q="exact"``).
        level: the confidence level.
        which: the parameters (see :func:`_which`); all when ``None``.

    Returns:
        One row per parameter, indexed by lme4's names (``sd_(Intercept)|Subject``,
        ``cor_Days.(Intercept)|Subject``, ``sd_Days|Subject``, ``sigma``, ``(Intercept)``, ``Days``), columns
        ``"2.5 %"`` and ``"97.5 %"`` (for ``level = 0.95``). Where the profile does not reach the quantile
        before a bound the end is the bound (0 for an SD, -1 or 1 for a correlation, ``inf`` above an SD),
        ``NaN`` for a fixed effect, as in lme4.
    """
    return confint_of_model(model_of_fit(fit), level, which)


def wald_confint(fit, level: float = 0.95) -> pd.DataFrame:
    """lme4's ``confint(m, method = "Wald", oldNames = FALSE)``: ``NaN`` rows for the variance parameters (lme4's
    ``NA``), then ``beta +- qnorm((1 + level) / 2) se`` from the fit's own ``vcov`` (REML for a REML fit)."""
    z = _quantile(level)
    info = fit.info
    layout = layout_of([t.group for t in info.terms], [t.coef_names for t in info.terms],
                     [len(t.levels) for t in info.terms], info.fixed_names)
    est = fit.fixef().to_numpy()
    se = np.sqrt(np.diag(fit.vcov().to_numpy()))
    a = (1.0 - level) / 2.0
    lo = np.concatenate([np.full(layout.n_vp, np.nan), est - z * se])
    hi = np.concatenate([np.full(layout.n_vp, np.nan), est + z * se])
    return pd.DataFrame({percent_label(a): lo, percent_label(1.0 - a): hi}, index=list(layout.names))


def profile_of_model(model: ProfileModel, which=None, n_points: int = 8, alphamax: float = ALPHAMAX) -> pd.DataFrame:
    """:func:`profile` of a :class:`ProfileModel`."""
    cutoff = math.sqrt(_chi2_quantile(1.0 - alphamax, len(model.names)))
    frames = []
    for w in _which(which, model):
        if not math.isfinite(model.estimates[w]):
            continue
        trace = _Trace(model, w)
        ends = _interval(model, w, cutoff, trace)
        lo_search, hi_search = _search_bounds(model, w)
        values = [trace.center]
        for end, bound in zip(ends, (lo_search, hi_search)):
            end = bound if math.isnan(end) or math.isinf(end) else end
            if math.isinf(end):  # the profile stays below the cutoff up to an unbounded side: what was evaluated
                continue
            end = max(end, lo_search) if end < trace.center else end
            # outwards from the estimate, each point warm-started from the one before
            values.extend(trace.center + (end - trace.center) * np.arange(1, n_points + 1) / n_points)
        table = np.array([trace.row(x) for x in sorted(set(values))])
        frame = pd.DataFrame(table, columns=[".zeta", *model.names])
        frame[".par"] = model.names[w]
        frame[".focal"] = frame[model.names[w]]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def profile(fit, which=None, n_points: int = 8, alphamax: float = ALPHAMAX) -> pd.DataFrame:
    """Profile traces, in the layout of lme4's ``as.data.frame(profile(m, signames = FALSE))``.

    Each parameter is profiled out to ``|zeta| = sqrt(qchisq(1 - alphamax, n_params))`` on both sides (lme4's
    cutoff), or to its bound where the profile stays below the cutoff, the ends found as
    :func:`profile_confint` finds its ends; the rows are the estimate and ``n_points`` evenly spaced values on
    each side out to those ends (on an unbounded side that stays below the cutoff, none).

    Args:
        fit: an exact Gaussian :class:`lmevi.result.fitresult.FitResult`.
        which: the parameters (see :func:`_which`); all when ``None``.
        n_points: points per side of the estimate.
        alphamax: lme4's ``alphamax``.

    Returns:
        Columns ``.zeta``, one per parameter (its value along the trace: the profiled one fixed, the others
        re-optimised; the fixed effects at their GLS estimates), ``.par`` (the profiled parameter's name) and
        ``.focal`` (its value), sorted by ``.focal`` within ``.par``.
    """
    return profile_of_model(model_of_fit(fit), which, n_points, alphamax)
