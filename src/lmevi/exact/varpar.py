"""lme4's profiled deviance on the "varpar" scale (``devfun2`` of lme4's R/profile.R), for :mod:`lmevi.profile`.

The parameters are, per random term in lme4's term order, the standard deviations and correlations read
column by column from the lower triangle (``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``,
``sd_Days|Subject``), then the residual SD ``sigma``, then the fixed effects. With ``Lambda_k = chol(Sigma_k) /
sigma`` and beta at its GLS estimate for each theta,

    dev(sd, cor, sigma) = log|L_Z|^2 + r^2(theta) / sigma^2 + n log(2 pi sigma^2),                (devfun2)
    dev_j(theta; b) = log|L_Z|^2 + n (1 + log(2 pi (r^2(theta) + (b - beta_j(theta))^2 / V_jj) / n)),

the second with the fixed effect ``j`` held at ``b`` and sigma profiled out, ``V = (R_X'R_X)^{-1}`` (lme4 holds
it by an offset and refits; the residual sum of squares is quadratic in ``beta_j``, so no refit is needed).

The pieces ``log|L_Z|^2``, ``r^2``, ``beta`` and ``V`` come from a dense form of :mod:`lmevi.exact`'s blocked
elimination (:func:`parts`): term 1 eliminated level by level, the rest dense, for the small designs a
profile is run on (an evaluation costs ``O(J_1 p_1^2 P + P^3)``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from lmevi.exact.covfactors import lme4_term_order
from lmevi.exact.structure import Structure

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------
# Parameters: names, lme4's term order, and the map between (sd, cor, sigma) and theta


class Layout(NamedTuple):
    """Where each varpar (sd, cor, sigma) sits, and the varpar's names (lme4's ``oldNames = FALSE``).

    Attributes:
        names: ``(n_vp + p,)`` varpar names in lme4's order (terms in lme4's order), ``sigma``, then the fixed
            effects.
        terms: per term in lme4's order ``(k, p_k, theta_offset, varpar_offset)``: ``k`` the design index,
            ``theta_offset`` where its block starts in theta (design order).
        n_vp: number of variance parameters, ``sigma`` included (the last of them).
        is_cor: ``(n_vp,)`` which are correlations.
    """

    names: tuple[str, ...]
    terms: tuple[tuple[int, int, int, int], ...]
    n_vp: int
    is_cor: np.ndarray


def layout_of(groups, coef_names, n_levels, fixed_names) -> Layout:
    sizes = [len(c) for c in coef_names]
    theta_offsets = np.concatenate([[0], np.cumsum([q * (q + 1) // 2 for q in sizes])])
    names, terms, is_cor, pos = [], [], [], 0
    for k in lme4_term_order(n_levels):
        q = sizes[k]
        terms.append((k, q, int(theta_offsets[k]), pos))
        for c in range(q):
            for r in range(c, q):
                cor = r != c
                names.append(f"cor_{coef_names[k][r]}.{coef_names[k][c]}|{groups[k]}" if cor
                             else f"sd_{coef_names[k][c]}|{groups[k]}")
                is_cor.append(cor)
        pos += q * (q + 1) // 2
    names.append("sigma")
    is_cor.append(False)
    return Layout(tuple(names) + tuple(fixed_names), tuple(terms), pos + 1, np.asarray(is_cor))


def _tril(q: int):
    rows = np.concatenate([np.arange(c, q) for c in range(q)])
    cols = np.concatenate([np.full(q - c, c) for c in range(q)])
    return rows, cols


def theta_of_varpar(v: np.ndarray, layout: Layout) -> np.ndarray | None:
    """lme4's ``Sv_to_Cv``: theta (design order) of ``v = (sd, cor per term..., sigma)``, ``Lambda_k =
    diag(sd) chol(C_k) / sigma``; ``None`` where a correlation matrix is not positive semi-definite."""
    sigma = v[layout.n_vp - 1]
    theta = np.zeros(sum(q * (q + 1) // 2 for _, q, _, _ in layout.terms))
    for _, q, t_off, v_off in layout.terms:
        rows, cols = _tril(q)
        block = v[v_off : v_off + len(rows)]
        if q == 1:
            theta[t_off] = block[0] / sigma
            continue
        corr = np.eye(q)
        off = rows != cols
        corr[rows[off], cols[off]] = corr[cols[off], rows[off]] = block[off]
        sd = np.zeros(q)
        sd[rows[~off]] = block[~off]
        try:
            chol = np.linalg.cholesky(corr)
        except np.linalg.LinAlgError:
            if q == 2:  # |cor| = 1 up to rounding
                chol = np.array([[1.0, 0.0], [corr[1, 0], math.sqrt(max(0.0, 1.0 - corr[1, 0] ** 2))]])
            else:
                return None
        lam = sd[:, None] * chol / sigma
        theta[t_off : t_off + len(rows)] = lam[rows, cols]
    return theta


def varpar_of_theta(theta: np.ndarray, sigma: float, layout: Layout) -> np.ndarray:
    """lme4's ``Cv_to_Sv``: ``(sd, cor per term..., sigma)`` of theta and sigma; a correlation with a zero SD
    is ``NaN``, as in lme4."""
    v = np.zeros(layout.n_vp)
    for _, q, t_off, v_off in layout.terms:
        rows, cols = _tril(q)
        L = np.zeros((q, q))
        L[rows, cols] = theta[t_off : t_off + len(rows)] * sigma
        cov = L @ L.T
        sd = np.sqrt(np.diag(cov))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = cov / np.outer(sd, sd)
        v[v_off : v_off + len(rows)] = np.where(rows == cols, sd[rows], corr[rows, cols])
    v[-1] = sigma
    return v


# ----------------------------------------------------------------------------------------------------
# The criterion at one theta


class Parts(NamedTuple):
    """``log|L_Z|^2``, ``r^2``, the GLS ``beta`` ``(p,)`` and ``V = (R_X'R_X)^{-1}`` ``(p, p)`` at one theta."""

    logdet: float
    pwrss: float
    beta: np.ndarray
    V: np.ndarray


class DenseCriterion(NamedTuple):
    """The cross-products of a small design, dense, for :func:`_parts` (built once by :func:`dense_criterion`).

    With ``R = [Z_rest, X]`` as in :mod:`lmevi.exact` (term 1 eliminated level by level, the other terms and
    X dense), ``y`` is appended to ``R`` as a last column so that one Cholesky factor gives ``r^2`` too.

    Attributes:
        zz1: ``(J_1, p_1, p_1)`` per-level ``Z_1j'Z_1j``.
        zg: ``(J_1, p_1, P + 1)`` per-level ``Z_1j'[R, y]``.
        rr: ``(P + 1, P + 1)`` ``[R, y]'[R, y]``.
        lam1: ``(p_1, p_1)`` indices into ``[theta, 0, 1]`` that gather ``Lambda_1``.
        lam_rest: ``(P + 1, P + 1)`` indices that gather ``blockdiag(Lambda_rest, I_p, 1)``.
        n_rest_random: ``Q``.
        n_obs: ``n``.
    """

    zz1: np.ndarray
    zg: np.ndarray
    rr: np.ndarray
    lam1: np.ndarray
    lam_rest: np.ndarray
    n_rest_random: int
    n_obs: int


def dense_criterion(s: Structure) -> DenseCriterion:
    """:class:`DenseCriterion` of a :func:`lmevi.exact.structure.build_structure` (its ``Z_1'R`` densified: ``O(J_1 p_1 P)``
    memory, meant for the small dense blocks of :data:`lmevi.exact.evaluate.NUMPY_MAX`)."""
    P = s.size
    J1, p1 = s.zy1.shape
    zg = np.zeros((J1, p1, P + 1))
    np.add.at(zg, (s.cross_level, s.cross_coef, s.cross_rest), s.cross_value)
    zg[:, :, P] = s.zy1
    rr = np.block([[s.rr, s.ry[:, None]], [s.ry[None, :], np.reshape(s.yy, (1, 1))]])
    offsets = np.concatenate([[0], np.cumsum([q * (q + 1) // 2 for q in s.n_coefs])])
    zero, one = int(offsets[-1]), int(offsets[-1]) + 1

    def term_index(k):
        index = np.full((s.n_coefs[k], s.n_coefs[k]), zero)
        rows, cols = _tril(s.n_coefs[k])
        index[rows, cols] = offsets[k] + np.arange(len(rows))
        return index

    lam_rest = np.full((P + 1, P + 1), zero)
    for k, off in zip(s.order[1:], s.rest_offsets):
        q = s.n_coefs[k]
        start = off + q * np.arange(s.n_levels[k])
        block = start[:, None, None] + np.arange(q)[None, :, None], start[:, None, None] + np.arange(q)[None, None, :]
        lam_rest[block] = term_index(k)[None]
    diag = np.arange(s.n_rest_random, P + 1)
    lam_rest[diag, diag] = one
    return DenseCriterion(s.zz1, zg, rr, term_index(s.order[0]), lam_rest, s.n_rest_random, s.n_obs)


def _forward(A: np.ndarray, M: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """``(sum_j log|D_j|, rows of L_j^{-1} M_j)`` with ``D_j = A_j + I = L_j L_j'`` for ``A`` ``(J, q, q)`` and ``M``
    ``(J, q, m)``: row ``r`` is ``(J, m)``. The Cholesky factor and the forward substitution are unrolled over
    the ``q^2`` entries, each an elementwise operation over the ``J`` levels (NumPy's batched LAPACK calls cost
    more than the arithmetic for the ``q`` of 1 to 3 of most models)."""
    q = A.shape[-1]
    L = [[None] * q for _ in range(q)]
    for c in range(q):
        L[c][c] = np.sqrt(1.0 + A[:, c, c] - sum(L[c][k] ** 2 for k in range(c)))
        for r in range(c + 1, q):
            L[r][c] = (A[:, r, c] - sum(L[r][k] * L[c][k] for k in range(c))) / L[c][c]
    U = []
    for r in range(q):
        U.append((M[:, r, :] - sum(L[r][k][:, None] * U[k] for k in range(r))) / L[r][r][:, None])
    return 2.0 * float(sum(np.sum(np.log(L[c][c])) for c in range(q))), U


def parts(theta: np.ndarray, d: DenseCriterion) -> Parts:
    """lme4's ``ldL2``, ``pwrss``, ``beta`` and ``RX`` at ``theta`` by blocked elimination (lme4's eqs. 34-40,
    as :mod:`lmevi.exact`): with ``D_j = Lambda_1'Z_1j'Z_1j Lambda_1 + I`` and ``B = blockdiag(Lambda_rest,
    I_p, 1)``, the Schur complement ``S+ = B'([R, y]'[R, y] - sum_j [R, y]'Z_1j Lambda_1 D_j^{-1} Lambda_1'
    Z_1j'[R, y]) B + diag(1_Q, 0)`` has the Cholesky factor ``[[L_Z,rest, 0, 0], [., R_X', 0], [., c', r]]``:
    ``log|L_Z|^2 = sum_j log|D_j| + log|L_Z,rest|^2``, ``r^2`` the last diagonal squared, ``beta =
    R_X'^{-1} c`` and ``V = (R_X R_X')^{-1}``."""
    flat = np.concatenate([theta, [0.0, 1.0]])
    lam1, B = flat[d.lam1], flat[d.lam_rest]
    logdet_D, U = _forward(lam1.T @ d.zz1 @ lam1, lam1.T @ d.zg)
    S = B.T @ (d.rr - sum(u.T @ u for u in U)) @ B
    Q = d.n_rest_random
    S[np.arange(Q), np.arange(Q)] += 1.0
    L = np.linalg.cholesky(S)
    diag = np.diagonal(L)
    RXt_inv = np.linalg.inv(L[Q:-1, Q:-1])  # R_X'^{-1} (lower)
    logdet = logdet_D + 2.0 * np.sum(np.log(diag[:Q]))
    return Parts(float(logdet), float(diag[-1] ** 2), RXt_inv.T @ L[-1, Q:-1], RXt_inv.T @ RXt_inv)


def deviance_varpar(v: np.ndarray, s: DenseCriterion, layout: Layout) -> tuple[float, Parts | None]:
    """lme4's ``devfun2``: ``log|L_Z|^2 + r^2 / sigma^2 + n log(2 pi sigma^2)`` at ``v``; ``inf`` where ``v``
    is not a covariance (a correlation matrix not positive semi-definite, or ``sigma = 0``)."""
    sigma = v[layout.n_vp - 1]
    theta = theta_of_varpar(v, layout) if sigma > 0 else None
    if theta is None:
        return math.inf, None
    p = parts(theta, s)
    return p.logdet + p.pwrss / sigma**2 + s.n_obs * (LOG_2PI + 2.0 * math.log(sigma)), p


def deviance_fixed(theta: np.ndarray, j: int, b: float, s: DenseCriterion) -> tuple[float, Parts, float]:
    """The ML deviance with ``beta_j = b`` and the other fixed effects and sigma profiled out:
    ``(deviance, parts, r^2 at b)``."""
    p = parts(theta, s)
    pwrss = p.pwrss + (b - p.beta[j]) ** 2 / p.V[j, j]
    n = s.n_obs
    return p.logdet + n * (1.0 + LOG_2PI + math.log(pwrss / n)), p, pwrss
