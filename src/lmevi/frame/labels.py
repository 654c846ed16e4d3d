"""Level labels: the one rule that turns a grouping column's values into the labels lme4 prints.

Every place that names a level (the design at fit time, ``predict`` on new rows, ``ranef``, the ArviZ
export, R's ``factor()`` inside formulas) goes through this module, so a level is the same level everywhere.

The rule, value by value (never depending on the rest of the column):

* a whole-number float reads as an integer, as R prints it: ``3.0`` -> ``"3"``; other floats use R's 15
  significant digits: ``19.5`` -> ``"19.5"``, ``1e20`` -> ``"1e+20"``;
* integers read as themselves, strings as themselves, anything else as ``str(value)``;
* a pandas ``Categorical`` column's labels are its categories, each read by the same rule.

Identity of a level of an interaction ``a:b`` is the *tuple* of its parents' labels; the label shown is
``"<a>:<b>"`` as lme4 prints it, but two different tuples that print alike (``("1:2", "3")`` and
``("1", "2:3")``) stay two levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd


def level_label(value) -> str:
    """The label of one value, as R's ``as.character`` prints it."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isfinite(v) and v == math.floor(v) and abs(v) < 1e15:
            return str(int(v))
        text = f"{v:.15g}"
        if float(text) != v:  # 15 digits would merge two distinct values: keep enough to tell them apart
            text = repr(v)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}e{int(exponent):+03d}" if e else text
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


class Factor(NamedTuple):
    """A grouping column as codes: ``codes`` ``(n,)`` (-1 for a missing value), ``labels`` of the uniques and,
    where already counted, ``counts`` ``(J,)`` the rows at each (``None`` otherwise)."""

    codes: np.ndarray
    labels: list[str]
    counts: np.ndarray | None = None


def _factorize(col: pd.Series) -> Factor:
    """The column's codes and the labels of its uniques; code -1 marks a missing value.

    The uniques of a Categorical are its categories in order; otherwise the distinct values in the order
    R's ``factor`` uses: sorted numbers for a numeric column, sorted labels otherwise.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        # the Categorical's own codes (Series.cat.codes copies them), in their own integer type (int8 .. int32):
        # widening 10^7 of them costs more than the rest
        return Factor(col.array.codes, _labels_of(col.cat.categories))
    dense = _dense_integer_codes(col)
    if dense is not None:
        return dense
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        # numbers sort as numbers (R's factor); pandas sorts the uniques, labels are made in bulk
        codes, uniques = pd.factorize(col, sort=True, use_na_sentinel=True)
        return Factor(codes.astype(np.int64), _number_labels(np.asarray(uniques)))
    codes, uniques = pd.factorize(col, sort=False, use_na_sentinel=True)
    labels = _labels_of(uniques)
    # sorted labels; NumPy sorts text by code point, as Python's sorted does
    order = np.argsort(np.asarray(labels, dtype=str), kind="stable").tolist()
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels))
    codes = np.where(codes >= 0, rank[np.maximum(codes, 0)] if len(labels) else -1, -1)
    return Factor(codes, [labels[i] for i in order])


# A NumPy integer column whose values span at most this many times its length (plus DENSE_SLACK) is coded
# by counting (:func:`_dense_integer_codes`) instead of hashing: the counts array stays below a few bytes a row.
DENSE_SPAN_PER_ROW = 4
DENSE_SLACK = 1 << 16


def _dense_integer_codes(col: pd.Series) -> Factor | None:
    """The :class:`Factor` (int32 or int64 codes, counted) of a NumPy integer column whose values lie in a range
    of at most ``DENSE_SPAN_PER_ROW * n + DENSE_SLACK`` (ids such as 0..J-1 or 1001..1000+J), else ``None``.

    Counting each value's rows in that range gives the sorted distinct values and every value's rank in one
    pass, where ``pd.factorize(sort=True)`` hashes every row, sorts the uniques and maps the codes again
    (1e7 rows with 400,000 levels: 25 ms against 330 ms). Codes equal to the values themselves (0..J-1, all
    present) are the column's own array, read-only."""
    dtype = col.dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iu" or len(col) == 0:
        return None
    values = col.to_numpy(copy=False)
    lo, hi = int(values.min()), int(values.max())
    span = hi - lo + 1
    if span > DENSE_SPAN_PER_ROW * len(values) + DENSE_SLACK:
        return None
    code_type = np.int32 if span <= np.iinfo(np.int32).max else np.int64
    if lo == 0 and np.can_cast(dtype, code_type):
        shifted = values if dtype == code_type else values.astype(code_type)
    elif dtype.kind == "u":
        shifted = (values - dtype.type(lo)).astype(code_type)
    else:
        shifted = np.subtract(values, lo, dtype=np.int64).astype(code_type)
    counts = count_codes(shifted, span)
    present = counts > 0
    offsets = np.flatnonzero(present)
    uniques = offsets.astype(np.uint64) + np.uint64(lo) if dtype.kind == "u" else offsets + lo
    if len(uniques) == span:  # every value in the range occurs: the shifted values are the codes
        codes = shifted if shifted is not values else shifted.view()
    else:
        rank = np.cumsum(present, dtype=code_type) - 1
        codes = rank[shifted]
    codes.flags.writeable = False
    return Factor(codes, _number_labels(uniques), counts[offsets])


def _labels_of(values) -> list[str]:
    """:func:`level_label` of every value, in bulk for numbers and text."""
    if isinstance(getattr(values, "dtype", None), pd.StringDtype) and not pd.isna(values).any():
        return values.tolist()  # pandas' own strings are Python str already (a third of the time of the below)
    array = np.asarray(values)
    if array.dtype.kind in "iuf":
        return _number_labels(array)
    if pd.api.types.infer_dtype(values, skipna=False) == "string":
        return np.asarray(values, dtype=object).astype(str).tolist()
    return [level_label(v) for v in values]


def _number_labels(values: np.ndarray) -> list[str]:
    """:func:`level_label` of every number in ``values``, in bulk where every value is a whole number."""
    if values.dtype.kind in "iu":
        return values.astype(str).tolist()
    if values.dtype.kind == "f":
        whole = np.isfinite(values) & (values == np.floor(values)) & (np.abs(values) < 1e15)
        if whole.all():
            return values.astype(np.int64).astype(str).tolist()
    return [level_label(v) for v in values]


@dataclass(frozen=True)
class Levels:
    """The levels of a grouping factor (one column or the interaction of several).

    Attributes:
        labels: ``(J,)`` labels as lme4 prints them (``"A:p"`` for an interaction).
        tuples: for an interaction, ``(J,)`` each level's labels of its grouping columns; ``None`` for one
            column, whose levels are their labels.
        distinct: whether no two labels are known to be equal without comparing them (one column of text,
            whose labels are its distinct values); ``False`` says nothing.
    """

    labels: tuple[str, ...]
    tuples: tuple[tuple[str, ...], ...] | None = None
    distinct: bool = False  # known to print differently (text values: a level is its own label)

    @property
    def keys(self) -> tuple:
        """``(J,)`` the levels' identities: a label for one grouping column, a tuple of labels for several."""
        return self.labels if self.tuples is None else self.tuples

    def __len__(self) -> int:
        return len(self.labels)

    def codes(self, data: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
        """``(n,)`` the code of each row's level, ``-1`` for a level not among these (or a missing value)."""
        lookup = {key: j for j, key in enumerate(self.keys)}
        parts = [_factorize(data[c]) for c in columns]
        combined, uniques, _ = _combine(parts)
        per_unique = np.asarray([lookup.get(key, -1) for key in uniques], dtype=np.int64)
        return np.where(combined >= 0, per_unique[np.maximum(combined, 0)] if len(uniques) else -1, -1)

    def row_labels(self, data: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
        """``(n,)`` every row's label as lme4 prints it (for messages about levels not seen)."""
        parts = [_factorize(data[c]) for c in columns]
        combined, uniques, _ = _combine(parts)
        text = np.asarray([u if isinstance(u, str) else ":".join(u) for u in uniques] + ["NA"], dtype=object)
        return text[np.where(combined >= 0, combined, len(uniques))]


# Rows per piece of :func:`count_codes`: a piece's codes widened to NumPy's index type stay in cache.
COUNT_CHUNK = 1 << 18


def count_codes(codes: np.ndarray, n: int) -> np.ndarray:
    """``(n,)`` int64: how many of ``codes`` (non-negative, below ``n``) equal each value; ``np.bincount`` piece
    by piece. ``np.bincount`` first widens narrower codes (int8 .. int32) to int64: at 10^7 rows that copy
    is 80 MB of fresh memory, which cost more than the count (int8 codes: 63 ms against 15 ms)."""
    step = max(COUNT_CHUNK, n)
    if codes.dtype == np.intp or len(codes) <= step:
        return np.bincount(codes, minlength=n)
    out = np.zeros(n, dtype=np.int64)
    for start in range(0, len(codes), step):
        out += np.bincount(codes[start:start + step], minlength=n)
    return out


def _combine(parts) -> tuple[np.ndarray, list, np.ndarray]:
    """Row codes into the distinct levels that occur, in the parents' level order (R's ``a:b``), and ``(J,)``
    the number of rows at each. A level is its label for one column, the tuple of its labels for several."""
    n = len(parts[0][0])
    if len(parts) == 1:
        codes, labels, per_label = parts[0]
        if per_label is None:
            # one pass for "any missing?" (a boolean mask of 10^7 rows costs more than the count below)
            has_missing = bool(n) and bool(codes.min() < 0)
            per_label = count_codes(codes[codes >= 0] if has_missing else codes, len(labels))
        used = np.flatnonzero(per_label)
        if len(used) == len(labels):  # every level occurs: the codes are already the answer
            return codes, list(labels), per_label
        remap = np.full(len(labels), -1, dtype=codes.dtype)
        remap[used] = np.arange(len(used))
        out = np.where(codes < 0, -1, remap[np.maximum(codes, 0)]) if len(labels) else np.full(n, -1, codes.dtype)
        return out, [labels[u] for u in used], per_label[used]
    missing = np.zeros(n, dtype=bool)
    for codes, _, _ in parts:
        missing |= codes < 0
    sizes = [max(len(p.labels), 1) for p in parts]
    if float(np.prod([float(z) for z in sizes])) < 2.0**62:
        # one mixed-radix number per row (first column slowest): sorting it is the lexicographic order
        key = np.zeros(n, dtype=np.int64)
        for (codes, _, _), size in zip(parts, sizes):
            key = key * size + np.where(missing, 0, codes)
        uniq_key, inverse, counts = np.unique(key[~missing], return_inverse=True, return_counts=True)
        digits = []
        for size in reversed(sizes):
            digits.append(uniq_key % size)
            uniq_key = uniq_key // size
        uniq = np.stack(digits[::-1], axis=1)
    else:
        stacked = np.stack([np.where(missing, 0, c) for c, _ in parts], axis=1)
        # lexicographic: a slowest
        uniq, inverse, counts = np.unique(stacked[~missing], axis=0, return_inverse=True, return_counts=True)
    out = np.full(n, -1, dtype=np.int64)
    out[~missing] = inverse.reshape(-1)
    keys = [tuple(parts[c][1][int(v)] for c, v in enumerate(row)) for row in uniq]
    return out, keys, counts


def levels_of(data: pd.DataFrame, columns: tuple[str, ...]) -> tuple[Levels, np.ndarray, np.ndarray]:
    """The levels that occur in ``data`` and every row's code.

    Unused categories of a Categorical are dropped, as lme4's ``factor(..., drop = TRUE)`` does. Levels are
    ordered as R orders them: a Categorical's category order, sorted numbers, sorted strings; an
    interaction by its first column's order, then the next.

    Returns:
        ``(levels, codes (n,), counts (J,))``; a row with a missing value has code ``-1`` and is not counted.
    """
    combined, keys, counts = _combine([_factorize(data[c]) for c in columns])
    if len(columns) == 1:
        dtype = data[columns[0]].dtype
        text = isinstance(dtype.categories.dtype if isinstance(dtype, pd.CategoricalDtype) else dtype, pd.StringDtype)
        return Levels(labels=tuple(keys), distinct=text), combined, counts
    return Levels(labels=tuple(":".join(k) for k in keys), tuples=tuple(keys)), combined, counts


def as_factor(values) -> pd.Categorical:
    """R's ``factor(values)``: a Categorical of labels, levels in R's order (see :func:`levels_of`)."""
    col = pd.Series(values)
    codes, labels, _ = _factorize(col)
    used = np.unique(codes[codes >= 0])
    return pd.Categorical.from_codes(
        np.searchsorted(used, codes).astype(np.int64) * (codes >= 0) - (codes < 0), [labels[u] for u in used]
    )
