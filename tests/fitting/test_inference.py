"""Fitting loops: the stop rule, coordinate ascent against L-BFGS, and recovery of simulated truth."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pandas as pd
import pytest

import lmevi
from lmevi.q import elbo
from lmevi.q import variational
from lmevi.q import layout
from lmevi.fitting import loops as inference
from lmevi.fitting.loops import StopRule
from lmevi.families.gaussian import GAUSSIAN
from conftest import simulate_departments
from dense import kernel_problem

closed_form = jax.jit(elbo.closed_form)


@pytest.fixture(scope="module")
def arrowhead(crossed):
    """The crossed design under the arrowhead family (large ``g``, small ``h`` and beta in one block)."""
    spec = layout.structured_spec(crossed.design, crossed.info, reml=True, small_threshold=5)
    kp = kernel_problem(crossed.design, spec)
    init = variational.init_params(crossed.design, spec, GAUSSIAN, None)
    return kp, init


# ----------------------------------------------------------------------------------------------------
# The stop rule


def test_cavi_stops_at_the_first_step_that_meets_the_tolerance(arrowhead):
    kp, init = arrowhead
    tol = 1e-8
    rule = StopRule(num_steps=500, tol=tol)
    params, run = inference.run_cavi(kp, init, rule, accelerate=False, progress=False)
    trace = run.elbo_trace
    assert run.converged and run.steps == len(trace) < 500
    change = np.abs(np.diff(trace)) / np.abs(trace[1:])
    assert change[-1] <= tol  # the rule holds at the last step ...
    assert np.all(change[:-1] > tol)  # ... and at no step before it
    # the trace is the ELBO of the returned parameters (same function, other compilation: 1e-12 relative)
    assert trace[-1] == pytest.approx(float(closed_form(kp, params)), rel=1e-12)


def test_windowed_rule_compares_means_of_consecutive_windows(arrowhead):
    kp, init = arrowhead
    tol, w = 1e-6, 3
    rule = StopRule(num_steps=500, tol=tol, window=w)
    _, run = inference.run_cavi(kp, init, rule, accelerate=False, progress=False)
    trace = run.elbo_trace
    assert run.converged
    means = np.array([trace[t - w + 1 : t + 1].mean() for t in range(2 * w - 1, len(trace))])
    prev = np.array([trace[t - 2 * w + 1 : t - w + 1].mean() for t in range(2 * w - 1, len(trace))])
    met = np.abs(means - prev) <= tol * np.abs(means)
    assert met[-1] and not met[:-1].any()


def test_chunking_does_not_change_the_run(arrowhead):
    """The host loop pauses every ``chunk`` steps for the progress bar; the computation must not notice."""
    kp, init = arrowhead
    rule = StopRule(num_steps=500, tol=1e-8)  # the rule of the test above: no new compilation
    a, run_a = inference.run_cavi(kp, init, rule, accelerate=False, progress=False)
    b, run_b = inference.run_cavi(kp, init, rule, accelerate=False, chunk=2, progress=False)
    assert run_a.steps == run_b.steps > 2
    # identical operations in a different number of compiled calls: 1e-12 relative
    np.testing.assert_allclose(run_a.elbo_trace, run_b.elbo_trace, rtol=1e-12)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_accelerated_run_never_lowers_the_elbo(crossed_fit):
    """The default coordinate ascent takes SQUAREM steps, kept only when they do not lower the ELBO."""
    trace = crossed_fit.run.elbo_trace
    assert crossed_fit.options.accelerate and crossed_fit.converged
    assert np.all(np.diff(trace) >= -1e-12 * np.abs(trace[1:]))  # rounding only, as for plain sweeps


# ----------------------------------------------------------------------------------------------------
# Tier 2: coordinate ascent and L-BFGS reach the same optimum


@pytest.fixture(scope="module")
def cavi_and_lbfgs(crossed, crossed_fit):
    """Both methods on the crossed design, exact (structured) q with beta in q, run to tight tolerances."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lmevi.ConvergenceWarning)
        lbfgs = lmevi.fit(
            crossed_fit.info.formula.text, crossed.frame, q="structured", method="optax", tol=1e-14, num_steps=3000,
            progress=False,
        )
    return crossed_fit, lbfgs


def test_cavi_and_lbfgs_reach_the_same_estimates(cavi_and_lbfgs):
    cavi, lbfgs = cavi_and_lbfgs
    # Both stop where the relative ELBO change is 1e-14; the estimates then sit within ~sqrt(1e-14)
    # relative of the optimum along its flattest direction. Measured: 2e-7 (SDs), 2e-8 (beta),
    # 1.3e-7 (effects, absolute, on a scale of 1); 1e-5 leaves room for the stopping point.
    np.testing.assert_allclose(lbfgs.varcorr()["sdcor"], cavi.varcorr()["sdcor"], rtol=1e-5)
    np.testing.assert_allclose(lbfgs.fixef(), cavi.fixef(), rtol=1e-5)
    np.testing.assert_allclose(lbfgs.ranef()["condval"], cavi.ranef()["condval"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(lbfgs.ranef()["condsd"], cavi.ranef()["condsd"], rtol=1e-5)


def test_cavi_and_lbfgs_parameters_have_the_same_elbo(cavi_and_lbfgs, crossed):
    """Recomputed from each result's parameters: agree to the stopping tolerance (measured 1e-14 relative)."""
    cavi, lbfgs = cavi_and_lbfgs
    a = float(closed_form(kernel_problem(crossed.design, cavi.spec), cavi.params))
    b = float(closed_form(kernel_problem(crossed.design, lbfgs.spec), lbfgs.params))
    assert b == pytest.approx(a, rel=1e-10)
    assert cavi.elbo == pytest.approx(a, rel=1e-12)  # the CAVI trace is the ELBO of its parameters


def test_lbfgs_reported_elbo_is_the_elbo_of_its_parameters(cavi_and_lbfgs, crossed):
    cavi, lbfgs = cavi_and_lbfgs
    recomputed = float(closed_form(kernel_problem(crossed.design, lbfgs.spec), lbfgs.params))
    # at convergence the last trace value is the ELBO at the returned parameters: 1e-10 relative
    assert lbfgs.elbo == pytest.approx(recomputed, rel=1e-10)
    assert lbfgs.elbo == pytest.approx(cavi.elbo, rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# Tier 3: recovery of simulated variance components and effects


TRUE_SD = {"a": 1.0, "b": 0.6, "c": 0.4}
LEVELS = {"a": 200, "b": 80, "c": 10}
SIGMA = 0.8
N_OBS = 3000


@pytest.fixture(scope="module")
def recovery():
    """3000 rows, three crossed factors with 200, 80 and 10 levels (every level used), one covariate."""
    rng = np.random.default_rng(2024)
    codes = {k: rng.permutation(np.resize(np.arange(J), N_OBS)) for k, J in LEVELS.items()}
    effects = {k: rng.normal(0.0, TRUE_SD[k], LEVELS[k]) for k in LEVELS}
    x = rng.normal(size=N_OBS)
    y = 2.0 + 0.5 * x + sum(effects[k][codes[k]] for k in LEVELS) + rng.normal(0.0, SIGMA, N_OBS)
    frame = pd.DataFrame({"y": y, "x": x, **codes})
    result = lmevi.fit("y ~ x + (1 | a) + (1 | b) + (1 | c)", frame, progress=False)
    return result, effects


def test_recovers_variance_components(recovery):
    """Each fitted SD against the SD of the effects actually drawn (ddof=1: the intercept absorbs their mean).

    Given the draws, the error of a variance estimate from ``J`` levels whose means carry noise variance
    ``c = sigma^2 J / n`` is about ``sqrt((2 c^2 + 4 S c) / J)`` on ``S``; we allow 3 of those, halved for
    the SD: 4.1% (a), 8.1% (b), 7.3% (c); measured 1.0%, 2.4%, 1.6%. The residual SD against the true
    sigma: 3 standard errors ``3 / sqrt(2 (n - 290))`` = 4.1%, measured 0.9%.
    """
    result, effects = recovery
    sd = result.sd()
    for k, b in effects.items():
        J = LEVELS[k]
        S, c = np.var(b, ddof=1), SIGMA**2 * J / N_OBS
        tol = 3 * 0.5 * np.sqrt((2 * c**2 + 4 * S * c) / J) / S
        assert sd[k] == pytest.approx(np.std(b, ddof=1), rel=tol), k
    residual_df = N_OBS - sum(LEVELS.values())
    assert sd["Residual"] == pytest.approx(SIGMA, rel=3 / np.sqrt(2 * residual_df))


def test_recovers_effects_and_fixed_effects(recovery):
    result, effects = recovery
    ranef = result.ranef()
    for k, b in effects.items():
        rows = ranef[ranef["grpvar"] == k]
        truth = b[rows["grp"].astype(int).to_numpy()]  # joined by level label, not by position
        # shrinkage estimates against the truth: the reliability S / (S + c) is 0.946 - 0.994 here and the
        # correlation about its square root, 0.97 - 0.997; measured 0.972 - 0.998
        assert np.corrcoef(rows["condval"], truth)[0, 1] >= 0.95, k
    # slope of x: standard error sigma / sqrt(n) = 0.015; 4 of those
    assert result.fixef()["x"] == pytest.approx(0.5, abs=4 * SIGMA / np.sqrt(N_OBS))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_loop_keeps_few_row_length_temporaries(dtype):
    """The compiled coordinate-ascent loop's temporaries, per row, on 2^17 InstEval-shaped rows: at most 42
    bytes (measured 33 in float32, 39 in float64). Before the row gathers took the level codes as they are
    and float32 sums over rows stopped widening the design, XLA hoisted a normalised copy of every term's codes
    and a float64 copy of X out of the loop (51 bytes a row in both): at 1e8 rows each byte a row is 100 MB."""
    with jax.enable_x64(True):
        n = 1 << 17
        model = lmevi.build_model("y ~ service + (1|s) + (1|d) + (1|dept)", simulate_departments(n, n // 25, n // 65),
                                  q="structured", dtype=dtype)
        problem = model.problem
        init = lmevi.fitting.stage.initial_params(problem, 0.1)
        trace = jax.numpy.zeros(50, problem.design.y.dtype)
        compiled = inference._cavi_chunk.full.lower(problem, init, trace, 0, 50, 1e-6, window=1,
                                                    accelerate=True).compile()
    per_row = compiled.memory_analysis().temp_size_in_bytes / problem.design.y.shape[0]
    assert per_row <= 42, per_row
