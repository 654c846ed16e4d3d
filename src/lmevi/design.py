"""Design stage: a parsed formula and a DataFrame become immutable arrays (no dense Z anywhere).

For random term k with ``J_k`` levels and ``p_k`` coefficients per level, row i of the (never formed)
matrix ``Z_k`` is the covariate row ``z_ik`` placed in the slot of level ``g_k(i)``. We store the index
``g_k`` ``(n_obs,)`` and the covariates ``z_k`` ``(n_obs, p_k)`` (a column of ones for ``(1 | g)``), as
MixedModels.jl keeps ``refs`` and lme4 keeps ``Ztlist`` in sparse form.

Levels: a pandas ``Categorical`` grouping column keeps all of its categories, used or not, so that frames
split from one data set share one coding (an unused level simply keeps its prior); any other column's
levels are its sorted distinct values. Labels are strings as lme4 prints them; an interaction ``a:b``
is labelled ``"<a label>:<b label>"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from formulaic import Formula as _FormulaicFormula
from formulaic import model_matrix

from lmevi.formula import Formula, RandomTerm


@partial(jax.tree_util.register_dataclass, data_fields=["index", "covariates"], meta_fields=["n_levels"])
@dataclass(frozen=True)
class TermData:
    """Arrays of one random term.

    Attributes:
        index: ``(n_obs,)`` int32 level code ``g_k(i)`` of every row.
        covariates: ``(n_obs, p_k)`` per-row covariates ``z_ik`` of the term's coefficients.
        n_levels: ``J_k``, the number of levels (static).
    """

    index: jax.Array
    covariates: jax.Array
    n_levels: int


@partial(jax.tree_util.register_dataclass, data_fields=["y", "X", "terms"], meta_fields=[])
@dataclass(frozen=True)
class Design:
    """Everything the log joint needs, as arrays.

    Attributes:
        y: ``(n_obs,)`` response.
        X: ``(n_obs, p)`` fixed-effects design matrix.
        terms: one :class:`TermData` per random term.
    """

    y: jax.Array
    X: jax.Array
    terms: tuple[TermData, ...]


@dataclass(frozen=True)
class TermInfo:
    """Labels and bookkeeping of one random term (host side, never traced).

    Attributes:
        group: grouping factor as lme4 prints it (``"dept"``, ``"cask:batch"``).
        group_columns: the columns whose interaction groups the rows.
        coef_formula: formulaic right-hand side of the per-level covariates.
        coef_names: ``(p_k,)`` coefficient names as lme4 prints them (``"(Intercept)"``, ``"Days"``).
        levels: ``(J_k,)`` level labels; ``levels[code]`` is the label of a code.
        counts: ``(J_k,)`` number of rows at each level.
    """

    group: str
    group_columns: tuple[str, ...]
    coef_formula: str
    coef_names: tuple[str, ...]
    levels: tuple[str, ...]
    counts: tuple[int, ...]
    coef_spec: object = field(repr=False, compare=False)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_coefs(self) -> int:
        return len(self.coef_names)


@dataclass(frozen=True)
class DesignInfo:
    """Names, labels and formulaic specs that turn new data into the same arrays.

    Attributes:
        formula: the parsed formula.
        fixed_names: ``(p,)`` fixed-effect names as lme4 prints them.
        terms: one :class:`TermInfo` per random term.
        n_obs: number of rows of the data the design was built from.
    """

    formula: Formula
    fixed_names: tuple[str, ...]
    terms: tuple[TermInfo, ...]
    n_obs: int
    fixed_spec: object = field(repr=False, compare=False)


def build_design(formula: Formula, data: pd.DataFrame, dtype=jnp.float64) -> tuple[Design, DesignInfo]:
    """Check ``data`` against ``formula`` and build the arrays of the model.

    Args:
        formula: a parsed formula.
        data: one row per observation.
        dtype: float dtype of ``y``, ``X`` and the covariates.

    Returns:
        ``(design, info)``.

    Raises:
        ValueError: naming the column or term, for a missing column, a non-numeric response, NaN or inf
            in a used column, an empty frame, or a grouping factor with fewer than two levels.
    """
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: the model needs at least one row")
    _check_columns(formula, data)
    y = _response(formula.response, data)
    X, fixed_names, fixed_spec = _fixed(formula.fixed, data)
    terms, infos = [], []
    for term in formula.random:
        td, ti = _random_term(term, data, dtype)
        terms.append(td)
        infos.append(ti)
    design = Design(y=jnp.asarray(y, dtype), X=jnp.asarray(X, dtype), terms=tuple(terms))
    info = DesignInfo(
        formula=formula, fixed_names=fixed_names, terms=tuple(infos), n_obs=len(data), fixed_spec=fixed_spec
    )
    return design, info


def fixed_matrix(info: DesignInfo, data: pd.DataFrame) -> np.ndarray:
    """``(n_new, p)`` fixed-effects design of new rows, encoded as at fit time."""
    _check_finite(data, sorted(_FormulaicFormula(info.formula.fixed).required_variables))
    return np.asarray(info.fixed_spec.get_model_matrix(data), dtype=np.float64)


def term_rows(term: TermInfo, data: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Level codes and covariates of new rows for one fitted term.

    Returns:
        ``(codes (n_new,), covariates (n_new, p_k))``; a code is -1 where the label was not seen at fit time.
    """
    labels = group_labels(data, term.group_columns)
    lookup = pd.Index(term.levels)
    codes = lookup.get_indexer(labels)
    cov = np.asarray(term.coef_spec.get_model_matrix(data), dtype=np.float64)
    return codes.astype(np.int64), cov


def lme4_name(name: str) -> str:
    """A formulaic column name as lme4 prints it: ``Intercept`` -> ``(Intercept)``, ``f[T.b]`` -> ``fb``."""
    if name == "Intercept":
        return "(Intercept)"
    return name.replace("[T.", "").replace("]", "")


def _check_columns(formula: Formula, data: pd.DataFrame) -> None:
    needed = [formula.response, *formula.columns]
    for part in [formula.fixed, *(t.coefs for t in formula.random)]:
        needed.extend(sorted(_FormulaicFormula(part).required_variables))
    missing = [c for c in dict.fromkeys(needed) if c not in data.columns]
    if missing:
        raise ValueError(
            f"the formula uses column(s) {missing} that the data does not have "
            f"(available: {list(data.columns)[:20]})"
        )
    _check_finite(data, [c for c in dict.fromkeys(needed)])


def _check_finite(data: pd.DataFrame, columns) -> None:
    for c in columns:
        col = data[c]
        bad = int(col.isna().sum())
        if pd.api.types.is_numeric_dtype(col) and not isinstance(col.dtype, pd.CategoricalDtype):
            bad += int(np.isinf(col.to_numpy(dtype=np.float64, na_value=0.0)).sum())
        if bad:
            raise ValueError(
                f"column {c!r} has {bad} missing or infinite value(s); drop those rows before fitting, "
                f"e.g. data.dropna(subset=[{c!r}])"
            )


def _response(name: str, data: pd.DataFrame) -> np.ndarray:
    col = data[name]
    if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col):
        raise ValueError(f"the response {name!r} must be numeric, but its dtype is {col.dtype}")
    if pd.api.types.is_bool_dtype(col):
        raise ValueError(f"the response {name!r} is boolean; a linear mixed model needs a numeric response")
    return col.to_numpy(dtype=np.float64)


def _fixed(rhs: str, data: pd.DataFrame):
    try:
        mm = model_matrix(rhs, data, na_action="raise")
    except Exception as err:  # formulaic's own errors are detailed but long; keep the first line
        raise ValueError(f"cannot build the fixed effects {rhs!r}: {str(err).splitlines()[0]}") from None
    names = tuple(lme4_name(c) for c in mm.columns)
    return np.asarray(mm, dtype=np.float64), names, mm.model_spec


def _random_term(term: RandomTerm, data: pd.DataFrame, dtype) -> tuple[TermData, TermInfo]:
    labels = group_labels(data, term.group)
    levels = _levels(data, term.group, labels)
    codes = pd.Index(levels).get_indexer(labels)
    counts = np.bincount(codes, minlength=len(levels))
    if int((counts > 0).sum()) < 2:
        raise ValueError(
            f"the grouping factor {term.group_name!r} of {term.text} has {int((counts > 0).sum())} level "
            "in the data; a random effect needs at least two"
        )
    try:
        mm = model_matrix(term.coefs, data, na_action="raise")
    except Exception as err:
        raise ValueError(f"cannot build the covariates of {term.text}: {str(err).splitlines()[0]}") from None
    if mm.shape[1] == 0:
        raise ValueError(f"the random term {term.text} has no coefficients")
    info = TermInfo(
        group=term.group_name,
        group_columns=term.group,
        coef_formula=term.coefs,
        coef_names=tuple(lme4_name(c) for c in mm.columns),
        levels=tuple(levels),
        counts=tuple(int(c) for c in counts),
        coef_spec=mm.model_spec,
    )
    data_ = TermData(
        index=jnp.asarray(codes, jnp.int32), covariates=jnp.asarray(np.asarray(mm), dtype), n_levels=len(levels)
    )
    return data_, info


def _label_strings(col: pd.Series) -> np.ndarray:
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.astype(str).to_numpy()
    if pd.api.types.is_float_dtype(col):
        vals = col.to_numpy()
        if np.all(np.mod(vals, 1) == 0):
            return vals.astype(np.int64).astype(str)
    return col.astype(str).to_numpy()


def group_labels(data: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(f"the grouping column(s) {missing} are not in the data")
    parts = [_label_strings(data[c]) for c in columns]
    out = parts[0].astype(object)
    for p in parts[1:]:
        out = out + ":" + p.astype(object)
    return np.asarray(out, dtype=object)


def _levels(data: pd.DataFrame, columns: tuple[str, ...], labels: np.ndarray) -> list[str]:
    if len(columns) == 1:
        col = data[columns[0]]
        if isinstance(col.dtype, pd.CategoricalDtype):
            return [str(c) for c in col.cat.categories]
        uniq = pd.unique(col)
        if pd.api.types.is_numeric_dtype(col):
            uniq = np.sort(uniq)
            return list(_label_strings(pd.Series(uniq)))
        return sorted(str(u) for u in uniq)
    return sorted(set(labels.tolist()))
