"""Estimated marginal means (R's ``emmeans``) of a fit's fixed part, and their pairwise differences.

The reference grid (Lenth 2016, ``ref_grid``) holds every combination of the levels of the factors the fixed
part reads, with each numeric covariate at its mean over the fitted rows. The grid is encoded by the model's
own new-data encoding (:func:`lmevi.frame.newdata.fixed_matrix`), so contrasts and transformations (``log(x)``,
``ordered(A)``) are the model's. The marginal mean of a level of ``specs`` is the equally weighted average of
the grid rows at that level (emmeans' default ``weights = "equal"``): a row ``l`` ``(p,)`` with
``estimate = l beta`` and ``std_error = sqrt(l V l')``.

Degrees of freedom come from a callable ``ddf_fn(L) -> float`` (``L`` ``(1, p)``), as in
:func:`lmevi.result.hypotheses.contest`; without one they are infinite (emmeans' ``z`` tests and asymptotic
intervals of a ``glmer``).
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats

from lmevi.frame.matrix import PlainSpec
from lmevi.frame.newdata import fixed_matrix
from lmevi.result.hypotheses import fitted_rows, contest
from lmevi.frame.labels import level_label

ADJUST = ("none", "tukey", "bonferroni", "holm", "sidak", "scheffe")


def grid_variables(fit) -> tuple[list[str], list[str]]:
    """``(factors, covariates)``: the data columns the fixed part reads, split into those it reads as levels
    (a non-numeric, boolean or Categorical column, or one read through a categorical expression such as
    ``factor(g)``) and the numeric ones, each in the order the formula reads them."""
    spec, data = fit.info.fixed_spec, fit.data
    if isinstance(spec, PlainSpec):
        return [], list(spec.columns)
    order, categorical = [], set()
    for factor in spec.factors:
        kind, _ = spec.encoder_state.get(str(factor.expr), (None, None))
        for c in sorted(factor.required_variables):
            if c not in data.columns:
                continue
            if c not in order:
                order.append(c)
            if getattr(kind, "value", kind) == "categorical":
                categorical.add(c)
    factors = [c for c in order if c in categorical or _is_factor_column(data[c])]
    return factors, [c for c in order if c not in factors]


def _is_factor_column(col: pd.Series) -> bool:
    return (isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(col)
            or not pd.api.types.is_numeric_dtype(col))


def _levels(col: pd.Series) -> list:
    """A factor column's levels that occur, in R's order (a Categorical's category order, else sorted)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        seen = set(col.dropna())
        return [c for c in col.dtype.categories if c in seen]
    return sorted(pd.unique(col.dropna()))


def reference_grid(fit, specs=None) -> pd.DataFrame:
    """emmeans' reference grid of a fit: every combination of the factors' levels (the first factor varying
    fastest, as R's ``expand.grid``), every numeric covariate at its mean over the fitted rows.

    Args:
        fit: a fit with ``info`` and ``data`` (:class:`lmevi.result.fitresult.FitResult`).
        specs: optional factor name(s), checked to be factors of the grid.

    Returns:
        ``(n_grid, n_columns)`` one row per grid point, columns as in the data (Categoricals keep their
        categories), ready for :func:`lmevi.frame.newdata.fixed_matrix`.
    """
    data = fitted_rows(fit.info, fit.data)
    factors, covariates = grid_variables(fit)
    _check_specs(_as_list(specs), factors)
    levels = [_levels(data[c]) for c in factors]
    combos = list(itertools.product(*reversed(levels))) if factors else [()]
    grid = pd.DataFrame({c: [combo[len(factors) - 1 - i] for combo in combos] for i, c in enumerate(factors)},
                        index=pd.RangeIndex(len(combos)))
    for c in factors:
        if isinstance(data[c].dtype, pd.CategoricalDtype):
            grid[c] = pd.Categorical(grid[c], dtype=data[c].dtype)
        else:
            grid[c] = grid[c].astype(data[c].dtype)
    for c in covariates:
        grid[c] = float(np.mean(data[c].to_numpy(dtype=np.float64)))
    return grid


def emmeans_matrix(fit, specs) -> tuple[np.ndarray, pd.Index]:
    """``(L (m, p), index)``: one row per level combination of ``specs`` (the first varying fastest), the
    equally weighted mean of the encoded grid rows at that combination."""
    specs = _as_list(specs)
    grid = reference_grid(fit, specs)
    X = fixed_matrix(fit.info, grid)
    keys = [tuple(level_label(v) for v in row) for row in grid[specs].itertuples(index=False)]
    data = fitted_rows(fit.info, fit.data)
    combos = list(itertools.product(*reversed([[level_label(v) for v in _levels(data[c])] for c in specs])))
    combos = [tuple(reversed(c)) for c in combos]
    rows = [X[[k == combo for k in keys]].mean(axis=0) for combo in combos]
    if len(specs) == 1:
        index = pd.Index([c[0] for c in combos], name=specs[0])
    else:
        index = pd.MultiIndex.from_tuples(combos, names=specs)
    return np.asarray(rows), index


def emmeans(fit, specs, pairs: bool = False, adjust: str = "none", level: float = 0.95,
            ddf_fn: Callable[[np.ndarray], float] | None = None, vcov=None) -> pd.DataFrame:
    """R's ``emmeans(m, specs)`` (``pairs=False``) or ``pairs(emmeans(m, specs), adjust = ...)``.

    Args:
        fit: a fit with ``info``, ``data``, ``fixef()`` and ``vcov()``.
        specs: a factor name, or several.
        pairs: return the pairwise differences of the marginal means instead of the means.
        adjust: the multiplicity adjustment of the pairs' p values: ``"none"`` (default here; emmeans'
            default for pairs is ``"tukey"``), ``"tukey"`` (studentized range), ``"bonferroni"``, ``"holm"``,
            ``"sidak"`` or ``"scheffe"``.
        level: the confidence level of the means' intervals.
        ddf_fn: ``ddf_fn(L (1, p)) -> float``, the degrees of freedom of one estimate; ``None``: infinite.
        vcov: ``(p, p)`` the coefficients' covariance to use instead of ``fit.vcov()``: R's emmeans takes
            Kenward-Roger's adjusted covariance (pbkrtest's ``vcovAdj``) with its Kenward-Roger dfs, which
            changes the standard errors of unbalanced designs (by 0.8 % on ``npk`` with three rows dropped).

    Returns:
        Columns ``estimate, std_error, df, lower, upper, t, p`` (``summary(..., infer = TRUE)``; ``t`` a z
        ratio when ``df`` is infinite). Means: indexed by level. Pairs: indexed as emmeans writes them
        (``"Golden Rain - Marvellous"``, levels of several factors joined by a space); ``p`` and the interval
        adjusted by ``adjust`` as emmeans adjusts them.
    """
    if adjust not in ADJUST:
        raise ValueError(f"adjust must be one of {ADJUST}, got {adjust!r}")
    L, index = emmeans_matrix(fit, specs)
    beta = fit.fixef().to_numpy(dtype=np.float64)
    V = np.asarray(fit.vcov() if vcov is None else vcov, dtype=np.float64)
    if pairs:
        labels = _pair_labels(index, specs)
        pairs_ij = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
        L = np.asarray([L[i] - L[j] for i, j in pairs_ij]).reshape(-1, L.shape[1])
        index = pd.Index([f"{labels[i]} - {labels[j]}" for i, j in pairs_ij], name="contrast")
    rows = [contest(l, beta, V, ddf_fn) for l in L]
    out = pd.DataFrame(rows, index=index)[["estimate", "std_error", "df", "t", "p"]]
    n_means = len(labels) if pairs else len(out)
    half = _critical(adjust if pairs else "none", level, out["df"].to_numpy(), n_means, len(out)) * out["std_error"]
    out.insert(3, "lower", out["estimate"] - half)
    out.insert(4, "upper", out["estimate"] + half)
    if pairs:
        out["p"] = adjust_p(out["p"].to_numpy(), out["t"].to_numpy(), out["df"].to_numpy(), adjust, n_means)
    return out


def _pair_labels(index: pd.Index, specs) -> list[str]:
    """Each mean's label in emmeans' pairs: its levels joined by a space, a level that reads as a number
    prefixed by its factor's name (emmeans writes ``N0 - N1``, not ``0 - 1``)."""
    names = _as_list(specs)

    def one(key) -> str:
        key = key if isinstance(key, tuple) else (key,)
        return " ".join(f"{n}{v}" if _is_number(str(v)) else str(v) for n, v in zip(names, key))

    return [one(k) for k in index]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _critical(adjust: str, level: float, df: np.ndarray, n_means: int, m: int) -> np.ndarray:
    """The multiplier of the standard error in emmeans' intervals of ``m`` estimates under ``adjust``
    (``holm`` intervals are Bonferroni's, as emmeans')."""
    if adjust == "tukey":
        return stats.studentized_range.ppf(level, n_means, df) / np.sqrt(2.0)
    if adjust == "scheffe":
        r = n_means - 1
        return np.sqrt(r * stats.f.ppf(level, r, df))
    if adjust in ("bonferroni", "holm"):
        return stats.t.ppf(1.0 - (1.0 - level) / (2.0 * m), df)
    if adjust == "sidak":
        return stats.t.ppf(0.5 + level ** (1.0 / m) / 2.0, df)
    return stats.t.ppf(0.5 + level / 2.0, df)


def adjust_p(p: np.ndarray, t: np.ndarray, df: np.ndarray, adjust: str, n_means: int) -> np.ndarray:
    """The ``(m,)`` p values of ``m`` pairwise comparisons among ``n_means`` means, adjusted as emmeans does.

    ``tukey``: ``P(Q > sqrt(2) |t|)`` with ``Q`` the studentized range of ``n_means`` means on ``df``;
    ``scheffe``: ``P(F > t^2 / r)`` with ``r = n_means - 1`` and ``F ~ F(r, df)``; ``sidak``:
    ``1 - (1 - p)^m``; ``bonferroni``: ``min(1, m p)``; ``holm``: Holm's step-down.
    """
    m = len(p)
    if adjust == "none" or m == 0:
        return p
    if adjust == "tukey":
        return stats.studentized_range.sf(np.sqrt(2.0) * np.abs(t), n_means, df)
    if adjust == "scheffe":
        r = n_means - 1
        return stats.f.sf(t**2 / r, r, df)
    if adjust == "sidak":
        return 1.0 - (1.0 - p) ** m
    if adjust == "bonferroni":
        return np.minimum(1.0, m * p)
    order = np.argsort(p)  # holm
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(1.0, stepped)
    return out


def _as_list(specs) -> list[str]:
    if specs is None:
        return []
    return [specs] if isinstance(specs, str) else list(specs)


def _check_specs(specs: list[str], factors: list[str]) -> None:
    bad = [s for s in specs if s not in factors]
    if bad:
        raise ValueError(f"{bad} are not factors of the fixed part (its factors: {factors})")
