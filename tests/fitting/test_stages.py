"""The public stages (``build_model -> fit_model -> make_result``), the likelihood seam and the q seam."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import pandas as pd
import pytest

import lmevi
from lmevi.q import cavi
from lmevi.q import elbo
from lmevi.fitting import loops as inference
from lmevi.families import gaussian as likelihood
from lmevi.fitting import glmm
from lmevi.fitting.build import make_problem
from lmevi.fitting.control import settings

FORMULA = "y ~ x + (1 | g) + (0 + x | g) + (1 | h)"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    n = 150
    g = rng.integers(0, 10, n)
    h = rng.integers(0, 4, n)
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(0, 1.0, 10)[g] + rng.normal(0, 0.6, 10)[g] * x + rng.normal(0, 0.5, 4)[h]
    a = g // 2  # 5 parents of 2 levels of g each; a clearly non-zero parent variance
    y = y + rng.normal(0, 1.0, 5)[a]
    return pd.DataFrame({"y": y + rng.normal(0, 0.5, n), "x": x, "g": g, "h": h, "a": a})


@pytest.fixture(scope="module")
def fitted(frame):
    return lmevi.fit(FORMULA, frame, q="structured", progress=False)


def test_fit_is_the_composition_of_the_stages(frame, fitted):
    """Same stages, same compiled programs: the results agree exactly."""
    how = settings()
    model = lmevi.build_model(FORMULA, frame, q="structured")
    params, run = lmevi.fit_model(model, how)
    staged = lmevi.make_result(model, how, params, run)
    np.testing.assert_array_equal(staged.sd(), fitted.sd())
    np.testing.assert_array_equal(staged.fixef(), fitted.fixef())
    assert staged.elbo == fitted.elbo
    assert staged.options == fitted.options


def test_model_stage_exposes_design_and_blocks(frame):
    model = lmevi.build_model(FORMULA, frame, q="meanfield", reml=False)
    problem = model.problem
    assert problem.n_obs == len(frame) and model.y.shape == (len(frame),)
    assert [t.group for t in model.info.terms] == ["g", "g", "h"]
    assert len(problem.spec.blocks) == 3 and not problem.spec.reml  # mean-field: one block per term
    assert problem.likelihood is likelihood.GAUSSIAN and problem.estimate_sigma


def test_old_family_spelling_still_names_q(frame, fitted):
    with pytest.warns(DeprecationWarning, match="q='structured'"):
        old = lmevi.fit(FORMULA, frame, family="structured", progress=False)
    np.testing.assert_array_equal(old.sd(), fitted.sd())
    assert (old.options.family, old.options.q) == ("gaussian", "structured")
    with pytest.raises(ValueError, match="contradicts"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lmevi.fit(FORMULA, frame, family="structured", q="meanfield", progress=False)


def test_sd_labels_are_one_rule_for_sd_and_export(fitted):
    """Two terms on one factor: ``g:(Intercept)`` and ``g:x``, the same in ``sd()`` and in the ArviZ export
    (varcorr keeps lme4's ``g`` and ``g.1``)."""
    assert list(fitted.sd().index) == ["g:(Intercept)", "g:x", "h", "Residual"]
    assert list(fitted.varcorr()["grp"]) == ["g", "g.1", "h", "Residual"]
    idata = fitted.to_inference_data(num_samples=4, rng_key=jax.random.PRNGKey(0))
    assert list(idata.posterior["component"].values) == list(fitted.sd().index)
    np.testing.assert_allclose(idata.posterior["sd"].values[0, 0], fitted.sd().to_numpy(), rtol=1e-12)


def test_a_new_fixed_sigma_compiles_nothing(frame):
    """A fixed residual SD is data of the compiled problem, not part of its structure."""
    a = lmevi.fit(FORMULA, frame, residual_scale=1.0, progress=False)
    size = inference._cavi_chunk._cache_size()
    b = lmevi.fit(FORMULA, frame, residual_scale=2.0, progress=False)
    assert inference._cavi_chunk._cache_size() == size
    assert (a.sd()["Residual"], b.sd()["Residual"]) == (pytest.approx(1.0), pytest.approx(2.0))


@dataclasses.dataclass(frozen=True)
class PerRowGaussian(likelihood.Gaussian):
    """The Gaussian likelihood without its shortcut: the ELBO must take the generic per-row route."""

    name: str = "gaussian-per-row"
    moment_form: bool = False


@pytest.mark.parametrize("family_spec", ["meanfield-reml", "arrowhead-ml"], indirect=True)
def test_generic_expected_log_likelihood_route_equals_the_shortcut(crossed, family_spec):
    """A likelihood without ``moment_form`` gets the per-row means and variances from the q seam; for the
    Gaussian both routes are the same sum in another order (1e-12 relative)."""
    from dense import random_params

    params = random_params(4, family_spec)
    short = make_problem(crossed.design, family_spec)
    generic = make_problem(crossed.design, family_spec, likelihood=PerRowGaussian())
    a = float(jax.jit(elbo.closed_form)(short, params))
    b = float(jax.jit(elbo.closed_form)(generic, params))
    assert b == pytest.approx(a, rel=1e-12)
    # coordinate ascent's closed form needs moment form; the generic route takes the working-response step
    assert cavi.supports(short) and not cavi.supports(generic)
    assert glmm.supports(generic) and not glmm.supports(short)


# ----------------------------------------------------------------------------------------------------
# Shape buckets: padding rows and levels changes nothing but the compiled program's reuse

PADDING_CASES = {
    # correlated slopes; ML and REML
    "slopes-reml": ("y ~ x + (x | g)", dict(reml=True)),
    "slopes-ml": ("y ~ x + (x | g)", dict(reml=False)),
    # crossed small factor in the large one's block (structured), and mean-field
    "crossed-structured": ("y ~ x + (1 | g) + (1 | h)", dict(small_threshold=5)),
    "crossed-meanfield": ("y ~ x + (1 | g) + (1 | h)", dict(q="meanfield")),
    # nesting: g within a (a = g // 2), the nested factor large, its parent small in the same block
    "nested": ("y ~ x + (1 | a/g)", dict(small_threshold=6)),
    "two-terms-one-factor": (FORMULA, dict()),
}


def _staged(frame, formula, pad, how=None, **options):
    how = settings(tol=1e-12) if how is None else how
    model = lmevi.build_model(formula, frame, pad=pad, **{"q": "structured", **options})
    params, run = lmevi.fit_model(model, how)
    return model, lmevi.make_result(model, how, params, run)


def _assert_same_fit(padded, plain, options, rtol):
    np.testing.assert_allclose(padded.sd(), plain.sd(), rtol=rtol)
    np.testing.assert_allclose(padded.fixef(), plain.fixef(), rtol=rtol)
    a, b = padded.ranef(), plain.ranef()
    np.testing.assert_allclose(a.condval, b.condval, rtol=0, atol=rtol * np.abs(b.condval).max())
    np.testing.assert_allclose(a.condsd, b.condsd, rtol=rtol)
    np.testing.assert_allclose(padded.fitted, plain.fitted, rtol=rtol, atol=rtol * np.abs(plain.fitted).max())
    if options.get("reml", True):
        np.testing.assert_allclose(padded.fixef_se(), plain.fixef_se(), rtol=rtol)


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_padded_sweeps_equal_the_unpadded_ones(frame, case):
    """Zero rows and empty levels drop out of every sum (M-step averages, KL terms): ten plain sweeps from the
    same start land on the same numbers, to float64 rounding of differently sized programs (measured 1e-15;
    1e-12 asked). A padding row or level that leaked into any sum would move them by far more."""
    formula, options = PADDING_CASES[case]
    how = settings(tol=0.0, num_steps=10, accelerate=False)
    padded_model, padded = _staged(frame, formula, True, how, **options)
    plain_model, plain = _staged(frame, formula, False, how, **options)
    assert padded_model.padded and not plain_model.padded
    assert padded_model.problem.design.y.shape[0] == 256 > len(frame)  # really padded
    assert padded.steps == plain.steps == 10
    assert padded.elbo == pytest.approx(plain.elbo, rel=1e-12)
    _assert_same_fit(padded, plain, options, 1e-12)


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_padded_fit_equals_the_unpadded_one(frame, case):
    """The default fit to convergence (SQUAREM, whose step length ignores padding levels): the same steps and
    the same numbers. Near the optimum SQUAREM's step length is a ratio of sweep differences at rounding level,
    and the ELBO is flat to second order there, so last-bit differences between the two programs move the
    estimates by up to about 1e-8 (measured 5e-9) while the ELBO agrees to 1e-12: 1e-7 asked, 1e-10 for the
    ELBO."""
    formula, options = PADDING_CASES[case]
    padded_model, padded = _staged(frame, formula, True, **options)
    plain_model, plain = _staged(frame, formula, False, **options)
    assert padded_model.padded and not plain_model.padded
    assert padded.steps == plain.steps
    assert padded.elbo == pytest.approx(plain.elbo, rel=1e-10)
    _assert_same_fit(padded, plain, options, 1e-7)


def test_data_of_a_new_size_compiles_nothing(frame):
    """Rows and levels of another count within the same buckets: the same compiled fitting loop."""
    lmevi.fit(FORMULA, frame, progress=False)
    size = inference._cavi_chunk._cache_size()
    smaller = frame[frame["g"] != 3].iloc[:-7]  # 9 of 10 levels of g, fewer rows
    m = lmevi.fit(FORMULA, smaller, progress=False)
    assert inference._cavi_chunk._cache_size() == size
    assert m.info.n_obs == len(smaller) and len(m.ranef().query("grpvar == 'g'")) == 2 * 9


def test_bucket_ladder():
    from lmevi.fitting.build import bucket

    assert [bucket(n, 8) for n in (1, 8, 9, 18, 1024, 1025, 1300, 2049)] == [8, 8, 16, 32, 1024, 1280, 1536, 2560]
    for n in range(1025, 20000, 37):
        assert n <= bucket(n, 8) <= 1.25 * n  # at most 25 % padding beyond 1024
