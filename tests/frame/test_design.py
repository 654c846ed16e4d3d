"""Design arrays: shapes and dtypes, level coding and labels, and no dense Z anywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from lmevi.frame import labels as labels_lib
from lmevi.frame.design import build_design
from lmevi.frame.newdata import term_rows
from lmevi.frame.formula import parse_formula


def build(formula: str, frame: pd.DataFrame):
    return build_design(parse_formula(formula), frame)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 40
    return pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.normal(size=n),
            "f": np.resize(["lo", "mid", "hi"], n),
            "g": np.resize([10, 2, 33, 4], n),
            "a": np.resize(["A", "B"], n),
            "b": np.repeat(["p", "q", "r", "s"], n // 4),
        }
    )


def test_shapes_and_dtypes(crossed):
    design, info = crossed.design, crossed.info
    n = len(crossed.frame)
    assert design.y.shape == (n,) and design.y.dtype == jnp.float64
    assert design.X.shape == (n, 2) and design.X.dtype == jnp.float64
    assert info.fixed_names == ("(Intercept)", "x")
    (g, h), (ig, ih) = design.terms, info.terms
    assert g.index.shape == (n,) and g.index.dtype == jnp.int32
    assert g.covariates.shape == (n, 2) and g.covariates.dtype == jnp.float64
    assert h.covariates.shape == (n, 1)
    assert (g.n_levels, h.n_levels) == (6, 4)
    assert ig.coef_names == ("(Intercept)", "x") and ih.coef_names == ("(Intercept)",)
    assert sum(ig.counts) == n and min(ig.counts) > 0


def test_intercept_only_terms_are_the_row_weight_before_and_after_standardising(frame):
    """``(1 | g)`` is marked as the row weight (``unit``) when built, so standardising neither scans nor copies
    its ones: the padded weight is ones on the rows and zeros on the padding, as the padded ones of a term
    not so marked (``unit=False``, scanned and divided by its scale) would be."""
    import dataclasses

    from lmevi.fitting.scaling import standardise

    design, _ = build_design(parse_formula("y ~ x + (1 | g) + (1 + x | b)"), frame)
    assert [t.unit for t in design.terms] == [True, False]
    n, n_rows = len(frame), len(frame) + 7
    scaled, scales = standardise(design, n_rows=n_rows)
    unmarked = dataclasses.replace(design, terms=(dataclasses.replace(design.terms[0], unit=False), design.terms[1]))
    scaled_unmarked, scales_unmarked = standardise(unmarked, n_rows=n_rows)
    np.testing.assert_array_equal(scaled.terms[0].covariates, np.r_[np.ones(n), np.zeros(7)][:, None])
    np.testing.assert_array_equal(scaled.terms[0].covariates, scaled_unmarked.terms[0].covariates)
    assert scaled.terms[0].unit and scaled_unmarked.terms[0].unit and not scaled.terms[1].unit
    np.testing.assert_array_equal(scales.z_scale[0], scales_unmarked.z_scale[0])


def test_codes_point_at_each_rows_label(crossed):
    for term, info in zip(crossed.design.terms, crossed.info.terms):
        (col,) = info.group_columns
        labels = np.asarray(info.levels)[np.asarray(term.index)]
        assert list(labels) == list(crossed.frame[col].astype(str))


def test_covariates_are_the_per_level_design(crossed):
    g = crossed.design.terms[0]
    np.testing.assert_array_equal(g.covariates[:, 0], 1.0)
    np.testing.assert_array_equal(g.covariates[:, 1], crossed.frame["x"].to_numpy())


def test_no_array_grows_with_the_number_of_levels():
    """A dense Z would be (n_obs, J p): with J = n_obs / 4 levels every stored array must stay O(n_obs p)."""
    n = 400
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "g": np.resize(np.arange(n // 4), n)})
    design, info = build("y ~ x + (1 + x | g)", frame)
    assert info.terms[0].n_levels == n // 4
    for leaf in jax.tree_util.tree_leaves(design):
        assert leaf.shape[0] == n and leaf.size <= 2 * n


def test_design_is_a_pytree_that_jit_accepts(crossed):
    f = jax.jit(lambda d: d.X.sum() + sum(t.covariates.sum() + t.index.sum() for t in d.terms))
    want = float(crossed.design.X.sum()) + sum(
        float(t.covariates.sum()) + int(t.index.sum()) for t in crossed.design.terms
    )
    assert float(f(crossed.design)) == pytest.approx(want, rel=1e-12)  # sums of small integers and O(1) floats


def test_integer_levels_sort_numerically_with_string_labels(frame):
    _, info = build("y ~ (1 | g)", frame)
    assert info.terms[0].levels == ("2", "4", "10", "33")


def test_string_levels_sort_alphabetically(frame):
    _, info = build("y ~ (1 | f)", frame)
    assert info.terms[0].levels == ("hi", "lo", "mid")


def test_categorical_drops_unused_categories(frame):
    data = frame.assign(f=pd.Categorical(frame["f"], categories=["mid", "lo", "hi", "never"]))
    design, info = build("y ~ (1 | f)", data)
    assert info.terms[0].levels == ("mid", "lo", "hi")  # category order; unused level dropped, as lme4 does
    assert min(info.terms[0].counts) > 0
    assert design.terms[0].n_levels == 3
    assert set(np.unique(design.terms[0].index)) == {0, 1, 2}


def test_interaction_and_nesting_labels(frame):
    _, info = build("y ~ (1 | a:b)", frame)
    (interaction,) = info.terms
    assert interaction.group == "a:b"
    assert interaction.levels == ("A:p", "A:q", "A:r", "A:s", "B:p", "B:q", "B:r", "B:s")  # the pairs that occur
    _, info = build("y ~ (1 | b/a)", frame)  # expands to (1 | b) + (1 | a:b), labelled "<a>:<b>"
    outer, nested = info.terms
    assert (outer.group, nested.group) == ("b", "a:b")
    assert outer.levels == ("p", "q", "r", "s")
    assert nested.levels == interaction.levels


def test_fixed_effect_names_follow_lme4(frame):
    _, info = build("y ~ x + f + (1 | g)", frame)
    assert info.fixed_names == ("(Intercept)", "x", "flo", "fmid")  # treatment coding, first level dropped
    _, info = build("y ~ 0 + x + (1 | g)", frame)
    assert info.fixed_names == ("x",)
    _, info = build("y ~ x - 1 + (1 | g)", frame)
    assert info.fixed_names == ("x",)


def test_transformed_response_is_evaluated(frame):
    data = frame.assign(y=np.exp(frame["y"]))
    design, _ = build("log(y) ~ x + (1 | g)", data)
    np.testing.assert_allclose(design.y, frame["y"], rtol=1e-14)  # log(exp(v)): rounding only


def test_new_rows_get_codes_and_unseen_labels_get_minus_one(crossed):
    new = pd.DataFrame({"x": [0.5, -1.0, 2.0], "g": ["g3", "unseen", "g0"], "h": ["h0", "h1", "h2"]})
    codes, cov = term_rows(crossed.info.terms[0], new)
    levels = crossed.info.terms[0].levels
    assert list(codes) == [levels.index("g3"), -1, levels.index("g0")]
    np.testing.assert_array_equal(cov, [[1.0, 0.5], [1.0, -1.0], [1.0, 2.0]])


PLAIN_SIDES = ["x", "1 + x", "0 + x", "x - 1", "x + w", "w + x", "x + x", "1", "0 + x + w", "w + x - 1", "u + v", "1 + v + x"]


@pytest.mark.parametrize("side", PLAIN_SIDES)
def test_plain_numeric_sides_match_formulaic(frame, side):
    """A side of only numeric columns and the intercept is built without formulaic: the same column names
    and values (bit for bit: both copy the columns), for fitting and for new rows."""
    from formulaic import model_matrix

    from lmevi.frame.matrix import PlainSpec, _design_matrix
    from lmevi.frame.rsyntax import to_formulaic

    # an integer column, a float32 one and a pandas nullable integer one (an extension type)
    data = frame.assign(w=np.arange(len(frame)) % 7, u=np.linspace(-1, 1, len(frame), dtype=np.float32),
                        v=pd.array(np.arange(len(frame)) % 5, dtype="Int64"))
    M, names, spec = _design_matrix(side, data)
    reference = model_matrix(to_formulaic(side), data)
    assert isinstance(spec, PlainSpec)
    assert names == list(reference.columns)
    np.testing.assert_array_equal(M, np.asarray(reference, dtype=np.float64))
    new = data.iloc[::-3]
    np.testing.assert_array_equal(spec.get_model_matrix(new), np.asarray(reference.model_spec.get_model_matrix(new), float))


@pytest.mark.parametrize("side", ["f", "x + f", "log(abs(x))", "x:w", "0 + 1", "1 + x - 1", "I(x^2)"])
def test_other_sides_go_to_formulaic(frame, side):
    from lmevi.frame.matrix import PlainSpec, _design_matrix

    _, _, spec = _design_matrix(side, frame.assign(w=1.0))
    assert not isinstance(spec, PlainSpec)


def test_boolean_and_categorical_columns_are_not_plain(frame):
    from lmevi.frame.matrix import _plain_spec

    data = frame.assign(t=frame["x"] > 0, c=pd.Categorical(frame["a"]))
    assert _plain_spec("x", data) is not None
    assert _plain_spec("x + t", data) is None and _plain_spec("c", data) is None


def test_a_plain_formula_fits_without_importing_formulaic():
    """sleepstudy-shaped: lmevi.fit, predict and the summary never load the formula engine (0.3-0.5 s of a
    fresh process)."""
    import subprocess
    import sys

    child = (
        "import sys, numpy as np, pandas as pd, lmevi\n"
        "rng = np.random.default_rng(0)\n"
        "d = pd.DataFrame({'g': np.repeat(np.arange(12), 10), 'x': np.tile(np.arange(10.0), 12)})\n"
        "d['y'] = 1 + 0.5 * d.x + rng.normal(size=12)[d.g] + rng.normal(size=len(d))\n"
        "m = lmevi.fit('y ~ x + (x | g)', d)\n"
        "str(m); m.predict(d.iloc[:5]); m.fixef(add_dropped=True)\n"
        "print('formulaic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_incomplete_rows_finds_every_kind_of_missing_value():
    """Each column type by its own rule (NumPy integers and booleans cannot hold NA and are not read row by row;
    floats by one isfinite pass; categoricals by their codes): NaN, inf, None, pd.NA and a missing category."""
    from lmevi.frame.design import incomplete_rows

    frame = pd.DataFrame({
        "f": [1.0, np.nan, 2.0, np.inf, 0.0, 1.0],
        "i": np.arange(6),
        "b": [True, False] * 3,
        "c": pd.Categorical(["a", "b", None, "a", "b", "a"]),
        "o": ["x", None, "y", "z", "x", "y"],
        "n": pd.array([1, 2, 3, pd.NA, 5, 6], dtype="Int64"),
        "s": pd.array(["u", "v", "w", "u", pd.NA, "v"], dtype="string"),
        "g": pd.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan], dtype="Float64"),
    })
    bad, per_column = incomplete_rows(frame, list(frame.columns))
    assert per_column == {"f": 2, "c": 1, "o": 1, "n": 1, "s": 1, "g": 1}
    np.testing.assert_array_equal(bad, [False, True, True, True, True, True])
    assert incomplete_rows(frame, ["i", "b"])[1] == {}


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_counting_codes_piece_by_piece_is_bincount(dtype):
    """labels.count_codes counts long narrow code arrays in pieces (so that NumPy's widening copy stays small):
    the counts are exactly np.bincount's, also with levels that never occur."""
    from lmevi.frame.labels import COUNT_CHUNK, count_codes

    n_levels = 100
    codes = np.random.default_rng(1).integers(0, n_levels - 3, 3 * COUNT_CHUNK + 17).astype(dtype)
    np.testing.assert_array_equal(count_codes(codes, n_levels), np.bincount(codes, minlength=n_levels))


@pytest.mark.parametrize(
    "values",
    [
        np.array([7, 3, 3, 9, 7, 12], np.int32),  # gaps between ids
        np.arange(6, dtype=np.int64)[::-1].copy(),  # 0..J-1, every one present: the column is its own codes
        np.array([-128, 127, 0, -128], np.int8),  # the whole int8 range
        np.array([2**64 - 1, 2**64 - 3, 2**64 - 1], np.uint64),  # near uint64's top
        np.array([-(2**63), -(2**63) + 5, -(2**63)], np.int64),  # near int64's bottom
        np.array([10**12, 5, 5], np.int64),  # too sparse for counting: hashed
    ],
)
def test_integer_ids_are_coded_as_pandas_codes_them(values):
    """Integer grouping columns are coded by counting where their range is at most a few times the rows
    (:func:`lmevi.frame.labels._dense_integer_codes`): the same codes and labels as ``pd.factorize(sort=True)``, the
    user's column untouched, and the codes read-only (they may be the column's own array)."""
    col = pd.Series(values.copy())
    codes, labels, counts = labels_lib._factorize(col)
    want_codes, uniques = pd.factorize(col, sort=True)
    np.testing.assert_array_equal(codes, want_codes)
    assert labels == [str(int(u)) for u in uniques]
    np.testing.assert_array_equal(col.to_numpy(), values)
    dense = labels_lib._dense_integer_codes(col)
    sparse = int(values.max()) - int(values.min()) > 4 * len(values) + labels_lib.DENSE_SLACK
    assert (dense is None) == sparse  # the counting path is taken wherever the range allows it
    if dense is not None:
        assert not codes.flags.writeable
        np.testing.assert_array_equal(counts, np.bincount(want_codes))


def test_integer_ids_give_the_fit_of_their_labels(frame):
    """The same integer ids as text: the same levels in R's numeric order, the same fit."""
    ids = frame.assign(g=frame["g"].astype(np.int32))
    text = frame.assign(g=pd.Categorical(frame["g"].astype(str), categories=["2", "4", "10", "33"]))
    a, info_a = build("y ~ (1 | g)", ids)
    b, info_b = build("y ~ (1 | g)", text)
    assert info_a.terms[0].levels == info_b.terms[0].levels == ("2", "4", "10", "33")
    np.testing.assert_array_equal(np.asarray(a.terms[0].index), np.asarray(b.terms[0].index))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("extra_rows", [0, 9])
def test_standardising_in_place_equals_the_copying_path_bit_for_bit(frame, dtype, extra_rows):
    """A design made in :class:`lmevi.runtime.precision.RowBuffers` is standardised in place (its padded arrays are
    the results, none copied) and gives exactly the numbers of the copying path (``x / s`` either way), with
    slopes in a random term, a column that is not standardised (the intercept) and padding rows. The user's
    columns are never written."""
    from lmevi.runtime.precision import DEVICE_ALIGNMENT, RowBuffers
    from lmevi.fitting.scaling import standardise

    frame = frame.assign(x=frame["x"] * 1e3 + 5.0)  # scales far from 1
    before = frame.copy(deep=True)
    formula = parse_formula("y ~ x + (1 | g) + (1 + x | b)")
    n_rows = len(frame) + extra_rows
    want, want_scales = standardise(build_design(formula, frame, dtype)[0], n_rows=n_rows)
    buffers = RowBuffers(lambda m: m + extra_rows)
    design, _ = build_design(formula, frame, dtype, buffers=buffers)
    made = [buffers.whole(a) for a in (design.X, design.terms[0].index, design.terms[1].index,
                                       design.terms[1].covariates)]
    in_float64 = dtype == jnp.float64
    # float32: the float matrices are not made in buffers (the design stage rounds them into a copy)
    assert [m is not None for m in made] == [in_float64, True, True, in_float64]
    got, scales = standardise(design, n_rows=n_rows, buffers=buffers)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # exactly: the same divisions
    np.testing.assert_array_equal(scales.x_scale, want_scales.x_scale)
    assert got.terms[0].index is made[1] and got.terms[1].index is made[2]  # no copies
    if in_float64:
        assert got.X is made[0] and got.terms[1].covariates is made[3]
        assert scales.x_scale[0] == 1.0 and scales.x_scale[1] != 1.0
    for a in jax.tree_util.tree_leaves(got):
        assert a.ctypes.data % DEVICE_ALIGNMENT == 0
    pd.testing.assert_frame_equal(frame, before)
    with pytest.raises(RuntimeError, match="in place twice"):  # its head now holds standardised numbers
        standardise(design, n_rows=n_rows, buffers=buffers)


def test_aligned_host_arrays_are_placed_on_the_cpu_without_a_copy(monkeypatch):
    """``jax.device_put`` shares an aligned host array of the device's dtype (what ``lmevi.fitting.build.place_rows``
    relies on to keep one copy of a design's rows), and copies a plainly allocated large NumPy array (16 bytes
    into a page). A model's placed arrays are the standardised host arrays themselves."""
    import lmevi
    from lmevi.fitting import scaling
    from lmevi.runtime.precision import aligned_zeros

    with jax.enable_x64(True):
        for dtype, shape in ((np.float64, (1 << 16, 2)), (np.int32, (1 << 16,)), (np.float32, (1 << 16,))):
            a = aligned_zeros(shape, dtype)
            assert a.shape == shape and a.dtype == dtype and not a.any()
            assert jax.device_put(a).unsafe_buffer_pointer() == a.ctypes.data
        plain = np.zeros(1 << 16)
        if plain.ctypes.data % 64:  # NumPy's usual allocation: JAX copies it
            assert jax.device_put(plain).unsafe_buffer_pointer() != plain.ctypes.data
    rng = np.random.default_rng(2)
    n = 3000
    frame = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "g": rng.integers(0, 60, n)})
    standardised, standardise = [], scaling.standardise

    def spy(*args, **kwargs):
        out = standardise(*args, **kwargs)
        standardised.append(out[0])
        return out

    monkeypatch.setattr("lmevi.fitting.build.scaling.standardise", spy)
    model = lmevi.build_model("y ~ x + (1 + x | g)", frame, q="structured")
    placed = jax.tree_util.tree_leaves(model.problem.design)
    hosts = jax.tree_util.tree_leaves(standardised[0])
    assert len(placed) == len(hosts) == 4  # y, X, the codes and covariates of (1 + x | g)
    for leaf, host in zip(placed, hosts):
        assert leaf.unsafe_buffer_pointer() == host.ctypes.data
