"""NLopt's BOBYQA (lme4's default optimiser, ``nloptwrap``), derivative-free, as both of lmevi's exact fits run
it: lme4's criterion on the NumPy path (:mod:`lmevi.exact.optimise`) and glmer's (:mod:`lmevi.exact.laplace`).
"""

from __future__ import annotations

import numpy as np


def minimise(fun, x0, lower, *, xtol_abs: float, max_evals: int, ftol_abs: float | None = None,
             initial_step=None) -> tuple[np.ndarray, float, int, int]:
    """Minimise ``fun`` (a float of a NumPy ``(n,)`` point) from ``x0`` within the lower bounds ``lower``.

    Returns:
        ``(x, f, n_evals, code)``: the best point it evaluated and its value (also when NLopt stops with an
        exception), the number of evaluations, and NLopt's result code (``nlopt.ROUNDOFF_LIMITED`` when it
        stopped on round-off).
    """
    import nlopt  # imported here: a fit that never runs BOBYQA does not load it

    best, count = [np.inf, np.asarray(x0, np.float64)], [0]

    def objective(x, grad):
        count[0] += 1
        f = fun(np.asarray(x, np.float64))
        if f < best[0]:
            best[:] = [f, np.array(x, np.float64)]
        return f

    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_lower_bounds(np.asarray(lower, np.float64))
    opt.set_min_objective(objective)
    opt.set_xtol_abs(xtol_abs)
    if ftol_abs is not None:
        opt.set_ftol_abs(ftol_abs)
    opt.set_maxeval(max_evals)
    if initial_step is not None:
        opt.set_initial_step(initial_step)
    try:
        opt.optimize(np.asarray(x0, np.float64))
        code = opt.last_optimize_result()
    except nlopt.RoundoffLimited:
        code = nlopt.ROUNDOFF_LIMITED
    return best[1], float(best[0]), count[0], code
