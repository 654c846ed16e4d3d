"""Any DataFrame in: the columns a formula reads, from pandas, polars, pyarrow or any frame narwhals knows.

The design stage reads columns one at a time (:mod:`lmevi.frame.design`, :mod:`lmevi.frame.labels`,
:mod:`lmevi.frame.matrix`) and hands formulaic a pandas frame where an R expression (a factor, an
interaction, a transform) has to be evaluated. A pandas DataFrame therefore passes through untouched; any
other frame is read through narwhals (Gorelli et al., ``narwhals-dev/narwhals``: one API over polars,
pyarrow, Modin, cuDF, ...) and becomes a pandas frame of *only the columns the formula uses*, each taken as a
NumPy array (without a copy where the source's memory allows it: a numeric column with no missing values).
A wide polars or Arrow table whose formula names three of its hundred columns thus costs three columns,
never a pandas copy of the whole table. A polars ``LazyFrame`` is collected with only those columns selected.

Columns, by their narwhals dtype:

* numbers: ``to_numpy()``; a column with missing values (polars' or Arrow's nulls) reads as float64 with
  NaN there, which the design stage treats as missing exactly as pandas' NaN (``missing="raise"``/``"drop"``);
* polars ``Enum``: a pandas ``Categorical`` with the Enum's categories in their order (R's ``factor`` with
  ``levels =``); an Arrow dictionary column: a ``Categorical`` in its dictionary's order (pyarrow's own
  pandas conversion, as ``pa.Table.from_pandas`` keeps a Categorical's categories);
* polars ``Categorical``: as text. Its category order is the order strings met polars' global category
  table in this process, which the data do not determine, so its levels are sorted as R's ``factor`` sorts
  a character vector. Use an ``Enum`` to fix an order (a reference level of a fixed-effect factor);
* anything else (text, booleans, dates): that one column converted by its library's own ``to_pandas``.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd


class NotAFrame(TypeError, ValueError):
    """The data is not a DataFrame. Both a ``TypeError`` and, as ``lmevi.fit`` raised before it read other
    frames, a ``ValueError``."""


def formula_frame(data, columns: Sequence[str], what: str = "data") -> pd.DataFrame:
    """``data`` as a pandas DataFrame for the design stage: ``data`` itself when it is one, else a frame of
    ``columns`` only (those of them that ``data`` has), in the rows' order, with a ``RangeIndex``.

    Args:
        data: a pandas, polars (eager or lazy) or pyarrow frame, or any other that ``narwhals.from_native``
            accepts.
        columns: the columns the formula reads (missing ones are left for the caller to report by name).
        what: how messages name ``data`` (``"data"``, ``"newdata"``).

    Returns:
        A pandas DataFrame ``(n_rows, len(columns present))``.

    Raises:
        NotAFrame: ``data`` is not a DataFrame narwhals knows (a ``TypeError`` and a ``ValueError``).
        ValueError: ``data`` has two columns of one name.
    """
    if isinstance(data, pd.DataFrame):
        return data
    import narwhals as nw  # here, not at import: pandas callers never pay for it

    try:
        frame = nw.from_native(data)
    except TypeError:
        raise NotAFrame(
            f"{what} must be a DataFrame (pandas, polars, pyarrow, or another that narwhals reads), "
            f"got {type(data).__name__}"
        ) from None
    if not isinstance(frame, (nw.DataFrame, nw.LazyFrame)):
        raise NotAFrame(f"{what} must be a DataFrame, got a {type(data).__name__} (a single column?)")
    names = list(frame.columns)
    duplicated = sorted({str(c) for c in names if names.count(c) > 1})
    if duplicated:
        raise ValueError(f"the {what} has more than one column named {duplicated}; column names must be unique")
    present = [c for c in dict.fromkeys(columns) if c in names]
    if isinstance(frame, nw.LazyFrame):
        frame = frame.select(present).collect()
    polars = frame.implementation.is_polars()
    out = {c: _column(frame.get_column(c), polars) for c in present}
    return pd.DataFrame(out, index=pd.RangeIndex(len(frame)), columns=present, copy=False)


def _column(series, polars: bool):
    """One column as NumPy (numbers, booleans without nulls) or as a pandas column (everything else)."""
    import narwhals as nw

    dtype = series.dtype
    if dtype.is_numeric():
        if series.null_count() == 0:
            return series.to_numpy()  # a view of the source's buffer where it has one
        return series.cast(nw.Float64).to_numpy()  # nulls as NaN: the design stage's missing values
    if isinstance(dtype, nw.Boolean) and series.null_count() == 0:
        return series.to_numpy()
    if polars and isinstance(dtype, nw.Categorical) and not isinstance(dtype, nw.Enum):
        series = series.cast(nw.String)  # polars' category order is not the data's: sort as text (R)
    native = nw.to_native(series)
    # pyarrow's and polars' own conversions keep a dictionary's (Enum's) categories in order; narwhals'
    # generic one reads an Arrow dictionary as text
    convert = getattr(native, "to_pandas", None)
    column = convert() if convert is not None else series.to_pandas()
    return column.array if isinstance(column, pd.Series) else column
