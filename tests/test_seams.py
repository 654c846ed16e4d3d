"""The seams, each shown working end to end by something defined in this file alone:

* links (:mod:`lmevi.families.links`): each a small object whose inverse and derivative agree with its link;
* a likelihood with a dispersion parameter and a non-canonical link (a Gamma family with the log link),
  registered with one call and fitted: its dispersion is estimated through the protocol
  (``update_dispersion``), with nothing Gamma-specific anywhere in lmevi;
* a q family (this module is its protocol module), registered with one call and fitted end to end: the ELBO,
  the results, the export and the map back to the data's units reach it only through the protocol.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import lmevi
from lmevi.families import links, registry
from lmevi.families.base import Generalized
from lmevi.families.binomial import BINOMIAL
from lmevi.families.poisson import POISSON
from lmevi.q import registry as q_registry
from lmevi.q import variational

# ----------------------------------------------------------------------------------------------------
# Links


@pytest.mark.parametrize("name", sorted(links.LINKS))
def test_each_link_inverts_and_differentiates(name):
    """``inverse(link(mu)) = mu`` and ``mu_eta = d inverse / d eta`` (JAX's derivative), to 1e-10 relative."""
    lk = links.get(name)
    mu = {"logit": [0.05, 0.3, 0.9], "probit": [0.05, 0.3, 0.9], "cloglog": [0.05, 0.3, 0.9]}.get(name, [0.2, 1.0, 7.0])
    mu = jnp.asarray(mu, jnp.float64) if jax.config.jax_enable_x64 else jnp.asarray(mu)
    eta = lk.link(mu)
    np.testing.assert_allclose(lk.inverse(eta), mu, rtol=1e-6 if mu.dtype == jnp.float32 else 1e-10)
    np.testing.assert_allclose(lk.mu_eta(eta), jax.vmap(jax.grad(lk.inverse))(eta), rtol=1e-5)


def test_a_family_takes_the_links_it_allows():
    assert registry.get("binomial", "probit").link.name == "probit"
    assert registry.get("binomial").link is links.LOGIT and registry.get("poisson", "log") is POISSON
    with pytest.raises(ValueError, match="binomial.*link one of"):
        registry.get("binomial", "log")


@pytest.mark.parametrize("like", [BINOMIAL, POISSON, dataclasses.replace(BINOMIAL, link=links.PROBIT),
                                  dataclasses.replace(BINOMIAL, link=links.CLOGLOG),
                                  dataclasses.replace(POISSON, link=links.SQRT)],
                         ids=lambda lk: f"{lk.name}-{lk.link.name}")
def test_working_moments_are_the_derivatives_of_the_expected_log_density(like):
    """g and h of the GLMM step: the first and minus the second derivative of E[log p] in the mean, against
    JAX's derivatives of the expected log-density (closed forms for the canonical links, automatic otherwise):
    1e-8 relative."""
    m = jnp.linspace(0.3, 2.0, 6)
    v = jnp.linspace(0.05, 0.6, 6)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0, 1.0, 1.0]) if like.name == "binomial" else jnp.asarray([0., 1, 3, 2, 5, 4])
    g, h = like.working_moments(y, m, v, 1.0)

    def total(mm):
        return jnp.sum(like.expected_log_density(y, mm, v, 1.0))

    np.testing.assert_allclose(g, jax.grad(total)(m), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(h, -jnp.diag(jax.hessian(total)(m)), rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# A likelihood with a dispersion and a non-canonical link, defined here


@dataclasses.dataclass(frozen=True)
class GammaLog(Generalized):
    """``y ~ Gamma`` with mean ``mu = exp(eta)`` and dispersion ``phi`` (shape ``1 / phi``), R's
    ``Gamma(link = "log")``: the log link is not the Gamma's canonical one (the inverse)."""

    name: str = "gamma-test"
    link: object = links.LOG
    links: tuple[str, ...] = ("log",)
    has_dispersion: bool = True

    def log_density(self, y, eta, dispersion):
        nu = 1.0 / dispersion
        return (nu * jnp.log(nu) - nu * eta + (nu - 1.0) * jnp.log(y) - nu * y * jnp.exp(-eta)
                - jax.scipy.special.gammaln(nu))

    @staticmethod
    def variance(mu):
        return mu**2

    def check(self, y, name):
        if np.any(y <= 0):
            raise ValueError(f"the response {name!r} of a Gamma model must be positive")

    def deviance_residuals(self, y, mu):
        return np.sign(y - mu) * np.sqrt(np.maximum(2.0 * ((y - mu) / mu - np.log(y / mu)), 0.0))


def _gamma_data(seed=3, groups=60, per=30, shape=2.0, sd=0.4):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=groups * per)
    mu = np.exp(0.5 + 0.3 * x + rng.normal(0.0, sd, groups)[g])
    return pd.DataFrame({"y": rng.gamma(shape, mu / shape), "x": x, "g": g.astype(str)})


def test_a_dispersion_family_defined_here_is_estimated_through_the_protocol():
    """Registered with one call and fitted by coordinate ascent: the working-response step takes the family's
    derivatives, and the dispersion its M-step. The dispersion comes back near the simulated 1/shape = 0.5
    (1,800 rows: a 10 % band is several standard errors), the fixed effects near the truth, and at the end the
    ELBO is flat in the dispersion (its derivative in log phi below 1e-6 of the ELBO's size)."""
    from lmevi.q import elbo

    registry.register(GammaLog())
    try:
        data = _gamma_data()
        model = lmevi.build_model("y ~ x + (1 | g)", data, family="gamma-test")
        how = lmevi.fit_settings(progress=False)
        params, run = lmevi.fit_model(model, how)
        m = lmevi.make_result(model, how, params, run)
        assert m.converged and m.options.family == "gamma-test" and m.likelihood == GammaLog()
        phi = float(m.params.model.sigma)
        assert phi == pytest.approx(0.5, rel=0.1)
        np.testing.assert_allclose(m.fixef(), [0.5, 0.3], atol=0.15)
        assert m.sd()["g"] == pytest.approx(0.4, rel=0.3)

        # the ELBO's derivative in log(phi) at the fit, by the same closed-form ELBO the fit maximised
        def at(log_phi):
            p = params._replace(model=params.model._replace(sigma=jnp.exp(log_phi)))
            return elbo.closed_form(model.problem, p)

        slope = float(jax.grad(at)(jnp.log(params.model.sigma)))
        assert abs(slope) < 1e-6 * abs(float(at(jnp.log(params.model.sigma))))
        assert "Family: gamma-test ( log )" in m.summary()
    finally:
        registry.LIKELIHOODS.pop("gamma-test")


def test_a_non_canonical_link_reaches_the_elbos_optimum():
    """Probit binomial, fitted by coordinate ascent on working responses (automatic derivatives): at the end the
    norm of the ELBO's gradient per observation, in every unconstrained parameter (the fit's own convergence
    check, ``RunInfo.grad_norm``, from JAX's gradient of the closed-form ELBO), is below 1e-6: a fixed point of
    the step is a stationary point of the ELBO; a wrong working moment leaves a gradient of the order of the
    data (measured 2.6e-3 with h doubled)."""
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(40), 25)
    x = rng.normal(size=g.size)
    eta = -0.2 + 0.6 * x + rng.normal(0, 0.7, 40)[g]
    data = pd.DataFrame({"y": (rng.uniform(size=g.size) < jax.scipy.stats.norm.cdf(eta)).astype(float),
                         "x": x, "g": g.astype(str)})
    m = lmevi.fit("y ~ x + (1 | g)", data, family="binomial", link="probit", progress=False, tol=1e-12)
    assert m.converged and m.options.link == "probit" and "Family: binomial ( probit )" in m.summary()
    assert m.run.grad_norm < 1e-6


# ----------------------------------------------------------------------------------------------------
# A q family defined here: this module is its protocol module. It is the mean-field layout of the
# block-Gaussian family under another name, each function counted as it is reached, so that the test can
# show every stage going through the protocol (and that the fit equals q="meanfield").

CALLS: collections.Counter = collections.Counter()


def _counted(name):
    def call(*args, **kwargs):
        CALLS[name] += 1
        return getattr(variational, name)(*args, **kwargs)

    call.__name__ = name
    return call


for _name in ("block_data", "init_params", "row_moments", "row_mean", "row_var_sum", "term_moments",
              "fixed_moments", "expected_log_prior", "entropy", "sample", "to_unconstrained", "to_constrained",
              "coordinate_mask", "unpad", "blocks_to_data_units", "from_moments"):
    globals()[_name] = _counted(_name)


def test_a_q_family_defined_here_is_fitted_end_to_end():
    """Registered with one call; the optax path fits it (coordinate ascent's closed form belongs to the
    block-Gaussian module itself). Results, the map back to data units and the export each reach this module;
    the fit reaches the optimum of q="meanfield" on the same path: the same ELBO to 1e-9 relative, estimates to
    1e-4 (meanfield's start is q's closed-form optimum given the start, which coordinate ascent's module
    provides and this one does not, so L-BFGS takes another route to the same point)."""
    from lmevi.q.layout import meanfield_layout

    q_registry.register("counted", __name__, meanfield_layout)
    try:
        rng = np.random.default_rng(0)
        g = np.repeat(np.arange(12), 10)
        data = pd.DataFrame({"x": rng.normal(size=120), "g": g.astype(str)})
        data["y"] = 1.0 + 0.5 * data.x + rng.normal(0, 0.8, 12)[g] + rng.normal(0, 0.5, 120)
        CALLS.clear()
        m = lmevi.fit("y ~ x + (1 | g)", data, q="counted", method="optax", progress=False)
        ref = lmevi.fit("y ~ x + (1 | g)", data, q="meanfield", method="optax", progress=False)
        assert m.options.q == "counted" and m.q.module == __name__
        assert CALLS["blocks_to_data_units"] >= 1  # scaling
        m.ranef()
        m.predict(data)
        assert CALLS["term_moments"] >= 2  # results: ranef and predict
        m.to_inference_data(num_samples=5)
        assert CALLS["sample"] >= 1  # export
        assert m.elbo == pytest.approx(ref.elbo, rel=1e-9)
        np.testing.assert_allclose(m.fixef(), ref.fixef(), rtol=1e-4)
        np.testing.assert_allclose(m.sd(), ref.sd(), rtol=1e-4)
        with pytest.raises(ValueError, match="method='optax'"):
            lmevi.fit("y ~ x + (1 | g)", data, q="counted", progress=False)
    finally:
        q_registry.Q_FAMILIES.pop("counted")
