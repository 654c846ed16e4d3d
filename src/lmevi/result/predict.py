"""``predict``: a fitted model's predictions for new rows, as lme4's ``predict.merMod`` (new levels at their
prior mean, population-level predictions with ``re_form=None``, the link or the response scale)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from lmevi.frame.design import incomplete_rows
from lmevi.frame.newdata import fixed_matrix, new_data_columns, new_frame, row_labels, term_rows
from lmevi.frame.prior import OFFSET_COLUMN, evaluate
from lmevi.runtime.options import check_bool, check_choice, user_stacklevel


def predict(
    m, data: pd.DataFrame, allow_new_levels: bool = True, re_form: str | None = "full", missing: str = "raise",
    type: str = "link",
) -> np.ndarray:
    """Predictions of the fit ``m`` with posterior means (:meth:`lmevi.FitResult.predict`, whose docstring says
    what the arguments mean); ``(n_new,)``, in the rows' order."""
    allow_new_levels = check_bool("allow_new_levels", allow_new_levels)
    check_choice("type", type, ("link", "response"))
    check_choice("re_form", re_form, ("full", None, "~0"))
    check_choice("missing", missing, ("raise", "drop"))
    population = re_form in (None, "~0")
    data = new_frame(m.info, data, with_groups=not population)
    columns = new_data_columns(m.info, data, with_groups=not population)
    bad, counts = incomplete_rows(data, columns)
    out = np.full(len(data), np.nan)
    if bad.any():
        if missing == "raise":
            raise ValueError(
                f"newdata has {int(bad.sum())} row(s) with missing or infinite values in the columns the "
                f"predictions use ({counts}); pass missing='drop' to predict NaN for them"
            )
        warnings.warn(
            f"predicting NaN for {int(bad.sum())} of {len(data)} rows with missing or infinite values "
            f"({counts})",
            stacklevel=user_stacklevel(),
        )
        data = data.iloc[np.flatnonzero(~bad)]
    if len(data) == 0:
        return out
    X = fixed_matrix(m.info, data)
    pred = X @ m._beta_mean() + new_offset(m.info, data)
    if not population:
        for k, term in enumerate(m.info.terms):
            codes, cov = term_rows(term, data)
            unseen = codes < 0
            if unseen.any() and not allow_new_levels:
                labels = pd.unique(row_labels(term, data)[unseen])[:5]
                raise ValueError(
                    f"grouping factor {term.group!r} has {int(unseen.sum())} row(s) at level(s) not seen "
                    f"when fitting, e.g. {list(labels)}; pass allow_new_levels=True to predict them at the "
                    "prior mean"
                )
            mean = np.asarray(m.q.term_moments(m.spec, m.params.blocks, k)[0])
            effect = np.where(unseen[:, None], 0.0, mean[np.where(unseen, 0, codes)])
            pred = pred + np.sum(cov * effect, axis=1)
    if type == "response":
        pred = np.asarray(m.likelihood.inverse_link(pred), np.float64)
    out[~bad] = pred
    return out


def new_offset(info, data: pd.DataFrame) -> np.ndarray | float:
    """The offset of new rows (lme4's ``predict`` reads it from ``newdata``): the formula's ``offset(...)``
    terms and the ``offset=`` column evaluated there; ``0.0`` for a model without one.

    Raises:
        ValueError: for a model whose ``offset=`` was an array (there is no column to read in new rows).
    """
    exprs = list(info.formula.offsets)
    if info.offset_column == OFFSET_COLUMN and OFFSET_COLUMN not in data.columns:
        raise ValueError("the model's offset= was an array, which new rows cannot repeat: fit with offset= a column "
                         f"name, or give newdata a column {OFFSET_COLUMN!r}")
    if info.offset_column is not None:
        exprs.append(info.offset_column)
    total = 0.0
    for expr in exprs:
        total = total + evaluate(expr, data, "the offset")
    return total
