"""Any DataFrame in (lmevi.frame.columns): polars and pyarrow frames give the fits and predictions of the same
data as a pandas frame, read only the formula's columns, and treat their nulls as pandas' missing values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import lmevi
from lmevi.frame.columns import formula_frame
from lmevi.frame.design import build_design
from lmevi.frame.formula import parse_formula
from lmevi.frame.rdata import load_rdataset

pl = pytest.importorskip("polars")  # a test dependency only (requirements.txt)

# The same rows give the same arrays (the columns are the same float64 and integer values, the same level
# codes), so every number a fit computes is the same floating-point computation: 1e-12 relative leaves room
# only for a different summation order, which there is none of.
RTOL = 1e-12


def _arrow(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df, preserve_index=False)


def _polars(df: pd.DataFrame):
    """A polars frame of the same rows; pandas Categoricals become Enums (polars' ordered categories), whose
    order is the Categorical's, as a polars user would fix a factor's reference level."""
    cols = {}
    for c in df.columns:
        col = df[c]
        if isinstance(col.dtype, pd.CategoricalDtype):
            cols[c] = pl.Series(c, col.astype(str).tolist(), dtype=pl.Enum([str(v) for v in col.cat.categories]))
        else:
            cols[c] = pl.from_pandas(col)
    return pl.DataFrame(cols)


FRAMES = {"pandas": lambda df: df, "pyarrow": _arrow, "polars": _polars}


def _factor_data(seed: int = 3, n: int = 240) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 12, n)
    a = pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"])
    b = rng.choice(["p", "q"], n)  # text: levels sorted, as R's factor()
    x = rng.normal(size=n)
    effect = {"lo": 0.0, "mid": 0.5, "hi": 1.0}
    y = (1.0 + np.array([effect[v] for v in a]) + 0.3 * (b == "q") * x + rng.normal(0, 0.6, 12)[g]
         + rng.normal(0, 0.5, n))
    p = 1 / (1 + np.exp(-(y - 1.5)))
    return pd.DataFrame({"y": y, "a": a, "b": pd.array(b, dtype="str"), "x": x, "g": g,
                         "hit": (rng.uniform(size=n) < p).astype(np.int64), "unused": rng.normal(size=n)})


@pytest.fixture(scope="module")
def sleepstudy() -> pd.DataFrame:
    return load_rdataset("lme4", "sleepstudy")[0]


@pytest.fixture(scope="module")
def factors() -> pd.DataFrame:
    return _factor_data()


MODELS = {
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", {}),
    "factor_interaction": ("y ~ a + b * x + (1 | g)", {}),
    "glmm": ("hit ~ x + (1 | g)", {"family": "binomial"}),
}


def _data(name, sleepstudy, factors):
    return sleepstudy if name == "sleepstudy" else factors


@pytest.fixture(scope="module")
def pandas_fits(sleepstudy, factors):
    return {name: lmevi.fit(formula, _data(name, sleepstudy, factors), progress=False, **kw)
            for name, (formula, kw) in MODELS.items()}


@pytest.mark.parametrize("kind", ["pyarrow", "polars"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fit_and_predict_are_those_of_pandas(name, kind, sleepstudy, factors, pandas_fits):
    formula, kw = MODELS[name]
    df = _data(name, sleepstudy, factors)
    ref = pandas_fits[name]
    m = lmevi.fit(formula, FRAMES[kind](df), progress=False, **kw)
    assert m.info.fixed_names == ref.info.fixed_names
    assert [t.levels for t in m.info.terms] == [t.levels for t in ref.info.terms]
    np.testing.assert_allclose(m.fixef().to_numpy(), ref.fixef().to_numpy(), rtol=RTOL)
    np.testing.assert_allclose(m.varcorr()["sdcor"].to_numpy(), ref.varcorr()["sdcor"].to_numpy(), rtol=RTOL)
    new = df.iloc[::7]
    np.testing.assert_allclose(m.predict(FRAMES[kind](new)), ref.predict(new), rtol=RTOL)
    # the pandas fit predicts from a polars or Arrow frame too
    np.testing.assert_allclose(ref.predict(FRAMES[kind](new), re_form=None), ref.predict(new, re_form=None),
                               rtol=RTOL)


@pytest.mark.parametrize("kind", ["pyarrow", "polars"])
def test_nulls_are_missing_values_as_pandas_nan(kind, factors):
    df = factors.copy()
    df["x"] = df["x"].where(np.arange(len(df)) % 11 != 0)  # NaN in pandas, null in Arrow and polars
    native = (pa.Table.from_pandas(df, preserve_index=False) if kind == "pyarrow"
              else _polars(df).with_columns(pl.col("x").fill_nan(None)))
    formula = "y ~ x + (1 | g)"
    with pytest.raises(ValueError, match="missing or infinite values"):
        lmevi.build_model(formula, native)
    with pytest.warns(UserWarning, match="dropped 22 of 240 rows"):
        m = lmevi.fit(formula, native, missing="drop", progress=False)
    with pytest.warns(UserWarning, match="dropped 22 of 240 rows"):
        ref = lmevi.fit(formula, df, missing="drop", progress=False)
    np.testing.assert_allclose(m.fixef().to_numpy(), ref.fixef().to_numpy(), rtol=RTOL)
    with pytest.warns(UserWarning, match="predicting NaN for 22"):
        pred = m.predict(native, missing="drop")
    assert np.isnan(pred[::11]).all() and np.isfinite(np.delete(pred, np.s_[::11])).all()


def test_integer_nulls_read_as_nan(factors):
    table = pa.table({"g": pa.array([1, None, 3], type=pa.int64()), "y": [1.0, 2.0, 3.0]})
    frame = formula_frame(table, ["g", "y"])
    assert np.isnan(frame["g"].to_numpy()[1]) and frame["g"].to_numpy()[2] == 3.0


def test_arrow_dictionary_keeps_its_order_and_polars_categorical_sorts():
    table = pa.table({"f": pa.array(["b", "a", "b"]).dictionary_encode()})  # dictionary order b, a
    assert list(formula_frame(table, ["f"])["f"].cat.categories) == ["b", "a"]
    frame = formula_frame(pl.DataFrame({"f": pl.Series(["b", "a", "b"], dtype=pl.Categorical)}), ["f"])
    design_levels = sorted(frame["f"].unique())
    assert design_levels == ["a", "b"]


def test_lazy_frame_reads_only_the_formula_columns(factors):
    lazy = _polars(factors).lazy()
    _, info = build_design(parse_formula("y ~ x + (1 | g)"), lazy)
    _, ref = build_design(parse_formula("y ~ x + (1 | g)"), factors)
    assert info.terms[0].levels == ref.terms[0].levels and info.n_obs == ref.n_obs


def test_numeric_formula_on_arrow_builds_no_pandas_frame_of_all_columns(monkeypatch):
    """A wide Arrow table: only the formula's 3 columns reach pandas, as views of Arrow's buffers."""
    rng = np.random.default_rng(0)
    n, width = 5_000, 40
    cols = {f"c{j}": rng.normal(size=n) for j in range(width)}
    cols.update(y=rng.normal(size=n), x=rng.normal(size=n), g=rng.integers(0, 50, n))
    table = pa.table(cols)
    widths = []  # the width of every pandas DataFrame made, by its constructor or from a block manager
    original_init, original_from_mgr = pd.DataFrame.__init__, pd.DataFrame._from_mgr

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        widths.append(self.shape[1])

    def recording_from_mgr(cls, *args, **kwargs):  # pyarrow's Table.to_pandas builds its frame this way
        frame = original_from_mgr.__func__(cls, *args, **kwargs)
        widths.append(frame.shape[1])
        return frame

    monkeypatch.setattr(pd.DataFrame, "__init__", recording_init)
    monkeypatch.setattr(pd.DataFrame, "_from_mgr", classmethod(recording_from_mgr))
    table.to_pandas()  # the check sees a whole-table conversion
    assert widths == [width + 3]
    widths.clear()
    frame = formula_frame(table, ["y", "x", "g"])
    design, info = build_design(parse_formula("y ~ x + (1 | g)"), table)
    assert widths and max(widths) <= 3
    # zero copy: the float columns are Arrow's own memory
    assert np.shares_memory(frame["x"].to_numpy(), table.column("x").chunk(0).to_numpy())
    assert info.n_obs == n


def test_not_a_frame_is_refused():
    with pytest.raises(TypeError, match="must be a DataFrame"):
        build_design(parse_formula("y ~ x + (1 | g)"), {"y": [1.0], "x": [2.0], "g": [1]})


def test_missing_column_is_named(factors):
    with pytest.raises(ValueError, match=r"column\(s\) \['zz'\]"):
        build_design(parse_formula("y ~ zz + (1 | g)"), _arrow(factors))
