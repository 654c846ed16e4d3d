"""Kenward-Roger adjusted covariance and degrees of freedom for the fixed effects of an exact REML fit.

pbkrtest (Halekoh & Højsgaard 2014, J. Stat. Softw. 59(9); Kenward & Roger 1997, Biometrics 53) writes the
marginal covariance linearly in the variance components, ``Sigma = sum_i s_i G_i``: one ``G_i = Z_k E_i Z_k'``
per entry ``(a, b)`` (``a >= b``) of each term's covariance matrix, ``E_i = I_{J_k} kron (e_a e_b' + e_b e_a')``
(``e_a e_a'`` on the diagonal), and ``G = I`` for the residual variance (``get_SigmaG``). With
``Phi = (X' Sigma^{-1} X)^{-1}`` (lme4's ``vcov``), ``vcovAdj`` computes

    P_i = -X' Sigma^{-1} G_i Sigma^{-1} X,     Q_ij = X' Sigma^{-1} G_i Sigma^{-1} G_j Sigma^{-1} X,
    I_ij = tr(Sigma^{-1} G_i Sigma^{-1} G_j) - 2 tr(Phi Q_ij) + tr(Phi P_i Phi P_j),    W = 2 I^{-1},
    Phi_A = Phi + 2 Phi (sum_ij W_ij (Q_ij - P_i Phi P_j)) Phi,

and ``Lb_ddf`` / ``.KR_adjust`` the df of a contrast matrix ``L`` from ``Theta = L'(L Phi L')^{-1} L``.

Here no ``n x n`` matrix is formed. With ``Sigma = sigma^2 V``, ``V = Z Lambda Lambda' Z' + I``, Woodbury gives
``V^{-1} = I - Z H Z'``, ``H = Lambda M^{-1} Lambda'``, ``M = Lambda'Z'Z Lambda + I`` (``q x q``), and with
``C = Z'Z``, ``N = I - HC``:

    Z'V^{-1}Z = CN = C - CHC,   Z'V^{-1}X = Z'X - C H Z'X,   Z'V^{-2}X = N'(Z'V^{-1}X),
    Z'V^{-2}Z = N'CN,   X'V^{-2}X = |X - Z H Z'X|^2,   X'V^{-3}X = X'V^{-2}X - (Z'V^{-1}X)' H (Z'V^{-1}X),
    tr V^{-2} = n - 2 tr(HC) + tr((HC)^2) = n - q + ||M^{-1}||_F^2    (as tr(HC) = q - tr M^{-1}).

``M^{-1}`` is formed densely by eliminating the largest term level by level (its block of ``M`` is block
diagonal), so the dense work is ``O(J_1^2 Q + J_1 Q^2 + Q^3)`` with ``Q`` the other terms' size; ``C`` is
sparse. Only ``I_ij`` of size (number of components)^2 and ``p x p`` products remain.

pbkrtest refits an ML fit by REML first; here the caller passes a REML fit's ``theta`` and ``sigma``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy import stats

from lmevi.frame.design import Design


class KRAdjusted(NamedTuple):
    """pbkrtest's ``vcovAdj`` with the attributes its df formulas read.

    Attributes:
        beta: ``(p,)`` fixed effects at ``theta`` (GLS).
        vcov: ``(p, p)`` ``Phi``, the unadjusted covariance (lme4's ``vcov``).
        vcov_adj: ``(p, p)`` ``Phi_A``.
        P: ``(g, p, p)`` ``P_i`` (``g`` = number of variance components, the residual last).
        W: ``(g, g)`` ``2 I^{-1}`` (a generalised inverse where ``I`` is near singular, as pbkrtest).
        information: ``(g, g)`` ``I``.
    """

    beta: np.ndarray
    vcov: np.ndarray
    vcov_adj: np.ndarray
    P: np.ndarray
    W: np.ndarray
    information: np.ndarray


class KRTest(NamedTuple):
    """pbkrtest's ``KRmodcomp`` statistics for ``L beta = 0``: ``F = F_scaling * F_unscaled`` with
    ``F_unscaled = (L beta)'(L Phi_A L')^{-1}(L beta) / q``; ``p`` from ``F``, ``p_unscaled`` from ``F_unscaled``,
    both on ``(num_df, den_df)``."""

    num_df: int
    den_df: float
    F: float
    p: float
    F_scaling: float
    F_unscaled: float
    p_unscaled: float


class KRT(NamedTuple):
    """A one-row contrast's t test with Kenward-Roger's covariance and df (lmerTest's ``get_KR1D``)."""

    estimate: float
    se: float
    df: float
    t: float
    p: float


# ----------------------------------------------------------------------------------------------------
# Cross-products and the Woodbury pieces


class _Layout(NamedTuple):
    offsets: tuple[int, ...]  # first coordinate of each term in design order (level-major, coefficient-minor)
    n_levels: tuple[int, ...]
    n_coefs: tuple[int, ...]
    q: int


def _layout(design: Design) -> _Layout:
    n_levels = tuple(int(t.n_levels) for t in design.terms)
    n_coefs = tuple(int(np.shape(t.covariates)[1]) for t in design.terms)
    sizes = [J * p for J, p in zip(n_levels, n_coefs)]
    offsets = tuple(int(o) for o in np.cumsum([0] + sizes[:-1]))
    return _Layout(offsets, n_levels, n_coefs, int(sum(sizes)))


def _sparse_z(design: Design, lay: _Layout) -> sp.csr_matrix:
    """``(n, q)`` sparse ``Z``: row ``i`` has term ``k``'s covariates at columns ``off_k + g_k(i) p_k + a``."""
    n = np.shape(design.y)[0]
    rows, cols, vals = [], [], []
    for t, off, p in zip(design.terms, lay.offsets, lay.n_coefs):
        g = np.asarray(t.index, np.int64)
        rows.append(np.repeat(np.arange(n), p))
        cols.append((off + g[:, None] * p + np.arange(p)).ravel())
        vals.append(np.asarray(t.covariates, np.float64).ravel())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, lay.q))


def _lambda(theta, lay: _Layout) -> sp.csr_matrix:
    """``(q, q)`` sparse block-diagonal ``Lambda = blockdiag(I_{J_k} kron Lambda_k)`` from ``theta`` (design
    order, lower triangles column by column)."""
    blocks, pos = [], 0
    for J, p in zip(lay.n_levels, lay.n_coefs):
        lam = np.zeros((p, p))
        rows = np.concatenate([np.arange(c, p) for c in range(p)])
        cols = np.concatenate([np.full(p - c, c) for c in range(p)])
        lam[rows, cols] = theta[pos : pos + len(rows)]
        pos += len(rows)
        blocks.append(sp.kron(sp.identity(J), sp.csr_matrix(lam)))
    return sp.block_diag(blocks, format="csr")


def _m_inverse(M: sp.csr_matrix, lay: _Layout) -> np.ndarray:
    """``(q, q)`` dense ``M^{-1}`` by eliminating the largest term (block diagonal within ``M``) level by level:
    with ``M = [[D, B], [B', F]]`` (term 1 first), ``S = F - B'D^{-1}B``, ``Y = D^{-1}B``,
    ``M^{-1} = [[D^{-1} + Y S^{-1} Y', -Y S^{-1}], [-S^{-1} Y', S^{-1}]]``."""
    sizes = [J * p for J, p in zip(lay.n_levels, lay.n_coefs)]
    k1 = int(np.argmax(sizes))
    first = np.arange(lay.offsets[k1], lay.offsets[k1] + sizes[k1])
    rest = np.setdiff1d(np.arange(lay.q), first)
    J1, p1 = lay.n_levels[k1], lay.n_coefs[k1]
    M = M.tocsr()
    D = M[first][:, first].toarray().reshape(J1, p1, J1, p1)
    D = np.einsum("jajb->jab", D)  # the level blocks (off-block entries are zero)
    Dinv = np.linalg.inv(D)
    Dinv_sp = sp.block_diag(list(Dinv), format="csr")
    out = np.empty((lay.q, lay.q))
    if rest.size == 0:
        out[np.ix_(first, first)] = Dinv_sp.toarray()
        return out
    B = M[first][:, rest]
    Y = np.asarray((Dinv_sp @ B).todense())
    S = M[rest][:, rest].toarray() - np.asarray((B.T @ Y))
    S_inv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(S, lower=True), np.eye(rest.size))
    YS = Y @ S_inv
    block = YS @ Y.T
    for a in range(p1):
        for b in range(p1):
            block[np.arange(J1) * p1 + a, np.arange(J1) * p1 + b] += Dinv[:, a, b]
    out[np.ix_(first, first)] = block
    out[np.ix_(first, rest)] = -YS
    out[np.ix_(rest, first)] = -YS.T
    out[np.ix_(rest, rest)] = S_inv
    return out


class _Woodbury(NamedTuple):
    """``Sigma = sigma^2 V`` quantities in the random-effects dimension (see the module docstring)."""

    T: np.ndarray  # (q, q) Z'V^{-1}Z
    CHC: np.ndarray  # (q, q) C H C = C - T
    CH: np.ndarray  # (q, q) C H
    U: np.ndarray  # (q, p) Z'V^{-1}X
    NtU: np.ndarray  # (q, p) Z'V^{-2}X
    xvx: np.ndarray  # (p, p) X'V^{-1}X
    xv2x: np.ndarray  # (p, p) X'V^{-2}X
    xv3x: np.ndarray  # (p, p) X'V^{-3}X
    xvy: np.ndarray  # (p,) X'V^{-1}y
    tr_v2: float  # tr V^{-2}


def _woodbury(design: Design, theta, lay: _Layout) -> _Woodbury:
    Z = _sparse_z(design, lay)
    X = np.asarray(design.X, np.float64)
    y = np.asarray(design.y, np.float64)
    C = (Z.T @ Z).tocsr()
    ZX, Zy = np.asarray(Z.T @ X), np.asarray(Z.T @ y)
    Lam = _lambda(np.asarray(theta, np.float64), lay)
    M = (Lam.T @ C @ Lam + sp.identity(lay.q)).tocsr()
    Minv = _m_inverse(M, lay)
    H = np.asarray(Lam @ np.asarray(Lam @ Minv).T).T  # Lambda M^{-1} Lambda'
    CH = np.asarray(C @ H)
    CHC = np.asarray(C @ CH.T)  # C H C (H and C symmetric)
    CHC = 0.5 * (CHC + CHC.T)
    T = C.toarray() - CHC
    w = H @ ZX  # (q, p)
    U = ZX - np.asarray(C @ w)
    xvx = X.T @ X - ZX.T @ w
    xv2x = xvx - ZX.T @ w + w.T @ np.asarray(C @ w)  # |X - Z w|^2 = X'X - 2 ZX'w + w'Cw
    return _Woodbury(
        T=T, CHC=CHC, CH=CH, U=U, NtU=U - CH @ U, xvx=xvx, xv2x=xv2x, xv3x=xv2x - U.T @ H @ U,
        xvy=X.T @ y - w.T @ Zy, tr_v2=float(X.shape[0] - lay.q + np.sum(Minv * Minv)),
    )


class _Component(NamedTuple):
    rows: slice  # the term's coordinates (contiguous: views, not copies, of the q x q matrices)
    pairs: tuple  # ((r, s), ...): E_i = sum I kron e_r e_s'
    n_levels: int
    n_coefs: int


def _components(lay: _Layout) -> list[_Component]:
    """Each term's covariance entries ``(a, b)``, ``a >= b``, column by column (lme4's theta order)."""
    out = []
    for off, J, p in zip(lay.offsets, lay.n_levels, lay.n_coefs):
        rows = slice(off, off + J * p)
        for b in range(p):
            for a in range(b, p):
                out.append(_Component(rows, ((a, b),) if a == b else ((a, b), (b, a)), J, p))
    return out


def _apply_e(c: _Component, A: np.ndarray) -> np.ndarray:
    """``E_i A`` restricted to the term's rows, for ``A`` ``(J_k p_k, m)`` (the term's rows of a matrix):
    row ``(j, r)`` of the result is ``sum_{(r, s) in pairs} A[(j, s)]``."""
    if c.n_coefs == 1:  # E_i = I
        return A
    A3 = A.reshape(c.n_levels, c.n_coefs, -1)
    out = np.zeros_like(A3)
    for r, s in c.pairs:
        out[:, r] += A3[:, s]
    return out.reshape(A.shape)


def _level_diag_sum(c: _Component, Mfun) -> float:
    """``tr(E_i M) = sum_{(r, s)} sum_j M[(j, s), (j, r)]`` with ``Mfun(x, y)`` giving ``M[x, y]`` elementwise."""
    total = 0.0
    for r, s in c.pairs:
        coords = np.arange(c.rows.start, c.rows.stop).reshape(c.n_levels, c.n_coefs)
        x, y = coords[:, s], coords[:, r]
        total += float(np.sum(Mfun(x, y)))
    return total


def _kr_matrices(design: Design, theta, sigma: float):
    """``(Phi, beta, P (g, p, p), Q (g, g, p, p), K (g, g))`` of pbkrtest's ``vcovAdj`` for ``Sigma =
    sigma^2 V``; the residual is component ``g - 1``."""
    lay = _layout(design)
    wb = _woodbury(design, theta, lay)
    comps = _components(lay)
    g, p = len(comps) + 1, wb.U.shape[1]
    s2, s4, s6 = sigma**2, sigma**4, sigma**6
    EU = [_apply_e(c, wb.U[c.rows]) for c in comps]  # E_i U on the term's rows
    ET = [_apply_e(c, wb.T[c.rows]) for c in comps]  # E_i T on the term's rows, all columns
    P = np.empty((g, p, p))
    Q = np.empty((g, g, p, p))
    K = np.empty((g, g))
    for i, ci in enumerate(comps):
        P[i] = -wb.U[ci.rows].T @ EU[i] / s4
        for j, cj in enumerate(comps):
            Q[i, j] = EU[i].T @ (wb.T[ci.rows, cj.rows] @ EU[j]) / s6
            K[i, j] = np.sum(ET[i][:, cj.rows] * ET[j][:, ci.rows].T) / s4
        Q[i, -1] = EU[i].T @ wb.NtU[ci.rows] / s6
        Q[-1, i] = Q[i, -1].T
        # tr(E_i Z'V^{-2}Z), Z'V^{-2}Z = N'CN = -C + 2T + (CHC)(HC) on the level blocks
        K[i, -1] = K[-1, i] = _level_diag_sum(
            ci, lambda x, y: -wb.CHC[x, y] + wb.T[x, y] + np.sum(wb.CHC[x] * wb.CH[y], axis=1)
        ) / s4
    P[-1] = -wb.xv2x / s4
    Q[-1, -1] = wb.xv3x / s6
    K[-1, -1] = wb.tr_v2 / s4
    xvx_inv = np.linalg.inv(wb.xvx)
    return s2 * xvx_inv, xvx_inv @ wb.xvy, P, Q, K


def _ginv(A: np.ndarray) -> np.ndarray:
    """MASS's ``ginv``: the Moore-Penrose inverse over singular values above ``sqrt(eps)`` times the largest."""
    return np.linalg.pinv(A, rcond=np.sqrt(np.finfo(float).eps))


def kenward_roger_vcov(design: Design, theta, sigma: float) -> KRAdjusted:
    """pbkrtest's ``vcovAdj``: Kenward-Roger's adjusted covariance ``Phi_A`` of the fixed effects.

    Args:
        design: the model's arrays in data units (a Gaussian model with at least one random term).
        theta: ``(n_theta,)`` the REML estimate, design order (:attr:`lmevi.exact.optimise.ExactFit.theta`).
        sigma: the REML residual SD.

    Returns:
        A :class:`KRAdjusted`. Cost: dense ``O(q^2)`` memory and the elimination of the largest term; never an
        ``n x n`` matrix.
    """
    Phi, beta, P, Q, K = _kr_matrices(design, theta, float(sigma))
    PhiP = np.einsum("ab,ibc->iac", Phi, P)  # Phi P_i
    info = K - 2.0 * np.einsum("ab,ijba->ij", Phi, Q) + np.einsum("iab,jba->ij", PhiP, PhiP)
    info = 0.5 * (info + info.T)
    condition = np.min(np.abs(np.linalg.eigvalsh(info)))
    W = 2.0 * (np.linalg.inv(info) if condition > 1e-10 else _ginv(info))
    W = 0.5 * (W + W.T)
    PPhiP = np.einsum("iab,bc,jcd->ijad", P, Phi, P)
    UU = np.einsum("ij,ijab->ab", W, Q - PPhiP)
    return KRAdjusted(beta=beta, vcov=Phi, vcov_adj=Phi + 2.0 * Phi @ UU @ Phi, P=P, W=W, information=info)


# ----------------------------------------------------------------------------------------------------
# Degrees of freedom and tests


def _div_zero(x: float, y: float, tol: float = 1e-14) -> float:
    return 0.0 if abs(x) < tol and abs(y) < tol else x / y


def _kr_df(L: np.ndarray, adj: KRAdjusted) -> tuple[float, float, int]:
    """``(df2, F_scaling, q)`` of pbkrtest's ``.KR_adjust`` / ``Lb_ddf`` for contrast rows ``L`` ``(r, p)`` of full
    row rank (``L Phi L'`` is inverted, as there)."""
    if np.linalg.matrix_rank(L) < L.shape[0]:
        raise ValueError("L must have full row rank for the Kenward-Roger df (drop its dependent rows)")
    Phi = adj.vcov
    Theta = L.T @ np.linalg.solve(L @ Phi @ L.T, L)
    u = np.einsum("ab,bc,icd,de->iae", Theta, Phi, adj.P, Phi)  # Theta Phi P_i Phi
    tr = np.trace(u, axis1=1, axis2=2)
    A1 = float(tr @ adj.W @ tr)
    A2 = float(np.einsum("ij,iab,jba->", adj.W, u, u))
    q = int(np.linalg.matrix_rank(L))
    B = (A1 + 6.0 * A2) / (2.0 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    c1, c2, c3 = (g, q - g, q + 2 - g) / np.asarray(3.0 * q + 2.0 * (1.0 - g))
    V0, V1, V2 = 1.0 + c1 * B, 1.0 - c2 * B, 1.0 - c3 * B
    V0 = 0.0 if abs(V0) < 1e-10 else V0
    rho = _div_zero(1.0 - A2 / q, V1) ** 2 * V0 / V2 / q
    df2 = 4.0 + (q + 2.0) / (q * rho - 1.0)
    scaling = 1.0 if abs(df2 - 2.0) < 1e-2 else df2 * (1.0 - A2 / q) / (df2 - 2.0)
    return float(df2), float(scaling), q


def kenward_roger_ddf(L, adj: KRAdjusted) -> float:
    """pbkrtest's ``Lb_ddf``: Kenward-Roger's denominator df for ``L beta`` (``L`` ``(p,)`` or ``(r, p)``)."""
    return _kr_df(np.atleast_2d(np.asarray(L, np.float64)), adj)[0]


def kenward_roger_1d(L, adj: KRAdjusted) -> KRT:
    """t test of ``l' beta = 0`` with ``se = sqrt(l' Phi_A l)`` and Kenward-Roger's df (lmerTest's
    ``contest1D(ddf = "Kenward-Roger")``)."""
    l = np.asarray(L, np.float64).reshape(-1)
    estimate = float(l @ adj.beta)
    se = float(np.sqrt(l @ adj.vcov_adj @ l))
    df = kenward_roger_ddf(l, adj)
    t = estimate / se
    return KRT(estimate, se, df, t, float(2.0 * stats.t.sf(abs(t), df)))


def kenward_roger_md(L, adj: KRAdjusted) -> KRTest:
    """pbkrtest's ``KRmodcomp(model, L)``: the scaled F test of ``L beta = 0`` and its df (see :class:`KRTest`)."""
    L = np.atleast_2d(np.asarray(L, np.float64))
    df2, scaling, q = _kr_df(L, adj)
    Lb = L @ adj.beta
    F_u = float(Lb @ np.linalg.solve(L @ adj.vcov_adj @ L.T, Lb)) / q
    F = scaling * F_u
    return KRTest(q, df2, F, float(stats.f.sf(F, q, df2)), scaling, F_u, float(stats.f.sf(F_u, q, df2)))
