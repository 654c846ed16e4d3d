r"""Prior weights, binomial trials and offsets: the columns R's ``model.frame`` calls ``(weights)`` and
``(offset)``, read from a formula and a DataFrame.

* ``cbind(successes, failures)`` on the left of a binomial formula (each side any R expression of columns,
  ``cbind(incidence, size - incidence)``) is read as R's ``binomial()$initialize`` reads it: the response is the
  proportion ``y_i = s_i / n_i`` with ``n_i = s_i + f_i`` trials, and the prior weight is ``w_i n_i``. A row
  with no trials has ``y_i = 0`` and weight 0: it adds nothing to the likelihood (glmer keeps such rows too).
* ``weights=`` (a column name or an array, one value per row of the data): R's prior weights. Row ``i``'s
  log-likelihood is multiplied by ``w_i`` (a Gaussian's residual variance is ``sigma^2 / w_i``; a binomial
  proportion's weight is its number of trials).
* ``offset(expr)`` terms of the right-hand side and ``offset=`` (a column name or an array): summed, and added
  to the linear predictor with coefficient 1, in the response's units (on the link scale).

An array given for ``weights=`` or ``offset=`` becomes a column named ``(weights)`` / ``(offset)`` of the frame
before rows with missing values are handled, as in R, so that ``missing="drop"`` drops its entries too.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from lmevi.frame.formula import Formula, FormulaError, _split_top
from lmevi.frame.matrix import _model_matrix
from lmevi.frame.rsyntax import CONTEXT, clean_error, required_columns, to_formulaic

WEIGHTS_COLUMN, OFFSET_COLUMN = "(weights)", "(offset)"


class Prior(NamedTuple):
    """Per-row arrays of a model frame beyond the response and the predictors (host NumPy, float64).

    Attributes:
        weights: ``(n_obs,)`` prior weights (times the trials of a ``cbind`` response), or ``None`` (all 1).
        offset: ``(n_obs,)`` the summed offsets, or ``None`` (all 0).
        response: ``(n_obs,)`` the proportions of a ``cbind`` response, or ``None`` (the response is a column).
    """

    weights: np.ndarray | None
    offset: np.ndarray | None
    response: np.ndarray | None


def cbind_parts(expr: str) -> tuple[str, str] | None:
    """``("incidence", "size - incidence")`` for ``"cbind(incidence, size - incidence)"``, else ``None``.

    Raises:
        FormulaError: for ``cbind`` with other than two arguments.
    """
    text = expr.strip()
    if not (text.startswith("cbind") and text[5:].lstrip().startswith("(") and text.endswith(")")):
        return None
    inner = text[text.index("(") + 1: -1]
    parts = [p.strip() for p in _split_top(inner, ",")]
    if len(parts) != 2 or not all(parts):
        raise FormulaError(f"cbind() on the left of a formula takes two columns (successes, failures), got {expr!r}")
    return parts[0], parts[1]


def response_columns(expr: str) -> list[str]:
    """The data columns a response reads: those of ``cbind``'s two arguments, or of the expression itself."""
    parts = cbind_parts(expr)
    exprs = parts if parts is not None else (expr,)
    return list(dict.fromkeys(c for e in exprs for c in sorted(required_columns(e))))


def attach_columns(data: pd.DataFrame, weights, offset) -> tuple[pd.DataFrame, str | None, str | None]:
    """``(data, weights column, offset column)``: a column name is checked to exist; an array becomes the column
    ``(weights)`` / ``(offset)`` of a copy of ``data`` (one value per row, in the rows' order)."""
    names = []
    for value, column, what in ((weights, WEIGHTS_COLUMN, "weights"), (offset, OFFSET_COLUMN, "offset")):
        if value is None:
            names.append(None)
        elif isinstance(value, str):
            if value not in data.columns:
                raise ValueError(f"{what}={value!r} is not a column of the data (available: {list(data.columns)[:20]})")
            names.append(value)
        else:
            array = np.asarray(value)
            if array.ndim != 1 or array.shape[0] != len(data):
                raise ValueError(f"{what}= must be a column name or one number per row of the data ({len(data)}), "
                                 f"got shape {array.shape}")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise ValueError(f"{what}= must be numbers, got dtype {array.dtype}")
            data = data.assign(**{column: array.astype(np.float64)})
            names.append(column)
    return data, names[0], names[1]


def evaluate(expr: str, data: pd.DataFrame, what: str) -> np.ndarray:
    """``(n,)`` float64 values of one R expression of columns (a column name, ``log(t)``, ``size - incidence``).

    Raises:
        ValueError: naming ``what`` when the expression cannot be evaluated or is not one numeric column.
    """
    if expr in data.columns:
        col = data[expr]
        if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col):
            raise ValueError(f"{what} {expr!r} must be numeric, but its dtype is {col.dtype}")
        return col.to_numpy(dtype=np.float64)
    try:
        # inside I(): "size - incidence" is arithmetic here, not the removal of a term
        mm = _model_matrix(f"0 + I({to_formulaic(expr)})", data, context=CONTEXT, na_action="ignore")
    except Exception as err:
        raise ValueError(f"cannot evaluate {what} {expr!r}: {clean_error(err)}") from None
    if mm.shape[1] != 1:
        raise ValueError(f"{what} {expr!r} must be one numeric column, it gives {mm.shape[1]}")
    return np.asarray(mm, dtype=np.float64)[:, 0]


def read_prior(formula: Formula, data: pd.DataFrame, weights: str | None, offset: str | None) -> Prior:
    """The prior weights, offset and ``cbind`` proportions of ``data`` (rows with missing values already handled).

    Args:
        formula: the parsed formula (its ``cbind`` response and ``offset(...)`` terms).
        data: the model frame's rows.
        weights, offset: column names (:func:`attach_columns`), or ``None``.

    Raises:
        ValueError: naming the column for negative or non-finite weights, successes or failures below 0 (or
            non-finite), and a non-finite offset.
    """
    w = None
    if weights is not None:
        w = evaluate(weights, data, "the weights")
        bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            raise ValueError(f"the weights {weights!r} must be finite and non-negative; row {int(np.argmax(bad))} "
                             f"has {w[np.argmax(bad)]:g} ({int(bad.sum())} such row(s))")
    response = None
    parts = cbind_parts(formula.response)
    if parts is not None:
        s, f = (evaluate(p, data, "cbind's argument") for p in parts)
        for name, v in zip(parts, (s, f)):
            bad = ~np.isfinite(v) | (v < 0)
            if bad.any():
                raise ValueError(
                    f"cbind({parts[0]}, {parts[1]}): {name!r} must be finite and at least 0 (successes and failures "
                    f"are counts, successes within 0..trials); row {int(np.argmax(bad))} has {v[np.argmax(bad)]:g}")
        n = s + f
        response = np.where(n > 0, s / np.where(n > 0, n, 1.0), 0.0)
        w = n if w is None else w * n
    total = None
    exprs = list(formula.offsets) + ([offset] if offset is not None else [])
    for expr in exprs:
        o = evaluate(expr, data, "the offset")
        if not np.all(np.isfinite(o)):
            bad = ~np.isfinite(o)
            raise ValueError(f"the offset {expr!r} has {int(bad.sum())} non-finite value(s) (e.g. row "
                             f"{int(np.argmax(bad))}: {o[np.argmax(bad)]:g}; log of 0?)")
        total = o if total is None else total + o
    return Prior(weights=w, offset=total, response=response)
