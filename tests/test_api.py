"""``lmevi.fit`` and its result: input checks, options, prediction and the lme4-shaped tables."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import optax
import pandas as pd
import pytest

import lmevi

FORMULA = "y ~ x + (1 | g) + (1 | h)"


def simulate(seed: int = 5, n: int = 120) -> pd.DataFrame:
    """Integer-coded ``g`` (12 levels: ``"10"`` sorts before ``"2"`` as text) crossed with ``h`` (5 levels)."""
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.resize(np.arange(12), n))
    h = rng.permutation(np.resize(np.arange(5), n))
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(0.0, 1.0, 12)[g] + rng.normal(0.0, 0.5, 5)[h] + rng.normal(0.0, 0.7, n)
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": h})


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return simulate()


@pytest.fixture(scope="module")
def fits(frame):
    """The same data with grouping columns as ints, strings and categoricals (no warning allowed)."""
    variants = {
        "int": frame,
        "str": frame.assign(g=frame["g"].astype(str), h=frame["h"].astype(str)),
        "categorical": frame.assign(g=pd.Categorical(frame["g"]), h=pd.Categorical(frame["h"])),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # lmevi's warnings (convergence, singular fit, ...)
        return {k: lmevi.fit(FORMULA, v, tol=1e-14, progress=False) for k, v in variants.items()}


@pytest.fixture(scope="module")
def result(fits):
    return fits["int"]


# ----------------------------------------------------------------------------------------------------
# Bad input


def bad_frames(frame: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, str]]:
    """Variants of a good frame, each with one problem, and what the error message must name."""
    nan_at, inf_at = frame.index[3], frame.index[7]
    return {
        "nan response": (frame.assign(y=frame["y"].where(frame.index != nan_at)), "'y'"),
        "inf response": (frame.assign(y=frame["y"].where(frame.index != inf_at, np.inf)), "'y'"),
        "nan predictor": (frame.assign(x=frame["x"].where(frame.index != nan_at)), "'x'"),
        "inf predictor": (frame.assign(x=frame["x"].where(frame.index != inf_at, -np.inf)), "'x'"),
        "nan group": (frame.assign(g=frame["g"].astype(str).where(frame.index != nan_at)), "'g'"),
        "inf group": (frame.assign(g=frame["g"].astype(float).where(frame.index != inf_at, np.inf)), "'g'"),
        "text response": (frame.assign(y=frame["y"].astype(str)), "response 'y' must be numeric"),
        "categorical response": (frame.assign(y=pd.Categorical(frame["y"])), "response 'y' must be numeric"),
        "one level": (frame.assign(g=7), "'g'.*at least two"),
        "one used category": (frame.assign(g=pd.Categorical(["a"] * len(frame), ["a", "b"])), "'g'.*at least two"),
        "empty": (frame.iloc[:0], "empty"),
    }


BAD_DATA = bad_frames(simulate())


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_raises_value_error_naming_the_problem(case):
    data, names = BAD_DATA[case]
    with pytest.raises(ValueError, match=names):
        lmevi.fit(FORMULA, data, progress=False)


@pytest.mark.parametrize(
    "formula, names",
    [
        ("y ~ z + (1 | g)", "'z'"),
        ("y ~ x + (1 | q)", "'q'"),
        ("y ~ x + (1 | g) + (1 | g)", "more than once"),
        ("y ~ x + (1 | g", "unbalanced"),
    ],
)
def test_bad_formula_raises_value_error_naming_the_problem(frame, formula, names):
    with pytest.raises(ValueError, match=names):
        lmevi.fit(formula, frame, progress=False)


def test_data_must_be_a_data_frame(frame):
    with pytest.raises(ValueError, match="DataFrame"):
        lmevi.fit(FORMULA, frame.to_dict(), progress=False)


@pytest.mark.parametrize(
    "options, names",
    [
        (dict(family="exact"), "family"),
        (dict(family="gamma"), "family"),
        (dict(q="exactly"), "q"),
        (dict(method="adam"), "method"),
        (dict(elbo="sampled"), "elbo"),
        (dict(method="cavi", elbo="mc"), "closed-form"),
        (dict(method="cavi", optimizer=optax.adam(0.1)), "optimizer"),
        (dict(q="meanfield", blocks=[("g", "h")]), "blocks"),
        (dict(blocks=[("g", "nope")]), "nope"),
        (dict(residual_scale=-1.0), "residual_scale"),
        (dict(residual_scale=float("nan")), "residual_scale"),
        (dict(num_samples=0), "num_samples"),
        (dict(dtype="float16"), "dtype"),
        (dict(num_steps=-5), "num_steps"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(window=0), "window"),
        (dict(tol=-1.0), "tol"),
        (dict(tol=float("nan")), "tol"),
        (dict(missing="ignore"), "missing"),
        (dict(elbo="mc", optimizer=optax.lbfgs()), "deterministic"),
    ],
)
def test_bad_options_raise_an_error_naming_the_option(frame, options, names):
    # a value of the wrong type (2.5 steps) is a TypeError, one out of range a ValueError
    with pytest.raises((TypeError, ValueError), match=names):
        lmevi.fit(FORMULA, frame, progress=False, **options)


# ----------------------------------------------------------------------------------------------------
# Options that change how the fit runs


def test_fit_stopped_by_its_budget_warns(frame):
    with pytest.warns(lmevi.ConvergenceWarning, match="num_steps"):
        m = lmevi.fit(FORMULA, frame, num_steps=2, accelerate=False, progress=False)
    assert (m.steps, m.converged) == (2, False)


def test_converged_fit_does_not_warn(result):
    assert result.converged and result.steps < 3000  # the fixture turns every warning into an error


def test_final_gradient_norm_is_near_zero_at_the_optimum_only(frame, result):
    """The convergence check's gradient norm (closed-form -ELBO per observation, unconstrained coordinates):
    at the coordinate-ascent optimum it is at rounding level (measured ~1e-9 here; 1e-6 leaves room), after one
    plain sweep from the start it is far above lmevi's 1e-3 threshold (measured ~0.05)."""
    from lmevi.result.checks import GRAD_TOL

    assert result.run.grad_norm < 1e-6
    with pytest.warns(lmevi.ConvergenceWarning, match="gradient norm"):
        early = lmevi.fit(FORMULA, frame, num_steps=1, accelerate=False, progress=False)
    assert early.run.grad_norm > 10 * GRAD_TOL
    assert f"final gradient norm {result.run.grad_norm:.3g}" in result.summary()


def test_settled_fit_with_a_large_gradient_warns(frame):
    """A loose stop rule that fires on a plateau is caught by the gradient check, not only by the budget."""
    with pytest.warns(lmevi.ConvergenceWarning, match="plateau"):
        m = lmevi.fit(FORMULA, frame, tol=0.5, accelerate=False, progress=False)
    assert m.converged and m.run.grad_norm > 1e-3


def test_optax_and_cavi_report_the_same_kind_of_gradient_norm(frame, result):
    """Both paths end at the same optimum, so both gradient norms are small (L-BFGS stops on its ELBO change
    rule, so its norm is larger than coordinate ascent's; below the 1e-3 threshold either way)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lmevi.ConvergenceWarning)
        m = lmevi.fit(FORMULA, frame, method="optax", progress=False)
    assert np.isfinite(m.run.grad_norm) and m.run.grad_norm < 1e-3


def test_monte_carlo_fit_is_reproducible_by_seed(frame):
    def run(seed):
        with pytest.warns(lmevi.ConvergenceWarning):  # 30 steps never meet the windowed rule
            return lmevi.fit(FORMULA, frame, elbo="mc", num_steps=30, seed=seed, progress=False)

    a, b, c = run(1), run(1), run(2)
    leaves_a, leaves_b, leaves_c = (jax.tree_util.tree_leaves(m.params) for m in (a, b, c))
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # same seed: bit for bit
    np.testing.assert_array_equal(a.run.elbo_trace, b.run.elbo_trace)
    assert not np.array_equal(a.run.elbo_trace, c.run.elbo_trace)  # the seed is used


def test_numpy_integer_num_samples_is_accepted(frame):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmevi.ConvergenceWarning)  # 30 steps, as above
        m = lmevi.fit(FORMULA, frame, elbo="mc", num_steps=30, num_samples=np.int64(1), seed=1, progress=False)
    assert m.options.num_samples == 1


# ----------------------------------------------------------------------------------------------------
# Tables


def test_fixef_is_indexed_by_lme4_names(result):
    fe = result.fixef()
    assert list(fe.index) == ["(Intercept)", "x"]
    assert np.all(np.isfinite(fe))


def test_ranef_layout_and_labels(result):
    re = result.ranef()
    assert list(re.columns) == ["grpvar", "term", "grp", "condval", "condsd"]
    assert all(isinstance(v, str) for v in re["grp"])
    assert set(re.loc[re["grpvar"] == "g", "grp"]) == {str(v) for v in range(12)}
    assert set(re.loc[re["grpvar"] == "h", "grp"]) == {str(v) for v in range(5)}
    assert (re["term"] == "(Intercept)").all()
    assert (re["condsd"] > 0).all()


def test_varcorr_layout_with_a_correlated_slope(crossed_fit):
    vc = crossed_fit.varcorr()
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    assert vc["grp"].tolist() == ["g", "g", "g", "h", "Residual"]
    assert vc["var1"].iloc[:4].tolist() == ["(Intercept)", "x", "(Intercept)", "(Intercept)"]
    assert vc["var2"].iloc[2] == "x" and vc["var2"].drop(2).isna().all()
    assert vc["var1"].iloc[-1] is None or pd.isna(vc["var1"].iloc[-1])
    sd = vc["sdcor"].to_numpy()
    # variance rows: sdcor = sqrt(vcov); correlation row: vcov / (sd1 sd2) (rounding only)
    np.testing.assert_allclose(sd[[0, 1, 3, 4]] ** 2, vc["vcov"].to_numpy()[[0, 1, 3, 4]], rtol=1e-12)
    assert sd[2] == pytest.approx(vc["vcov"].iloc[2] / (sd[0] * sd[1]), rel=1e-12)
    assert -1.0 < sd[2] < 1.0


def test_grouping_column_types_give_the_same_fit(fits):
    """ints, strings and categoricals code the levels in different orders; joined by label the fits agree."""
    ref = fits["int"]
    for name, m in fits.items():
        # same model, levels in another order: the sums are reordered and each run stops at a relative ELBO
        # change of 1e-14 (estimates within ~1e-7 of the optimum; measured differences 1e-12)
        np.testing.assert_allclose(m.varcorr()["sdcor"], ref.varcorr()["sdcor"], rtol=1e-7, err_msg=name)
        np.testing.assert_allclose(m.fixef(), ref.fixef(), rtol=1e-7, err_msg=name)
        joined = ref.ranef().merge(m.ranef(), on=["grpvar", "term", "grp"], suffixes=("_ref", ""))
        assert len(joined) == len(ref.ranef())
        np.testing.assert_allclose(joined["condval"], joined["condval_ref"], rtol=0, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------------------------------
# Prediction


def test_predict_on_the_training_rows_gives_the_fitted_values(result, frame):
    np.testing.assert_allclose(result.predict(frame), result.fitted, rtol=0, atol=1e-10)  # same sums
    np.testing.assert_allclose(result.residuals(), frame["y"] - result.fitted, rtol=0, atol=1e-12)


def test_population_prediction_is_x_beta(result, frame):
    fe = result.fixef()
    want = fe["(Intercept)"] + fe["x"] * frame["x"].to_numpy()
    np.testing.assert_allclose(result.predict(frame, re_form=None), want, rtol=0, atol=1e-12)


def test_unseen_level_gets_the_prior_mean(result):
    new = pd.DataFrame({"x": [0.3, 0.3], "g": [99, 4], "h": [2, 2]})
    fe, re = result.fixef(), result.ranef().set_index(["grpvar", "grp"])["condval"]
    base = fe["(Intercept)"] + 0.3 * fe["x"] + re["h", "2"]
    pred = result.predict(new, allow_new_levels=True)
    # sums of three or four O(1) numbers: 1e-12 absolute
    assert pred[0] == pytest.approx(base, abs=1e-12)  # level 99 of g: its effect is the prior mean, 0
    assert pred[1] == pytest.approx(base + re["g", "4"], abs=1e-12)


def test_unseen_level_raises_when_not_allowed(result):
    new = pd.DataFrame({"x": [0.3], "g": [99], "h": [2]})
    with pytest.raises(ValueError, match="'g'.*99"):
        result.predict(new, allow_new_levels=False)


def test_one_missing_group_label_does_not_unlabel_the_other_rows(result):
    """Merging new data often upcasts an integer column with a gap to float; the seen levels must still match."""
    new = pd.DataFrame({"x": [0.3, 0.3], "g": [4.0, np.nan], "h": [2, 2]})
    with pytest.warns(UserWarning, match="NaN for 1 of 2 rows"):
        pred = result.predict(new, allow_new_levels=True, missing="drop")
    want = result.predict(pd.DataFrame({"x": [0.3], "g": [4], "h": [2]}))
    assert pred[0] == pytest.approx(want[0], abs=1e-12)
    assert np.isnan(pred[1])
