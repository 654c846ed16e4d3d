"""No silent wrong answers: every bad-input and edge case a new user meets gets a clear error naming the
problem, a warning, or the right answer (within a stated tolerance).

Most fits share one simulated shape (20 groups of 10 rows, ``y = 1 + 2x + b0[g] + b1[g] x + noise``) so that
they reuse one compiled program; the cases that only concern the design are checked without fitting.
"""

from __future__ import annotations

import warnings

import numpy as np
import optax
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmevi
from lmevi.cli import main as cli_main
from lmevi.frame.design import build_design
from lmevi.frame.formula import parse_formula

FORMULA = "y ~ x + (1 + x | g)"
# A converged coordinate-ascent fit stops at a relative ELBO change of 1e-10, and an exact fit at a trust region
# of 1e-11 in theta, which leaves the estimates within about 1e-6 relative of the optimum: the tolerance of
# comparisons between two fits. Fitted values are compared in residual SDs besides (a fitted value near zero
# has no relative precision).
FIT_RTOL = 1e-6


def simulate(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(20), 10)
    x = rng.normal(size=200)
    b0, b1 = rng.normal(0.0, 1.0, 20), rng.normal(0.0, 0.8, 20)
    y = 1.0 + 2.0 * x + b0[g] + b1[g] * x + rng.normal(0.0, 0.5, 200)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{j}" for j in g]})


def fit_quietly(formula, data, **options):
    """``(result, [(category name, message)])`` with every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lmevi.fit(formula, data, progress=False, **options)
    return result, [(w.category.__name__, str(w.message)) for w in caught]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return simulate()


@pytest.fixture(scope="module")
def reference(frame):
    result, caught = fit_quietly(FORMULA, frame)
    assert caught == []
    return result


# ----------------------------------------------------------------------------------------------------
# 1. Scale-free: the units of y and of every covariate change nothing but the units of the answer


def _in_x_units(result, kx: float) -> dict[str, float]:
    sd = result.sd()
    return {"intercept": sd["g:(Intercept)"], "slope": sd[sd.index[1]] * kx, "sigma": sd["Residual"]}


@pytest.mark.parametrize("kx", [1e-6, 1e-4, 1e6])
def test_units_of_a_random_slope_covariate_do_not_change_the_fit(frame, reference, kx):
    """Before: x * 1e-6 left the slope variance at its start (residual SD 0.97 instead of 0.51, no warning);
    x * 1e-4 gave a false correlation +1; x * 1e6 false singular and convergence warnings."""
    result, caught = fit_quietly("y ~ xs + (1 + xs | g)", frame.assign(xs=frame.x * kx))
    assert caught == []
    got, want = _in_x_units(result, kx), _in_x_units(reference, 1.0)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=FIT_RTOL), key
    np.testing.assert_allclose(result.fixef().to_numpy() * [1.0, kx], reference.fixef().to_numpy(), rtol=FIT_RTOL)
    np.testing.assert_allclose(result.fitted, reference.fitted, rtol=FIT_RTOL,
                               atol=FIT_RTOL * reference.sd()["Residual"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ky=st.integers(-8, 8), kx=st.integers(-8, 8))
def test_property_rescaling_y_and_x_by_powers_of_ten(frame, reference, ky, kx):
    """Estimates in the data's units scale exactly with the units, and the warnings are the same (none)."""
    sy, sx = 10.0**ky, 10.0**kx
    result, caught = fit_quietly("y ~ x + (1 + x | g)", frame.assign(y=frame.y * sy, x=frame.x * sx))
    assert caught == []
    sd, ref = result.sd(), reference.sd()
    np.testing.assert_allclose(sd["g:(Intercept)"] / sy, ref["g:(Intercept)"], rtol=FIT_RTOL)
    np.testing.assert_allclose(sd["g:x"] * sx / sy, ref["g:x"], rtol=FIT_RTOL)
    np.testing.assert_allclose(sd["Residual"] / sy, ref["Residual"], rtol=FIT_RTOL)
    np.testing.assert_allclose(result.fixef().to_numpy() * [1.0, sx] / sy, reference.fixef().to_numpy(), rtol=FIT_RTOL)
    # the gradient-norm check is unit-free too
    assert result.run.grad_norm < 1e-3


def test_units_of_y_do_not_trigger_a_convergence_warning(frame, reference):
    """Before: y * 1e-7 gave the right numbers with a ConvergenceWarning (gradient norm 110)."""
    result, caught = fit_quietly(FORMULA, frame.assign(y=frame.y * 1e-7))
    assert caught == []
    assert result.sd()["Residual"] == pytest.approx(reference.sd()["Residual"] * 1e-7, rel=FIT_RTOL)


def test_elbo_maps_back_to_the_data_units(frame, reference):
    """The ELBO of a standardised fit, mapped back, is the ELBO of the data (REML: it moves with X's units by
    the Jacobian of beta, as lme4's REML criterion does; ML: only with y's)."""
    ml, _ = fit_quietly(FORMULA, frame, reml=False)
    ml_scaled, _ = fit_quietly(FORMULA, frame.assign(x=frame.x * 1e3, y=frame.y * 10.0), reml=False)
    assert ml_scaled.elbo == pytest.approx(ml.elbo - 200 * np.log(10.0), rel=1e-9)
    reml_scaled, _ = fit_quietly(FORMULA, frame.assign(x=frame.x * 1e3))
    assert reml_scaled.elbo == pytest.approx(reference.elbo - np.log(1e3), rel=1e-9)


def test_near_constant_response_fits(frame):
    """Before: y = 3 + N(0, 1e-9) ended in 'the fit diverged; try dtype="float64", method="cavi"' although
    both were in use."""
    rng = np.random.default_rng(1)
    result, caught = fit_quietly(FORMULA, frame.assign(y=3.0 + frame.y * 1e-9 + rng.normal(0, 1e-12, 200)))
    assert [c for c, _ in caught] == []
    assert result.fixef()["(Intercept)"] == pytest.approx(3.0, rel=1e-6)


def test_exactly_constant_response_is_refused(frame):
    with pytest.raises(ValueError, match="constant"):
        lmevi.fit(FORMULA, frame.assign(y=3.0))


# ----------------------------------------------------------------------------------------------------
# 2. Strict options: no truthiness


@pytest.mark.parametrize(
    "options, error, names",
    [
        (dict(reml="no"), TypeError, "reml"),
        (dict(reml="False"), TypeError, "reml"),
        (dict(reml=1), TypeError, "reml"),
        (dict(reml=0), TypeError, "reml"),
        (dict(seed="abc"), TypeError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(optimizer="adam"), TypeError, "optimizer"),
        (dict(init_scale=0), ValueError, "init_scale"),
        (dict(init_scale=-1), ValueError, "init_scale"),
        (dict(init_scale="big"), TypeError, "init_scale"),
        (dict(small_threshold=-5), ValueError, "small_threshold"),
        (dict(small_threshold=2.5), TypeError, "small_threshold"),
        (dict(accelerate="no"), TypeError, "accelerate"),
        (dict(progress="yes"), TypeError, "progress"),
        (dict(num_samples=True), TypeError, "num_samples"),
        (dict(residual_scale=True), TypeError, "residual_scale"),
        (dict(residual_scale="1"), TypeError, "residual_scale"),
        (dict(tol="1e-8"), TypeError, "tol"),
        (dict(num_steps=1e3), TypeError, "num_steps"),
        (dict(snapshot_steps=5), TypeError, "snapshot_steps"),
        (dict(snapshot_steps=[0]), ValueError, "snapshot_steps"),
        (dict(blocks="g"), TypeError, "blocks"),
        (dict(family=None), ValueError, "family"),
        (dict(dtype=np.float64), ValueError, "dtype"),
    ],
)
def test_every_option_is_checked_by_type_and_range(frame, options, error, names):
    with pytest.raises(error, match=names):
        lmevi.fit(FORMULA, frame, **{"progress": False, **options})


def test_numpy_scalars_are_accepted_as_options(frame, reference):
    result, _ = fit_quietly(FORMULA, frame, reml=np.bool_(True), seed=np.int64(0), tol=np.float64(1e-10))
    np.testing.assert_allclose(result.sd(), reference.sd(), rtol=1e-12)


def test_options_of_the_accessors_are_checked(reference, frame):
    with pytest.raises(TypeError, match="given_beta"):
        reference.ranef(given_beta="yes")
    with pytest.raises(TypeError, match="allow_new_levels"):
        reference.predict(frame, allow_new_levels="no")
    with pytest.raises(ValueError, match="re_form"):
        reference.predict(frame, re_form="bogus")
    with pytest.raises(ValueError, match="missing"):
        reference.predict(frame, missing="ignore")
    with pytest.raises(ValueError, match="num_samples"):
        reference.to_inference_data(num_samples=0)
    with pytest.raises(TypeError, match="add_dropped"):
        reference.fixef(add_dropped="no")


# ----------------------------------------------------------------------------------------------------
# 3. Safe predict


@pytest.fixture(scope="module")
def factor_fit(frame):
    data = frame.assign(f=np.resize(["A", "B"], len(frame)))
    result, _ = fit_quietly("y ~ x + f + (1 + x | g)", data)
    return result, data


def test_unseen_fixed_effect_level_is_refused(factor_fit):
    """Before: f = "C" was predicted as the reference level "A", silently (lme4 refuses)."""
    result, data = factor_fit
    new = data.head(3).assign(f=["A", "C", "B"])
    with pytest.raises(ValueError, match="fixed-effect factor.*C"):
        result.predict(new)


def test_missing_covariate_names_the_column(factor_fit):
    result, data = factor_fit
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['x'\]"):
        result.predict(data.drop(columns="x"))
    # the grouping column is not needed at the population level
    pred = result.predict(data.drop(columns="g"), re_form=None)
    assert np.all(np.isfinite(pred))


def test_na_in_new_data_raises_or_predicts_nan_with_a_warning(factor_fit):
    result, data = factor_fit
    new = data.head(4).copy()
    new.loc[new.index[1], "x"] = np.nan
    with pytest.raises(ValueError, match="missing='drop'"):
        result.predict(new)
    with pytest.warns(UserWarning, match="NaN for 1 of 4 rows"):
        pred = result.predict(new, missing="drop")
    want = result.predict(new.drop(index=new.index[1]))
    assert np.isnan(pred[1])
    np.testing.assert_allclose(pred[[0, 2, 3]], want, rtol=0, atol=1e-12)


def test_string_where_a_number_was_fitted_names_the_column(factor_fit):
    result, data = factor_fit
    with pytest.raises(ValueError, match="column 'x' was numeric"):
        result.predict(data.head(3).assign(x=["1", "2", "3"]))


def test_population_level_spellings_agree(factor_fit):
    result, data = factor_fit
    np.testing.assert_array_equal(result.predict(data, re_form=None), result.predict(data, re_form="~0"))


# ----------------------------------------------------------------------------------------------------
# 4-5. Safe labels


def test_interaction_levels_are_tuples_not_joined_strings():
    """Before: a = "1:2", b = "3" and a = "1", b = "2:3" both became level "1:2:3": 12 cells became 11."""
    rng = np.random.default_rng(2)
    a = ["1:2", "1", "x", "y"] * 15
    b = ["3", "2:3", "p", "q", "r"] * 12
    df = pd.DataFrame({"a": a, "b": b, "y": rng.normal(size=60)})
    n_cells = len(set(zip(a, b)))
    with pytest.warns(UserWarning, match="print alike"):
        design, info = build_design(parse_formula("y ~ 1 + (1 | a:b)"), df)
    assert design.terms[0].n_levels == n_cells
    # new rows find their own cell, not the one that prints alike
    codes = info.terms[0].level_keys.codes(pd.DataFrame({"a": ["1", "1:2"], "b": ["2:3", "3"]}), ("a", "b"))
    assert codes[0] != codes[1] and min(codes) >= 0


def test_float_labels_do_not_depend_on_the_rest_of_the_column(frame, reference):
    """Before: a float column of whole numbers was labelled "3", one with a 19.5 in it "3.0", and predict
    then treated the fitted level 3.0 as new."""
    codes = np.repeat(np.arange(20), 10).astype(float)
    whole = frame.assign(g=codes)
    with_half = frame.assign(g=np.where(codes == 19, 19.5, codes))
    a, _ = fit_quietly(FORMULA, whole)
    b, _ = fit_quietly(FORMULA, with_half)
    assert list(a.ranef().grp[:3]) == ["0", "1", "2"] == list(b.ranef().grp[:3])
    assert b.ranef().grp.iloc[19] == "19.5"
    new = pd.DataFrame({"x": [0.5, 0.5], "g": [3.0, 3]})
    pred = b.predict(new, allow_new_levels=False)  # 3.0 and 3 are the fitted level "3"
    assert pred[0] == pred[1]


def test_float_ids_above_2_to_the_63_are_levels(frame):
    """Before: a raw pandas error (conversion to int64 overflowed)."""
    huge = (np.repeat(np.arange(20), 10) + 1.0) * 2.0**64
    result, caught = fit_quietly(FORMULA, frame.assign(g=huge))
    assert caught == []
    assert result.ranef().grp.nunique() == 20


def test_same_labels_in_fit_and_predict_for_integer_and_float_columns(frame):
    result, _ = fit_quietly(FORMULA, frame.assign(g=np.repeat(np.arange(20), 10)))
    new = pd.DataFrame({"x": [0.1, 0.1], "g": [7, 7.0]})
    pred = result.predict(new, allow_new_levels=False)
    assert pred[0] == pred[1]


# ----------------------------------------------------------------------------------------------------
# 6. Identifiability of the random terms


def test_collinear_covariates_within_a_term_are_refused(frame):
    """Before: (1 + x + x2 | g) with x2 = 2x fitted, reporting SDs and a correlation that are not identified."""
    with pytest.raises(ValueError, match=r"linearly dependent: \['x2'\]"):
        lmevi.fit("y ~ x + (1 + x + x2 | g)", frame.assign(x2=2.0 * frame.x))


def test_two_terms_repeating_a_column_on_one_factor_are_refused(frame):
    """Before: (1|g) + (x|g) split one intercept variance in two."""
    with pytest.raises(ValueError, match=r"repeat a column: \(Intercept\) of \(x \| g\)"):
        lmevi.fit("y ~ x + (1 | g) + (x | g)", frame)


def test_uncorrelated_terms_on_one_factor_are_fine(frame):
    result, _ = fit_quietly("y ~ x + (1 + x || g)", frame)
    assert list(result.varcorr().grp[:2]) == ["g", "g.1"]


# ----------------------------------------------------------------------------------------------------
# 7. Smaller items


def test_duplicate_column_names_are_named(frame):
    with pytest.raises(ValueError, match=r"more than one column named \['x'\]"):
        lmevi.fit(FORMULA, pd.concat([frame, frame[["x"]]], axis=1))


def test_formulaic_syntax_errors_are_formula_errors_without_colour(frame):
    with pytest.raises(lmevi.FormulaError, match="Missing operator") as err:
        lmevi.fit("y ~ x + (1 g) + (1 | g)", frame)
    assert "\x1b[" not in str(err.value)


def test_cli_reports_a_syntax_error_in_one_line_with_status_2(frame, tmp_path, capsys):
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    assert cli_main(["fit", str(path), "y ~ x + (1 g) + (1 | g)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmevi: error:") and err.count("\n") == 1 and "\x1b[" not in err


def test_backticked_group_names_are_columns(frame, reference):
    result, _ = fit_quietly("y ~ x + (1 + x | `my g`)", frame.rename(columns={"g": "my g"}))
    np.testing.assert_allclose(result.sd().to_numpy(), reference.sd().to_numpy(), rtol=1e-12)
    assert result.ranef().grpvar.iloc[0] == "my g"


def test_unused_categorical_levels_are_dropped_as_lme4_does(frame, reference):
    """Before: ranef() listed unused categories with condval 0."""
    cats = sorted(frame.g.unique()) + ["never"]
    result, _ = fit_quietly(FORMULA, frame.assign(g=pd.Categorical(frame.g, categories=cats)))
    assert "never" not in set(result.ranef().grp)
    np.testing.assert_allclose(result.sd().to_numpy(), reference.sd().to_numpy(), rtol=1e-12)


def test_a_formula_without_random_terms_is_refused(frame):
    """Before: fitted OLS silently; lme4 and MixedModels refuse."""
    with pytest.raises(lmevi.FormulaError, match="no random-effects term"):
        lmevi.fit("y ~ x", frame)


# ----------------------------------------------------------------------------------------------------
# The cases that already behaved, kept so that none comes back


@pytest.mark.parametrize(
    "change, formula, match",
    [
        (lambda d: d.drop(columns="x"), FORMULA, r"column\(s\) \['x'\]"),
        (lambda d: d.assign(x=d.x.where(d.index != 3)), FORMULA, "missing or infinite.*'x': 1"),
        (lambda d: d.assign(x=d.x.where(d.index != 3, np.inf)), FORMULA, "missing or infinite"),
        (lambda d: d.iloc[:0], FORMULA, "empty"),
        (lambda d: d.assign(g="one"), FORMULA, "1 level"),
        (lambda d: d.assign(g=np.arange(len(d))), "y ~ x + (1 | g)", "as many levels"),
        (lambda d: d.assign(g=np.arange(len(d)) // 2), FORMULA, "random effects for 200 rows"),
        (lambda d: d.assign(y=d.y.astype(str)), FORMULA, "must be numeric"),
        (lambda d: d.assign(y=d.y > 1), FORMULA, "boolean"),
        (lambda d: d.to_dict(), FORMULA, "DataFrame"),
    ],
)
def test_bad_data_is_named(frame, change, formula, match):
    with pytest.raises(ValueError, match=match):
        lmevi.fit(formula, change(frame))


def test_zero_complete_rows_with_missing_drop(frame):
    with pytest.raises(ValueError, match="every row"):
        lmevi.fit(FORMULA, frame.assign(x=np.nan), missing="drop")


def test_rank_deficient_fixed_effects_are_dropped_with_a_warning(frame, reference):
    result, caught = fit_quietly("y ~ x + x2 + (1 + x | g)", frame.assign(x2=3.0 * frame.x))
    assert any("rank deficient" in m and "x2" in m for _, m in caught)
    assert list(result.fixef().index) == ["(Intercept)", "x"]


@pytest.mark.parametrize(
    "formula",
    ["y ~ x + (1 | g", "y x + (1 | g)", "~ x + (1 | g)", "y ~ x + (1 || )", "y ~ x + (| g)", "y ~ x + (1|g)/h"],
)
def test_malformed_formulas_are_formula_errors(frame, formula):
    with pytest.raises(lmevi.FormulaError):
        lmevi.fit(formula, frame)


def test_a_singular_fit_warns(frame):
    # noise orthogonal to (1, x) within every group: the groups' intercepts and slopes vary not at all
    rng = np.random.default_rng(4)
    e = rng.normal(0, 0.5, 200)
    for j in range(20):
        rows = slice(10 * j, 10 * j + 10)
        Z = np.column_stack([np.ones(10), frame.x.to_numpy()[rows]])
        e[rows] -= Z @ np.linalg.lstsq(Z, e[rows], rcond=None)[0]
    _, caught = fit_quietly(FORMULA, frame.assign(y=1.0 + 2.0 * frame.x + e))
    assert any(c == "SingularFitWarning" for c, _ in caught)


def test_step_budget_warns(frame):
    _, caught = fit_quietly(FORMULA, frame, num_steps=2, accelerate=False)
    assert any(c == "ConvergenceWarning" and "step budget" in m for c, m in caught)


@pytest.mark.parametrize(
    "column",
    [
        lambda n: np.repeat(np.arange(20), n // 20),
        lambda n: np.repeat(np.arange(20), n // 20).astype(float),
        lambda n: pd.Categorical(np.repeat([f"c{j}" for j in range(20)], n // 20)),
        lambda n: np.repeat([f"c{j}" for j in range(20)], n // 20).astype(object),
    ],
    ids=["int", "float", "categorical", "object"],
)
def test_grouping_dtypes_give_the_same_fit(frame, reference, column):
    """Same data, levels coded in another order (text sorts "c10" before "c2"): the sums run in another order,
    and the exact fit's optimiser (BOBYQA, stopping at a trust region of 1e-11 in theta) lands where the
    criterion is flat to its rounding: log-likelihoods within 1e-10, SDs within about 1e-7 (measured 1.2e-7):
    1e-6 relative."""
    result, _ = fit_quietly(FORMULA, frame.assign(g=column(len(frame))))
    assert result.options.q == "exact"
    assert result.loglik == pytest.approx(reference.loglik, abs=1e-10)
    np.testing.assert_allclose(result.sd().to_numpy(), reference.sd().to_numpy(), rtol=1e-6)


def test_slope_grouped_by_itself_fits_as_a_level_dependent_variance(frame):
    """``(x | x)``: x is constant within a level, so level j's effect b0_j + b1_j x_j is a random intercept
    whose variance depends on x_j; that is identified, and lme4 fits it. The random-intercept model
    ``(1 | x)`` is nested in it, so its likelihood (exact here: one grouping factor) cannot be higher."""
    data = frame.assign(xr=np.repeat(np.arange(20.0), 10))
    both, _ = fit_quietly("y ~ (xr | xr)", data)
    intercept, _ = fit_quietly("y ~ (1 | xr)", data)
    assert both.exact and intercept.exact
    assert both.loglik >= intercept.loglik - 1e-6  # 1e-6: the stop rule's slack on a likelihood of ~-400


def test_nesting_is_the_interaction_plus_the_outer_factor(frame):
    data = frame.assign(a=np.repeat(np.arange(4), 50), b=np.tile(np.repeat(np.arange(5), 10), 4))
    nested, _ = fit_quietly("y ~ x + (1 | a/b)", data)
    spelled, _ = fit_quietly("y ~ x + (1 | a) + (1 | b:a)", data)
    np.testing.assert_allclose(nested.sd().to_numpy(), spelled.sd().to_numpy(), rtol=1e-12)


def test_a_huge_number_of_levels_fits():
    rng = np.random.default_rng(5)
    n_levels = 20_000
    g = np.repeat(np.arange(n_levels), 3)
    df = pd.DataFrame({"g": g, "y": rng.normal(0, 1, n_levels)[g] + rng.normal(0, 1, g.size)})
    result, caught = fit_quietly("y ~ 1 + (1 | g)", df)
    assert [c for c, _ in caught if c == "ConvergenceWarning"] == []
    assert result.sd()["g"] == pytest.approx(1.0, abs=0.05)  # 20,000 levels: SE of the SD about 0.01
    assert len(result.ranef()) == n_levels


def test_the_input_frame_is_not_changed(frame):
    before = frame.copy(deep=True)
    fit_quietly(FORMULA, frame)
    pd.testing.assert_frame_equal(frame, before)


def test_same_seed_same_numbers(frame):
    a, _ = fit_quietly(FORMULA, frame, elbo="mc", num_steps=20, seed=3)
    b, _ = fit_quietly(FORMULA, frame, elbo="mc", num_steps=20, seed=3)
    np.testing.assert_array_equal(a.run.elbo_trace, b.run.elbo_trace)


def test_float32_agrees_with_float64(frame, reference):
    result, _ = fit_quietly(FORMULA, frame, dtype="float32", tol=1e-6)
    # single precision: about 7 significant digits, and the stop rule at 1e-6 relative ELBO change
    np.testing.assert_allclose(result.sd().to_numpy(), reference.sd().to_numpy(), rtol=1e-3)


def test_cli_bad_option_and_bad_file_exit_2(tmp_path, capsys):
    assert cli_main(["fit", str(tmp_path / "none.csv"), FORMULA]) == 2
    assert "cannot read data file" in capsys.readouterr().err
    assert cli_main(["fit", str(tmp_path / "none.csv"), FORMULA, "--tol", "-1"]) == 2


def test_optax_optimizer_object_is_accepted(frame, reference):
    result, _ = fit_quietly(FORMULA, frame, optimizer=optax.lbfgs(), num_steps=500)
    np.testing.assert_allclose(result.sd().to_numpy(), reference.sd().to_numpy(), rtol=1e-4)


def test_float32_default_tolerance_is_one_float32_can_see(frame):
    """A float32 fit's default stop tolerance is FLOAT32_TOL (a relative ELBO change of 1e-10 is below what
    float32 resolves, and such a fit may run to its step budget); an explicit tol is kept; float64 keeps 1e-10."""
    assert lmevi.fit_settings(dtype="float32").rule.tol == lmevi.fitting.control.FLOAT32_TOL == 1e-6
    assert lmevi.fit_settings(dtype="float32", tol=1e-9).rule.tol == 1e-9
    assert lmevi.fit_settings().rule.tol == 1e-10
    result, _ = fit_quietly(FORMULA, frame, dtype="float32")
    assert result.converged and result.options.stop_rule.tol == 1e-6
