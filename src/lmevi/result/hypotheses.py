"""Hypothesis matrices of the fixed-effect ANOVA tables (lmerTest's ``anova(m, type = 3)`` and ``type = 1``)
and the tests of linear hypotheses ``L beta = 0`` that read them (lmerTest's ``contest``).

Each term of the fixed part gets a ``(q_T, p)`` matrix ``L_T`` on the model's coefficients ``beta`` ``(p,)``;
its F statistic is ``F = (L b)' (L V L')^{-1} (L b) / q_T`` with ``V`` the coefficients' covariance. The
denominator degrees of freedom are not computed here: :func:`contest` takes them from a callable
``ddf_fn(L) -> float`` (Satterthwaite, Kenward-Roger), and without one it gives the asymptotic chi-square
(``glmer``-style z) tests.

Type III follows lmerTest (Kuznetsova, Brockhoff & Christensen 2017, ``extract_contrasts_type3``), which is
SAS's type III (Goodnight 1976): the hypotheses are built in treatment coding, whatever coding the formula
used, and mapped onto the model's own coefficients, so that the F statistics do not depend on the coding:

1. ``X_t`` ``(n, p_t)``: the fixed part recoded with treatment contrasts (R's rule for which factor of a term
   is coded by contrasts and which by indicators), aliased columns dropped; ``rdX`` ``(n, P)``: every term
   coded by indicators of all its cells (the over-parameterised model).
2. ``A = X_t^+ rdX`` ``(p_t, P)``; ``L = A'`` ``(P, p_t)``, rows named by cell, columns by coefficient.
3. Highest-order terms first, the columns of a term are replaced by their residuals on the columns of the
   terms that contain it (SAS's containment: more factors, the same covariates).
4. ``L_T`` is the transpose of the term's columns, on the rows whose cells are ``X_t``'s coefficients,
   mapped to the model's coding by ``X_t^+ X``.

Type I (sequential) hypotheses are the term's rows of ``D^{-1} R`` where ``X'X = R'R`` (Cholesky), i.e. of
the unit upper-triangular factor of lmerTest's ``doolittle(crossprod(X))``: each term adjusted for the terms
before it, as the sequential sums of squares of a linear model.

Where we differ from lmerTest: entries are zeroed below ``1e-10`` times the largest (R's ``zapsmall`` rounds
to 7 significant digits), and the type I factor is not zeroed below ``1e-6`` (lmerTest's ``doolittle`` zeroes
entries below that absolute size); both move an F statistic by less than ``1e-6`` relative in well-scaled
designs. Terms are named as R names them (``N:P``, ``Variety``, ``ordered(A)``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from lmevi.frame.design import DesignInfo
from lmevi.frame.matrix import PlainSpec
from lmevi.frame.newdata import fixed_matrix
from lmevi.frame.rsyntax import CONTEXT, lme4_name

# Entries of an L matrix smaller than this, relative to its largest, are rounding noise.
ZAP = 1e-10


class ModelTerm(NamedTuple):
    """One term of the fixed part.

    Attributes:
        name: as R names it (``"N:P"``).
        factors: the formula's factor expressions in the term, in order (``("N", "P")``).
        columns: positions of the term's columns among the model's coefficients ``(p,)``.
    """

    name: str
    factors: tuple[str, ...]
    columns: tuple[int, ...]


class FactorValues(NamedTuple):
    """The values of one factor expression on the data rows.

    Attributes:
        categorical: whether it is coded by levels.
        values: ``(n,)`` int level codes (categorical) or float values (numeric).
        levels: the levels, in coding order (categorical); ``()`` for a numeric factor.
    """

    categorical: bool
    values: np.ndarray
    levels: tuple = ()


# --------------------------------------------------------------------------------------- model structure


def model_terms(info: DesignInfo) -> tuple[bool, list[ModelTerm]]:
    """``(intercept, terms)`` of the fixed part, terms in the order of the model matrix (the intercept left
    out), each with the positions of its kept coefficients."""
    spec = info.fixed_spec
    kept = {j: k for k, j in enumerate(info.fixed_keep)}
    if isinstance(spec, PlainSpec):
        first = int(spec.intercept)
        terms = [ModelTerm(c, (c,), tuple(kept[j] for j in [first + i] if j in kept))
                 for i, c in enumerate(spec.columns)]
        return spec.intercept, [t for t in terms if t.columns]
    intercept, terms = False, []
    for term, idx in spec.term_indices.items():
        factors = tuple(str(f.expr) for f in term.factors if str(f.expr) != "1")
        if not factors:
            intercept = True
            continue
        cols = tuple(kept[j] for j in idx if j in kept)
        if cols:
            terms.append(ModelTerm(lme4_name(str(term)), factors, cols))
    return intercept, terms


def factor_values(info: DesignInfo, data: pd.DataFrame) -> dict[str, FactorValues]:
    """The value of every factor expression of the fixed part on ``data``'s rows: level codes (in the
    fit's level order) for a categorical one, numbers for a numeric one."""
    spec = info.fixed_spec
    if isinstance(spec, PlainSpec):
        return {c: FactorValues(False, data[c].to_numpy(dtype=np.float64)) for c in spec.columns}
    from formulaic import model_matrix

    out = {}
    for factor in spec.factors:
        expr = str(factor.expr)
        if expr == "1":
            continue
        kind, state = spec.encoder_state[expr]
        if getattr(kind, "value", kind) == "categorical":
            levels = tuple(state["contrasts"].levels if "contrasts" in state else state["categories"])
            mm = model_matrix(f"0 + C({expr}, contr.treatment, levels={list(levels)!r})", data, context=CONTEXT,
                              ensure_full_rank=False, na_action="ignore")
            dummies = np.asarray(mm, dtype=np.float64)
            out[expr] = FactorValues(True, np.argmax(dummies, axis=1), levels)
        else:
            mm = model_matrix(f"0 + {expr}", data, context=CONTEXT, na_action="ignore")
            out[expr] = FactorValues(False, np.asarray(mm, dtype=np.float64)[:, 0])
    return out


def containment(terms: list[ModelTerm], values: dict[str, FactorValues]) -> dict[str, list[str]]:
    """For each term, the terms that contain it (lmerTest's ``containment``, SAS's definition): ``F2``
    contains ``F1`` when every variable of ``F1`` is in ``F2``, ``F2`` has more, and both involve the same
    numeric covariates."""
    variables = {t.name: set(t.factors) for t in terms}
    numeric = {t.name: {f for f in t.factors if not values[f].categorical} for t in terms}

    def contains(big: str, small: str) -> bool:
        return (variables[small] <= variables[big] and len(variables[big] - variables[small]) > 0
                and numeric[small] == numeric[big])

    return {t.name: [u.name for u in terms if contains(u.name, t.name)] for t in terms}


def _coded_term(term: ModelTerm, values: dict[str, FactorValues], full: set[str]) -> tuple[np.ndarray, list]:
    """``(columns (n, m), keys)`` of one term: the row-wise products of its factors' codings, the first factor
    varying fastest (as R's ``model.matrix``). A categorical factor in ``full`` is coded by the indicators of
    all its levels, any other by treatment contrasts (its first level dropped). Keys: ``(term name, levels of
    the term's categorical factors)``."""
    n = len(next(iter(values.values())).values)
    cols, keys = np.ones((n, 1)), [()]
    for f in term.factors:
        fv = values[f]
        if fv.categorical:
            first = 0 if f in full else 1
            coding = (fv.values[:, None] == np.arange(first, len(fv.levels))[None, :]).astype(np.float64)
            labels = [(fv.levels[j],) for j in range(first, len(fv.levels))]
        else:
            coding, labels = fv.values[:, None], [()]
        cols = np.concatenate([cols * coding[:, [b]] for b in range(coding.shape[1])], axis=1)
        keys = [k + lab for lab in labels for k in keys]
    return cols, [(term.name, k) for k in keys]


def treatment_design(intercept: bool, terms: list[ModelTerm], values: dict[str, FactorValues],
                     full_rank: bool = True) -> tuple[np.ndarray, list]:
    """``(X_t (n, p_t), keys)``: the fixed part in treatment coding, by R's rule (a categorical factor of a
    term is coded by contrasts when the term without it is in the model, the empty term standing for the
    intercept; without an intercept, the first factor of the first term that has one is coded by
    indicators); with ``full_rank`` the columns that are linear combinations of earlier ones are dropped, as
    lmerTest's ``ensure_full_rank``."""
    present = {frozenset(t.factors) for t in terms}
    n = len(next(iter(values.values())).values)
    mats, keys = ([np.ones((n, 1))], [("(Intercept)", ())]) if intercept else ([], [])
    first_free = not intercept
    for term in terms:
        full = set()
        for f in term.factors:
            if not values[f].categorical:
                continue
            margin = frozenset(term.factors) - {f}
            if first_free:
                full.add(f)
                first_free = False
            elif margin and margin not in present:
                full.add(f)
        m, k = _coded_term(term, values, full)
        mats.append(m)
        keys += k
    X = np.concatenate(mats, axis=1)
    if full_rank:
        keep = independent_columns(X)
        X, keys = X[:, keep], [keys[j] for j in keep]
    return X, keys


def cell_design(intercept: bool, terms: list[ModelTerm], values: dict[str, FactorValues]) -> tuple[np.ndarray, list]:
    """``(rdX (n, P), keys)``: every term coded by the indicators of all its cells (lmerTest's ``get_rdX``)."""
    n = len(next(iter(values.values())).values)
    mats, keys = ([np.ones((n, 1))], [("(Intercept)", ())]) if intercept else ([], [])
    for term in terms:
        m, k = _coded_term(term, values, set(term.factors))
        mats.append(m)
        keys += k
    return np.concatenate(mats, axis=1), keys


def independent_columns(X: np.ndarray, tol: float = 1e-7) -> list[int]:
    """Positions of the columns of ``X`` kept when each column that lies (to ``tol``, relative) in the span of
    the kept columns before it is dropped (R's pivoted QR keeps the same)."""
    norms = np.linalg.norm(X, axis=0)
    keep: list[int] = []
    Q = np.zeros((X.shape[0], 0))
    for j in range(X.shape[1]):
        if norms[j] == 0:
            continue
        v = X[:, j] - Q @ (Q.T @ X[:, j])
        v = v - Q @ (Q.T @ v)  # twice: Gram-Schmidt keeps its orthogonality
        if np.linalg.norm(v) > tol * norms[j]:
            keep.append(j)
            Q = np.concatenate([Q, (v / np.linalg.norm(v))[:, None]], axis=1)
    return keep


def _zap(M: np.ndarray) -> np.ndarray:
    scale = np.max(np.abs(M)) if M.size else 0.0
    return np.where(np.abs(M) < ZAP * scale, 0.0, M)


def fitted_rows(info: DesignInfo, data: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``data`` the fit used (``info.rows``, after ``missing="drop"``)."""
    if info.rows is not None and len(data) != info.n_obs:
        return data.loc[info.rows]
    return data


# --------------------------------------------------------------------------------------- hypotheses


def type3_hypotheses(info: DesignInfo, data: pd.DataFrame) -> dict[str, np.ndarray]:
    """Type III hypothesis matrices of every term, as lmerTest's ``anova(m, type = 3)`` builds them.

    Args:
        info: the fit's design info.
        data: the data the model was fitted to (the fit's ``data``; rows not used in the fit, by
            ``missing="drop"``, are left out by ``info.rows``).

    Returns:
        ``{term: L_T (q_T, p)}`` in the order of the model matrix, on the model's own coefficients. With at
        most one term, the type I matrices (as lmerTest).
    """
    data = fitted_rows(info, data)
    intercept, terms = model_terms(info)
    if len(terms) <= 1 or len(info.fixed_names) <= 1:
        return type1_hypotheses(info, data)
    values = factor_values(info, data)
    X = fixed_matrix(info, data)
    Xt, t_keys = treatment_design(intercept, terms, values)
    rdX, rd_keys = cell_design(intercept, terms, values)
    L = _zap(np.linalg.lstsq(Xt, rdX, rcond=None)[0].T)  # (P, p_t): rows cells, columns coefficients
    t_cols = {t.name: [j for j, k in enumerate(t_keys) if k[0] == t.name] for t in terms}
    contained_in = containment(terms, values)
    order = sorted(range(len(terms)), key=lambda i: -len(terms[i].factors))  # stable: R's order(decreasing)
    for i in order:
        name = terms[i].name
        big = [j for other in contained_in[name] for j in t_cols[other]]
        if big and t_cols[name]:
            B, T = L[:, big], L[:, t_cols[name]]
            L[:, t_cols[name]] = T - B @ np.linalg.lstsq(B, T, rcond=None)[0]
            L = _zap(L)
    rd_index = {k: r for r, k in enumerate(rd_keys)}
    L = L[[rd_index[k] for k in t_keys], :]  # (p_t, p_t): the cells that are coefficients of X_t
    to_model = _zap(np.linalg.lstsq(Xt, X, rcond=None)[0])  # (p_t, p): beta_t = to_model @ beta
    out = {}
    for term in terms:
        Lt = L[:, t_cols[term.name]].T
        Lt = Lt[np.abs(Lt).sum(axis=1) > 1e-8]
        out[term.name] = _zap(Lt @ to_model)
    return out


def type1_hypotheses(info: DesignInfo, data: pd.DataFrame) -> dict[str, np.ndarray]:
    """Type I (sequential) hypothesis matrices, as lmerTest's ``anova(m, type = 1)``: the rows of the unit
    upper-triangular ``D^{-1} R`` (``X'X = R'R``) at each term's columns.

    Returns:
        ``{term: L_T (q_T, p)}`` in the order of the model matrix.
    """
    data = fitted_rows(info, data)
    X = fixed_matrix(info, data)
    R = np.linalg.cholesky(X.T @ X).T
    U = R / np.diag(R)[:, None]
    _, terms = model_terms(info)
    return {t.name: U[list(t.columns), :] for t in terms}


# --------------------------------------------------------------------------------------- tests


def contest(L, beta, vcov, ddf_fn: Callable[[np.ndarray], float] | None = None) -> dict:
    """Test ``L beta = 0`` (lmerTest's ``contest``): one row by a t test, several by an F test.

    Args:
        L: ``(p,)`` or ``(q, p)`` hypothesis matrix.
        beta: ``(p,)`` estimates.
        vcov: ``(p, p)`` their covariance ``V``.
        ddf_fn: ``ddf_fn(L) -> float``, the denominator degrees of freedom of the test of ``L`` (Satterthwaite,
            Kenward-Roger; ``L`` as given here, ``(1, p)`` for one row); ``None``: infinite, i.e. the z and
            chi-square tests of ``glmer``.

    Returns:
        one row. One contrast: ``estimate``, ``std_error``, ``df``, ``t``, ``p`` (two-sided). Several:
        ``num_df`` (the rank ``q`` of ``L V L'``), ``den_df``, ``F = (L b)' (L V L')^{-1} (L b) / q``, ``p``;
        a rank-deficient ``L V L'`` is inverted on its positive eigenvalues (as lmerTest's ``contestMD``).
    """
    L = np.atleast_2d(np.asarray(L, dtype=np.float64))
    beta, V = np.asarray(beta, dtype=np.float64), np.asarray(vcov, dtype=np.float64)
    ddf = np.inf if ddf_fn is None else float(ddf_fn(L))
    if L.shape[0] == 1:
        est = float(L[0] @ beta)
        se = float(np.sqrt(L[0] @ V @ L[0]))
        t = est / se
        return {"estimate": est, "std_error": se, "df": ddf, "t": t, "p": float(2 * stats.t.sf(abs(t), ddf))}
    d, P = np.linalg.eigh(L @ V @ L.T)
    pos = d > 1e-8 * max(d.max(), 0.0)
    q = int(pos.sum())
    z = P[:, pos].T @ (L @ beta)
    F = float(np.sum(z**2 / d[pos]) / q)
    p = stats.chi2.sf(F * q, q) if np.isinf(ddf) else stats.f.sf(F, q, ddf)
    return {"num_df": q, "den_df": ddf, "F": F, "p": float(p)}


def anova(info: DesignInfo, data: pd.DataFrame, beta, vcov, type: int = 3,
          ddf_fn: Callable[[np.ndarray], float] | None = None) -> pd.DataFrame:
    """lmerTest's ``anova(m, type = 3)`` (or ``type = 1``) table: one F test per term.

    Args:
        info, data: as :func:`type3_hypotheses`.
        beta: ``(p,)`` the fixed effects (``fit.fixef()``).
        vcov: ``(p, p)`` their covariance (``fit.vcov()``).
        type: 3 or 1.
        ddf_fn: as :func:`contest`.

    Returns:
        indexed by term: ``num_df``, ``den_df``, ``F``, ``p``.
    """
    if type not in (1, 3):
        raise ValueError(f"type must be 1 or 3, got {type!r}")
    hyp = type3_hypotheses(info, data) if type == 3 else type1_hypotheses(info, data)
    rows = {}
    for name, L in hyp.items():
        row = contest(L, beta, vcov, ddf_fn)
        if "F" not in row:  # one row: its F is t squared
            row = {"num_df": 1, "den_df": row["df"], "F": row["t"] ** 2, "p": row["p"]}
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")[["num_df", "den_df", "F", "p"]]
