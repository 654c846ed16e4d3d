"""Design stage: a parsed formula and a DataFrame become immutable arrays (no dense Z anywhere).

For random term k with ``J_k`` levels and ``p_k`` coefficients per level, row i of the (never formed)
matrix ``Z_k`` is the covariate row ``z_ik`` placed in the slot of level ``g_k(i)``. We store the index
``g_k`` ``(n_obs,)`` and the covariates ``z_k`` ``(n_obs, p_k)`` (a column of ones for ``(1 | g)``), as
MixedModels.jl keeps ``refs`` and lme4 keeps ``Ztlist`` in sparse form.

Levels: the levels that occur in the data, in R's order (a ``Categorical``'s category order, sorted
numbers, sorted strings), unused categories dropped as lme4 drops them; labels follow :mod:`lmevi.frame.labels`
(one rule for fit, ``predict``, ``ranef`` and the export). A level of an interaction ``a:b`` is the pair
of its parents' labels, shown as ``"<a label>:<b label>"``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd


from lmevi.runtime.precision import RowBuffers, host_array
from lmevi.frame.columns import formula_frame
from lmevi.frame.formula import Formula, RandomTerm
from lmevi.runtime.collective import LOCAL, Local
from lmevi.frame.labels import Levels, levels_of
from lmevi.runtime.options import user_stacklevel
from lmevi.frame.rsyntax import clean_error, lme4_name, plain_terms, required_columns
from lmevi.frame.matrix import PlainSpec, _design_matrix, column_sd
from lmevi.frame.prior import attach_columns, evaluate, read_prior, response_columns


@partial(jax.tree_util.register_dataclass, data_fields=["index", "covariates"], meta_fields=["n_levels", "unit"])
@dataclass(frozen=True)
class TermData:
    """Arrays of one random term.

    Attributes:
        index: ``(n_obs,)`` int32 level code ``g_k(i)`` of every row.
        covariates: ``(n_obs, p_k)`` per-row covariates ``z_ik`` of the term's coefficients.
        n_levels: ``J_k``, the number of levels (static).
        unit: (static) the covariates are one column that is 1 on every observed row and 0 on every padding
            row, i.e. the row weight: an intercept-only term ``(1 | g)`` in standardised units. The sweeps then
            skip reading them where the other factor is already 0 on padding rows
            (:func:`lmevi.q.moments.weighted_level_sums`) or share one read among such terms
            (:func:`lmevi.q.moments.block_mean`). ``False`` is always correct.
    """

    index: jax.Array
    covariates: jax.Array
    n_levels: int
    unit: bool = False


@partial(jax.tree_util.register_dataclass, data_fields=["y", "X", "terms", "weights", "offset"], meta_fields=[])
@dataclass(frozen=True)
class Design:
    """Everything the log joint needs, as arrays.

    Attributes:
        y: ``(n_obs,)`` response (a binomial ``cbind`` response: the proportions).
        X: ``(n_obs, p)`` fixed-effects design matrix.
        terms: one :class:`TermData` per random term.
        weights: ``(n_obs,)`` prior weights (R's ``weights``; times the trials of a binomial ``cbind``
            response), or ``None``: all 1, and no array (:mod:`lmevi.frame.prior`). Padding rows: 0.
        offset: ``(n_obs,)`` added to the linear predictor, or ``None``: all 0, and no array. Padding rows: 0.
    """

    y: jax.Array
    X: jax.Array
    terms: tuple[TermData, ...]
    weights: jax.Array | None = None
    offset: jax.Array | None = None


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
        level_keys: the levels' identities (:class:`lmevi.frame.labels.Levels`): new rows are matched on these,
            never on the joined label.
    """

    group: str
    group_columns: tuple[str, ...]
    coef_formula: str
    coef_names: tuple[str, ...]
    levels: tuple[str, ...]
    counts: tuple[int, ...]
    coef_spec: object = field(repr=False, compare=False)
    level_keys: Levels = field(default=None, repr=False, compare=False)

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
        n_obs: number of rows the model was fitted to.
        fixed_keep: positions, among formulaic's columns, of the fixed effects kept (aliased ones dropped).
        dropped_fixed: names of fixed-effect columns dropped as linearly dependent on earlier ones.
        rows: index labels of the data rows used (after ``missing="drop"``), in the caller's order.
        numeric_columns: the columns the formula reads as numbers (new data must give numbers there too).
        offset_column: the column of ``offset=`` (``"(offset)"`` when an array was given), or ``None``.
    """

    formula: Formula
    fixed_names: tuple[str, ...]
    terms: tuple[TermInfo, ...]
    n_obs: int
    fixed_spec: object = field(repr=False, compare=False)
    fixed_keep: tuple[int, ...] = ()
    dropped_fixed: tuple[str, ...] = ()
    rows: object = field(default=None, repr=False, compare=False)
    numeric_columns: tuple[str, ...] = ()
    offset_column: str | None = None


def build_design(
    formula: Formula, data: pd.DataFrame, dtype=jnp.float64, missing: str = "raise", collective: Local = LOCAL,
    buffers: RowBuffers | None = None, encode_response=None, dispersion: bool = True, weights=None, offset=None,
) -> tuple[Design, DesignInfo]:
    """Check ``data`` against ``formula`` and build the arrays of the model.

    Args:
        formula: a parsed formula.
        data: one row per observation: a pandas DataFrame, or a polars or pyarrow one (any that narwhals
            reads), of which only the formula's columns are read (:func:`design_frame`).
        dtype: float dtype of ``y``, ``X`` and the covariates.
        missing: ``"raise"`` (default) stops on NA or inf in a column the formula uses; ``"drop"`` drops
            those rows (only those columns count) with a warning saying how many.
        collective: :data:`lmevi.runtime.collective.LOCAL`, or the processes of a multi-process fit, each with its
            own rows of ``data``: levels, counts, checks and ``n_obs`` are then those of all processes' rows,
            and the arrays hold this process's rows coded with the global levels.
        buffers: where the fixed-effects matrix, covariates and level codes are made with their padding rows
            (:class:`lmevi.runtime.precision.RowBuffers`, which then decides the padded row count, here), so that
            standardising them needs no copy; ``None``: plain arrays.
        encode_response: the likelihood's ``encode(column, name)`` (:mod:`lmevi.families.base`), which reads a
            response column that is not numeric (the binomial's two levels); ``None``: numbers only.
        dispersion: the likelihood has a residual variance (the Gaussian). Without one (Poisson, binomial) a
            grouping factor may have a level per row (an observation-level random effect, as in lme4's
            ``grouseticks`` example): only more random effects than rows is refused.
        weights, offset: R's prior weights and offset, a column name or one number per row, or ``None``
            (:mod:`lmevi.frame.prior`, which also reads a ``cbind`` response and ``offset(...)`` terms).

    Returns:
        ``(design, info)``.

    Raises:
        ValueError: naming the column or term, for a missing column, a non-numeric or constant response,
            NA or inf in a used column, an empty frame, a grouping factor with fewer than two levels or as
            many levels as rows, or a term with at least as many random effects as rows.
    """
    data = design_frame(formula, data, extra=(weights, offset))
    if missing not in ("raise", "drop"):
        raise ValueError(f"missing must be 'raise' or 'drop', got {missing!r}")
    if len(data) == 0:
        raise ValueError("data is empty: the model needs at least one row")
    duplicated = sorted({str(c) for c in data.columns[data.columns.duplicated()]})
    if duplicated:
        raise ValueError(f"the data has more than one column named {duplicated}; column names must be unique")
    data, weights, offset = attach_columns(data, weights, offset)
    columns = _check_columns(formula, data) + [c for c in (weights, offset) if c is not None]
    data = _handle_missing(data, columns, missing)
    prior = read_prior(formula, data, weights, offset)
    n_obs = int(collective.sum(len(data)))
    if buffers is not None:
        buffers.n_rows(len(data))  # every process at this point (the count may be a collective's)
    # float matrices go into buffers only in a float64 design: a float32 design rounds them into a copy, and a
    # buffer held meanwhile would keep the float64 matrix alive (at 1e8 rows 1.6 GB of peak memory)
    float_buffers = buffers if np.dtype(dtype) == np.float64 else None
    y = prior.response if prior.response is not None else _response(formula.response, data, collective,
                                                                      encode_response)
    X, fixed_names, fixed_spec, keep, dropped = _fixed(formula.fixed, data, collective, float_buffers)
    terms, infos = [], []
    ones: dict = {}  # the intercept column, built once for every intercept-only term
    for term in formula.random:
        td, ti = _random_term(term, data, dtype, collective, n_obs, ones, buffers, float_buffers, dispersion)
        terms.append(td)
        infos.append(ti)
    _check_shared_factors(formula.random, infos, terms, collective)
    # host (NumPy) arrays: standardising and padding happen on the host, and lmevi.fitting.build.make_problem copies
    # the final arrays to the device once
    design = Design(y=host_array(y, dtype), X=host_array(X, dtype), terms=tuple(terms),
                    weights=None if prior.weights is None else host_array(prior.weights, dtype),
                    offset=None if prior.offset is None else host_array(prior.offset, dtype))
    numeric = tuple(
        c for c in columns
        if pd.api.types.is_numeric_dtype(data[c]) and not isinstance(data[c].dtype, pd.CategoricalDtype)
        and not pd.api.types.is_bool_dtype(data[c]) and c not in formula.columns
    )
    info = DesignInfo(
        formula=formula, fixed_names=fixed_names, terms=tuple(infos), n_obs=n_obs, fixed_spec=fixed_spec,
        fixed_keep=keep, dropped_fixed=dropped, rows=data.index, numeric_columns=numeric, offset_column=offset,
    )
    return design, info


def design_frame(formula: Formula, data, what: str = "data", with_response: bool = True,
                 with_groups: bool = True, extra=()) -> pd.DataFrame:
    """``data`` as the pandas frame the design stage reads: itself if it is one, else only the formula's columns
    and the ``extra`` ones (``weights=`` and ``offset=`` given as column names) (:func:`lmevi.frame.columns.formula_frame`)."""
    columns = _formula_columns(formula, with_response, with_groups)
    return formula_frame(data, list(dict.fromkeys(columns + [c for c in extra if isinstance(c, str)])), what)


def _formula_columns(formula: Formula, with_response: bool = True, with_groups: bool = True) -> list[str]:
    """The data columns the formula reads, in order, each once: the response's, the grouping columns, the
    fixed part's and the random terms' covariates (without the response or the grouping columns if asked)."""
    needed = response_columns(formula.response) if with_response else []
    parts = [formula.fixed, *formula.offsets]
    if with_groups:
        needed += list(formula.columns)
        parts += [t.coefs for t in formula.random]
    for part in parts:
        needed.extend(sorted(required_columns(part)))
    return list(dict.fromkeys(needed))


def _check_columns(formula: Formula, data: pd.DataFrame) -> list[str]:
    """The columns the formula reads; raises if any is absent."""
    needed = _formula_columns(formula)
    missing = [c for c in needed if c not in data.columns]
    if missing:
        raise ValueError(
            f"the formula uses column(s) {missing} that the data does not have "
            f"(available: {list(data.columns)[:20]})"
        )
    return needed


def incomplete_rows(data: pd.DataFrame, columns) -> tuple[np.ndarray, dict[str, int]]:
    """Rows with NA (or inf, in numeric columns) in any of ``columns``.

    Returns:
        ``(bad (n,) bool, {column: number of bad rows})`` listing only columns with bad rows.
    """
    bad_rows = np.zeros(len(data), dtype=bool)
    per_column = {}
    for c in columns:
        col = data[c]
        kind = col.dtype.kind if isinstance(col.dtype, np.dtype) else None
        if kind in ("i", "u", "b"):  # NumPy integers and booleans hold no NA and no inf: no pass over the rows
            continue
        if kind == "f":  # NaN is NumPy's float NA: one pass finds both
            bad = ~np.isfinite(col.to_numpy())
        elif isinstance(col.dtype, pd.CategoricalDtype):
            bad = col.array.codes < 0  # the Categorical's own codes (Series.cat.codes copies them)
        else:
            bad = col.isna().to_numpy()
            if pd.api.types.is_numeric_dtype(col):
                bad = bad | ~np.isfinite(col.to_numpy(dtype=np.float64, na_value=0.0))
        if bad.any():
            per_column[c] = int(bad.sum())
            bad_rows |= bad
    return bad_rows, per_column


def _handle_missing(data: pd.DataFrame, columns, missing: str) -> pd.DataFrame:
    bad_rows, per_column = incomplete_rows(data, columns)
    if not per_column:
        return data
    n_bad = int(bad_rows.sum())
    detail = ", ".join(f"{c!r}: {k}" for c, k in per_column.items())
    if missing == "raise":
        raise ValueError(
            f"{n_bad} row(s) have missing or infinite values in the columns the formula uses ({detail}); "
            f"drop them first (data.dropna(subset={list(per_column)})) or pass missing='drop'"
        )
    if n_bad == len(data):
        raise ValueError(f"every row has a missing or infinite value in the formula's columns ({detail})")
    warnings.warn(f"dropped {n_bad} of {len(data)} rows with missing or infinite values ({detail})",
                  stacklevel=user_stacklevel())
    return data.loc[~bad_rows]


def _response(expr: str, data: pd.DataFrame, collective: Local = LOCAL, encode=None) -> np.ndarray:
    encoded = None if encode is None or expr not in data.columns else encode(data[expr], expr)
    if encoded is not None:
        y = encoded
    elif expr in data.columns and pd.api.types.is_bool_dtype(data[expr]):
        raise ValueError(f"the response {expr!r} is boolean; a linear mixed model needs a numeric response")
    else:  # a numeric column, or an expression of columns (log(y), y / n)
        y = evaluate(expr, data, "the response")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"the response {expr!r} has non-finite values (e.g. log of a non-positive number)")
    lo, hi = float(collective.min(np.min(y))), float(collective.max(np.max(y)))
    if hi - lo == 0 or hi - lo <= 1e-12 * max(abs(lo), abs(hi)):
        raise ValueError(
            f"the response {expr!r} is constant ({y[0]:g}, to 12 significant digits); there is no variation to model"
        )
    return y


def _fixed(rhs: str, data: pd.DataFrame, collective: Local = LOCAL, buffers: RowBuffers | None = None):
    """Fixed-effects matrix, with columns aliased on earlier ones dropped (lme4 does this by pivoted QR)."""
    try:
        X, columns, spec = _design_matrix(rhs, data, collective, buffers)
    except Exception as err:  # formulaic's own errors are detailed but long; keep the first line
        raise ValueError(f"cannot build the fixed effects {rhs!r}: {clean_error(err)}") from None
    names = [lme4_name(c) for c in columns]
    keep, aliased = _independent_columns(X, collective=collective)
    dropped = tuple(names[i] for i in aliased)
    if dropped:
        warnings.warn(
            f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column(s) / "
            f"coefficient(s): {list(dropped)}",
            stacklevel=user_stacklevel(),
        )
    X = X if len(keep) == X.shape[1] else X[:, keep]
    _check_scales(X, [names[i] for i in keep], collective)
    return X, tuple(names[i] for i in keep), spec, tuple(keep), dropped


def _independent_columns(X: np.ndarray, tol: float = 1e-9, collective: Local = LOCAL) -> tuple[list[int], list[int]]:
    """``(kept, aliased)`` column positions of ``X``, in order: a column is aliased when it lies (to ``tol``,
    relative) in the span of the kept columns before it, as lme4's pivoted QR drops the later of two aliased
    columns."""
    if X.shape[1] == 0:
        return [], []
    G = collective.sum(X.T @ X)  # one BLAS pass over the rows; the columns' norms are its diagonal
    scale = np.sqrt(np.diag(G)).copy()
    scale[scale == 0] = 1.0
    G = G / np.outer(scale, scale)
    keep: list[int] = []
    for j in range(X.shape[1]):
        g = G[keep, j]
        resid = G[j, j] - (g @ np.linalg.solve(G[np.ix_(keep, keep)], g) if keep else 0.0)
        if resid > tol * max(G[j, j], 1e-300):
            keep.append(j)
    return keep, [j for j in range(X.shape[1]) if j not in keep]


def _check_scales(X: np.ndarray, names: list[str], collective: Local = LOCAL) -> None:
    """Warn when the SDs of two predictors differ more than 1000-fold (lme4 checks the same). The intercept is
    left out, and with fewer than two other columns there is nothing to compare and no pass over the rows."""
    columns = [j for j, name in enumerate(names) if name != "(Intercept)"]
    if len(columns) < 2:
        return
    sd = np.zeros(len(names))
    sd[columns] = column_sd(X, collective, columns)
    varying = sd > 0
    if varying.sum() >= 2 and sd[varying].max() / sd[varying].min() > 1e3:
        big = names[int(np.argmax(np.where(varying, sd, -np.inf)))]
        small = names[int(np.argmin(np.where(varying, sd, np.inf)))]
        warnings.warn(
            f"some predictors are on very different scales (SD of {big!r} is "
            f"{sd[varying].max() / sd[varying].min():.3g} times that of {small!r}): consider rescaling",
            stacklevel=user_stacklevel(),
        )


def _random_term(
    term: RandomTerm, data: pd.DataFrame, dtype, collective: Local = LOCAL, n_obs: int | None = None,
    ones: dict | None = None, buffers: RowBuffers | None = None, float_buffers: RowBuffers | None = None,
    dispersion: bool = True,
) -> tuple[TermData, TermInfo]:
    """The arrays and labels of one random term. ``ones``: a dict shared by the terms of one design, where the
    covariates of intercept-only terms are kept, so that they share one read-only view of a single 1.0 (a
    column of ones would be 80 MB of fresh memory at 1e7 rows). ``buffers``: as :func:`build_design`'s, for the
    level codes; ``float_buffers``: the same or ``None``, for the covariates."""
    # Long: the checks of one random term (levels, covariates, counts against the rows) read its intermediate
    # arrays in turn, each with an error message naming the term; split apart they would pass them all around.
    n_obs = len(data) if n_obs is None else n_obs
    if collective.distributed:
        levels = global_levels(data, term.group, collective)
        codes = levels.codes(data, term.group)
        counts = collective.sum(np.bincount(codes, minlength=len(levels)))
    else:
        levels, codes, counts = levels_of(data, term.group)
    used = len(levels)
    if used < 2:
        raise ValueError(
            f"the grouping factor {term.group_name!r} of {term.text} has {used} level "
            "in the data; a random effect needs at least two"
        )
    if used >= n_obs and dispersion:
        raise ValueError(
            f"the grouping factor {term.group_name!r} of {term.text} has as many levels ({used}) as there are "
            "rows: its variance cannot be told apart from the residual variance"
        )
    clashes = _label_clashes(levels)
    if clashes:
        warnings.warn(
            f"the grouping factor {term.group_name!r} has distinct levels that print alike ({clashes[:3]}): "
            "they are fitted as different levels, but tables will show the same label more than once",
            stacklevel=user_stacklevel(),
        )
    intercept_only = plain_terms(term.coefs) == (True, ())
    if intercept_only:
        # the column of ones as a read-only view of one value (no 80 MB array at 1e7 rows): it is the row
        # weight (unit), which standardising neither scans nor reads; shared by every intercept-only term
        if ones is None or "cov" not in ones:
            spec = PlainSpec(True, ())
            cov = np.broadcast_to(np.ones((1, 1), np.dtype(dtype)), (len(data), 1))
            ones = {} if ones is None else ones
            ones["cov"] = (cov, list(spec.column_names), spec)
        cov, columns, coef_spec = ones["cov"]
    else:
        try:
            cov, columns, coef_spec = _design_matrix(term.coefs, data, collective, float_buffers)
        except Exception as err:
            raise ValueError(f"cannot build the covariates of {term.text}: {clean_error(err)}") from None
    if cov.shape[1] == 0:
        raise ValueError(f"the random term {term.text} has no coefficients")
    coef_names = tuple(lme4_name(c) for c in columns)
    # a column of ones is never aliased
    keep, aliased = ([0], []) if intercept_only else _independent_columns(cov, collective=collective)
    if aliased:
        bad = [coef_names[j] for j in aliased]
        raise ValueError(
            f"the covariates of the random term {term.text} are linearly dependent: {bad} "
            f"{'is a linear combination' if len(bad) == 1 else 'are linear combinations'} of "
            f"{[coef_names[j] for j in keep]}, so their variances and correlations are not identified; "
            "drop the dependent column(s) from the term"
        )
    # with a residual variance, as many random effects as rows is already too many; without one (Poisson,
    # binomial) a level per row is an observation-level effect, and only more effects than rows is refused
    too_many = used * cov.shape[1] >= n_obs if dispersion else used * cov.shape[1] > n_obs
    if too_many:
        raise ValueError(
            f"the random term {term.text} has {used * cov.shape[1]} random effects for {n_obs} rows: "
            f"with {'at least as many random effects as' if dispersion else 'more random effects than'} "
            "observations the model is not identifiable"
        )
    info = TermInfo(
        group=term.group_name,
        group_columns=term.group,
        coef_formula=term.coefs,
        coef_names=coef_names,
        levels=levels.labels,
        counts=tuple(np.asarray(counts).tolist()),
        coef_spec=coef_spec,
        level_keys=levels,
    )
    # an intercept-only term's covariates are the row weight (all ones here): standardising needs no pass
    if buffers is None:
        index = host_array(codes, jnp.int32)
    else:  # narrower codes (a Categorical's int8) widen as they are written, with no int32 copy in between
        index = buffers.zeros(len(codes), (), np.int32)
        index[...] = codes
    data_ = TermData(index=index, covariates=cov if intercept_only else host_array(cov, dtype),
                     n_levels=used, unit=intercept_only)
    return data_, info


def global_levels(data: pd.DataFrame, columns: tuple[str, ...], collective: Local) -> Levels:
    """The levels of ``columns`` over every process's rows, in R's order (:func:`lmevi.frame.labels.levels_of`): each
    process contributes its distinct combinations (one row per level it holds), and the union is ordered
    as one frame of all rows would be."""
    parts = collective.gather(data[list(columns)].drop_duplicates())
    levels, _, _ = levels_of(pd.concat(parts, ignore_index=True), columns)
    return levels


def _label_clashes(levels: Levels) -> list[str]:
    if levels.distinct or len(set(levels.labels)) == len(levels.labels):  # the usual case, without counting
        return []
    return [label for label, n in collections.Counter(levels.labels).items() if n > 1]


def _check_shared_factors(random: tuple[RandomTerm, ...], infos, terms, collective: Local = LOCAL) -> None:
    """Terms on one grouping factor, as ``(1 | g) + (0 + x | g)``, must not repeat a column between them:
    ``(1 | g) + (x | g)`` would split one intercept variance in two, which the data cannot tell apart."""
    by_group: dict[frozenset, list[int]] = {}
    for k, term in enumerate(random):
        by_group.setdefault(frozenset(term.group), []).append(k)
    for ks in by_group.values():
        if len(ks) < 2:
            continue
        cov = np.concatenate([np.asarray(terms[k].covariates, dtype=np.float64) for k in ks], axis=1)
        names = [(random[k].text, name) for k in ks for name in infos[k].coef_names]
        _, aliased = _independent_columns(cov, collective=collective)
        if aliased:
            bad = [names[j] for j in aliased]
            raise ValueError(
                f"the random terms {[random[k].text for k in ks]} on one grouping factor repeat a column: "
                f"{', '.join(f'{n} of {t}' for t, n in bad)} is already in an earlier term, so the variance "
                "cannot be split between them; write each column in one term only"
            )


