"""New data for a fitted design (``predict``, ``emmeans``' reference grids): the columns a model needs, its fixed-effects
matrix and each random term's level codes for rows it has not seen, in the fit's own encoding.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


from lmevi.frame.rsyntax import CONTEXT, clean_error
from lmevi.frame.design import DesignInfo, TermInfo, _formula_columns, design_frame
from lmevi.frame.matrix import PlainSpec


def new_frame(info: DesignInfo, data, with_groups: bool = True) -> pd.DataFrame:
    """New rows as the pandas frame :func:`new_data_columns` and the encoders read: ``data`` itself if it is one,
    else the columns the predictors use, from any frame narwhals reads (:mod:`lmevi.frame.columns`)."""
    return design_frame(info.formula, data, "newdata", with_response=False, with_groups=with_groups)


def new_data_columns(info: DesignInfo, data: pd.DataFrame, with_groups: bool = True) -> list[str]:
    """Check new rows for prediction (a pandas DataFrame: :func:`new_frame` reads others): a DataFrame with unique column names that has every column the
    formula's predictors read, numbers where the fit saw numbers. Returns those columns.

    Raises:
        ValueError: naming the missing columns, or a column whose values are not numeric.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"newdata must be a pandas DataFrame, got {type(data).__name__}")
    duplicated = sorted({str(c) for c in data.columns[data.columns.duplicated()]})
    if duplicated:
        raise ValueError(f"newdata has more than one column named {duplicated}; column names must be unique")
    needed = _formula_columns(info.formula, with_response=False, with_groups=with_groups)
    missing = [c for c in needed if c not in data.columns]
    if missing:
        raise ValueError(f"newdata lacks the column(s) {missing} that the model's predictors use")
    for c in needed:
        col = data[c]
        if c in info.numeric_columns and (
            not pd.api.types.is_numeric_dtype(col) or isinstance(col.dtype, pd.CategoricalDtype)
        ):
            raise ValueError(
                f"column {c!r} was numeric when fitting but is {col.dtype} in newdata "
                f"(e.g. {list(pd.unique(col.dropna()))[:3]}); pass numbers"
            )
    return needed


def fixed_matrix(info: DesignInfo, data: pd.DataFrame) -> np.ndarray:
    """``(n_new, p)`` fixed-effects design of new rows, encoded as at fit time.

    Raises:
        ValueError: naming a fixed-effect factor's levels that the fit never saw (lme4 refuses them too:
            such a row has no coefficient to predict with).
    """
    if isinstance(info.fixed_spec, PlainSpec):  # numbers only: no levels to check, no formula engine
        return info.fixed_spec.get_model_matrix(data)[:, list(info.fixed_keep)]
    from formulaic.errors import DataMismatchWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataMismatchWarning)
        try:
            mm = info.fixed_spec.get_model_matrix(data, context=CONTEXT, na_action="ignore")
        except Exception as err:
            raise ValueError(f"cannot build the fixed effects of newdata: {clean_error(err)}") from None
    for w in caught:
        if issubclass(w.category, DataMismatchWarning):
            raise ValueError(
                "newdata has level(s) of a fixed-effect factor that the fit never saw: "
                f"{clean_error(w.message).split(':', 1)[-1].split('. They')[0].strip()}; a fixed effect of an "
                "unseen level cannot be estimated (drop those rows, or refit with them)"
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return np.asarray(mm, dtype=np.float64)[:, list(info.fixed_keep)]


def term_rows(term: TermInfo, data: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Level codes and covariates of new rows for one fitted term.

    Returns:
        ``(codes (n_new,), covariates (n_new, p_k))``; a code is -1 where the level was not seen at fit time.
    """
    codes = term.level_keys.codes(data, term.group_columns)
    try:
        cov = term.coef_spec.get_model_matrix(data, context=CONTEXT, na_action="ignore")
    except Exception as err:
        raise ValueError(f"cannot build the covariates of {term.coef_formula!r} for newdata: {clean_error(err)}") from None
    return codes.astype(np.int64), np.asarray(cov, dtype=np.float64)


def row_labels(term: TermInfo, data: pd.DataFrame) -> np.ndarray:
    """``(n_new,)`` each new row's level of ``term`` as lme4 prints it (for messages)."""
    return term.level_keys.row_labels(data, term.group_columns)
