r"""glmer's conditional modes and Laplace criterion: penalised iteratively reweighted least squares (PIRLS) at
given ``(theta, beta)``, or at given ``theta`` with ``beta`` inside (lme4's ``nAGQ = 0``).

With spherical random effects ``u ~ N(0, I)``, ``b = Lambda_theta u`` and ``eta = offset + X beta + Z Lambda u``,
the conditional mode ``u*`` minimises the penalised deviance ``-2 log p(y | u) + |u|^2``; PIRLS reaches it by
Fisher scoring (the working weights ``W = mu_eta^2 / V(mu)``, as lme4's ``pwrssUpdate``) with step halving. Then
(Bates et al. 2015; lme4's ``glmResp::Laplace``, whose ``aic()`` keeps every constant of the log-density)

    -2 log L ~= -2 sum_i log p(y_i | u*) + |u*|^2 + log |L|^2,      L L' = Lambda' Z' W Z Lambda + I.

``L`` is factored by blocked elimination (as :mod:`lmevi.exact.structure` does for the Gaussian): the term with
the most coefficients ``J_1 p_1`` ("lead") is block diagonal (one ``p_1 x p_1`` block per level), the other
terms' coordinates form a dense Schur complement. The cross-products are weighted by ``W``, which changes every
iteration, so they are sparse products over the rows (``scipy.sparse``), recomputed each time.

Coordinates of ``u``: lead term first, then the others in design order, each level-major. Host-side NumPy
throughout; the family's functions (JAX) are evaluated in a 64-bit scope and read back.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import numpy as np
import scipy.linalg
import scipy.sparse as sp

from lmevi.exact.covfactors import _lambdas_numpy

# PIRLS stops when the largest change of u (spherical units) is below this, or after _MAX_ITER steps
_U_TOL = 1e-10
_MAX_ITER = 200
_MAX_HALVINGS = 30


class GlmmData(NamedTuple):
    """The arrays of a GLMM (host side).

    Attributes:
        y: ``(n,)`` response. X: ``(n, p)`` fixed effects. offset: ``(n,)``.
        index: per term ``(n,)`` level codes. covariates: per term ``(n, p_k)``.
        n_levels, n_coefs: per term ``J_k``, ``p_k``.
        family: a likelihood of :mod:`lmevi.families` (``log_density``, ``inverse_link``, ``link.mu_eta``,
            ``variance``).
        order: the terms in elimination order (lead first).
        rows: per term in ``order`` the rows/columns of ``Z`` (``(n p_k,)`` each), for the sparse ``Z Lambda``.
    """

    y: np.ndarray
    X: np.ndarray
    offset: np.ndarray
    index: tuple
    covariates: tuple
    n_levels: tuple
    n_coefs: tuple
    family: object
    order: tuple


def glmm_data(y, X, index, covariates, n_levels, family, offset=None) -> GlmmData:
    """:class:`GlmmData` of host arrays (``n`` rows each, no padding)."""
    y = np.asarray(y, np.float64)
    covariates = tuple(np.asarray(c, np.float64).reshape(len(y), -1) for c in covariates)
    n_coefs = tuple(c.shape[1] for c in covariates)
    sizes = [J * q for J, q in zip(n_levels, n_coefs)]
    lead = int(np.argmax(sizes))
    order = (lead,) + tuple(k for k in range(len(sizes)) if k != lead)
    off = np.zeros_like(y) if offset is None else np.asarray(offset, np.float64)
    return GlmmData(y, np.asarray(X, np.float64), off, tuple(np.asarray(i, np.int64) for i in index),
                    covariates, tuple(int(J) for J in n_levels), n_coefs, family, order)


def from_design(design, n_obs: int, family, offset=None) -> GlmmData:
    """:class:`GlmmData` of a :class:`lmevi.frame.design.Design` (its first ``n_obs`` rows)."""
    t = design.terms
    return glmm_data(np.asarray(design.y)[:n_obs], np.asarray(design.X)[:n_obs],
                     [np.asarray(x.index)[:n_obs] for x in t], [np.asarray(x.covariates)[:n_obs] for x in t],
                     [x.n_levels for x in t], family, offset)


@partial(jax.jit, static_argnums=0)
def _response_jax(family, y, eta):
    logp = family.log_density(y, eta, 1.0)
    mu = family.inverse_link(eta)
    d = family.link.mu_eta(eta)
    return logp, mu, d**2 / family.variance(mu), d


def response(data: GlmmData, eta: np.ndarray):
    """``(log p(y_i | eta_i), mu_i, W_i, mu_eta_i)``, ``(n,)`` each, from the family (one compiled 64-bit
    program per family, read back as NumPy)."""
    with jax.enable_x64(True):
        out = _response_jax(data.family, data.y, np.asarray(eta, np.float64))
        return tuple(np.asarray(a) for a in out)


def zlambda(data: GlmmData, theta) -> tuple[sp.csr_matrix, ...]:
    """Per term in elimination order the sparse ``(n, J_k p_k)`` ``Z_k Lambda_k`` (row ``i`` holds
    ``z_ik' Lambda_k`` at level ``g_k(i)``'s columns)."""
    lams = _lambdas_numpy(np.asarray(theta, np.float64), data.n_coefs)
    n = len(data.y)
    out = []
    for k in data.order:
        q = data.n_coefs[k]
        vals = data.covariates[k] @ lams[k]  # (n, p_k)
        cols = data.index[k][:, None] * q + np.arange(q)[None, :]
        out.append(sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, n * q + 1, q)),
                                 shape=(n, data.n_levels[k] * q)))
    return tuple(out)


class Factor(NamedTuple):
    """Blocked Cholesky factor of ``Lambda' Z' W Z Lambda + I``.

    Attributes:
        l11: ``(J_1, p_1, p_1)`` lower factors of the lead term's diagonal blocks; l11_inv their inverses.
        l21: sparse ``(q_2, q_1)`` ``A_21 L_11^{-T}``.
        l22: ``(q_2, q_2)`` lower factor of the Schur complement.
        logdet: ``()`` ``log |L|^2``.
    """

    l11: np.ndarray
    l11_inv: np.ndarray
    l21: sp.csr_matrix
    l22: np.ndarray
    logdet: float


def factor(zl: tuple, w: np.ndarray) -> Factor:
    """:class:`Factor` of ``Lambda' Z' W Z Lambda + I`` (``zl`` from :func:`zlambda`, ``w (n,)``)."""
    lead = zl[0]
    J1 = lead.shape[1]
    p1 = int(np.diff(lead.indptr)[0]) if lead.shape[0] else 1
    J1 = J1 // p1
    vals = lead.data.reshape(-1, p1)  # (n, p_1), rows in order (one block of p_1 columns per row)
    level = lead.indices.reshape(-1, p1)[:, 0] // p1
    outer = (w[:, None, None] * vals[:, :, None] * vals[:, None, :]).reshape(-1, p1 * p1)
    blocks = np.stack([np.bincount(level, weights=outer[:, c], minlength=J1) for c in range(p1 * p1)], axis=1)
    blocks = blocks.reshape(J1, p1, p1) + np.eye(p1)
    l11 = np.linalg.cholesky(blocks)
    l11_inv = np.linalg.inv(l11)
    logdet = 2.0 * float(np.sum(np.log(np.diagonal(l11, axis1=1, axis2=2))))
    if len(zl) == 1:
        return Factor(l11, l11_inv, sp.csr_matrix((0, J1 * p1)), np.zeros((0, 0)), logdet)
    rest = sp.hstack(zl[1:], format="csr")
    rest_w = rest.multiply(w[:, None]).tocsr()
    a21 = (rest_w.T @ lead).tocsr()
    a22 = (rest_w.T @ rest).toarray() + np.eye(rest.shape[1])
    l21 = (a21 @ _block_diag(l11_inv).T).tocsr()
    schur = a22 - (l21 @ l21.T).toarray()
    l22 = scipy.linalg.cholesky(schur, lower=True)
    return Factor(l11, l11_inv, l21, l22, logdet + 2.0 * float(np.sum(np.log(np.diag(l22)))))


def _block_diag(blocks: np.ndarray) -> sp.csr_matrix:
    """Sparse block-diagonal matrix of ``(J, p, p)`` blocks."""
    J, p, _ = blocks.shape
    rows = (np.arange(J)[:, None, None] * p + np.arange(p)[None, :, None]) + np.zeros((1, 1, p), int)
    cols = (np.arange(J)[:, None, None] * p + np.arange(p)[None, None, :]) + np.zeros((1, p, 1), int)
    return sp.csr_matrix((blocks.ravel(), (rows.ravel(), cols.ravel())), shape=(J * p, J * p))


def _split(F: Factor, r: np.ndarray):
    q1 = F.l11.shape[0] * F.l11.shape[1]
    return r[:q1], r[q1:]


def forward(F: Factor, r: np.ndarray) -> np.ndarray:
    """``L^{-1} r`` for ``r (q,)`` or ``(q, m)``."""
    r1, r2 = _split(F, r)
    J, p, _ = F.l11.shape
    x1 = np.einsum("jab,jb...->ja...", F.l11_inv, r1.reshape((J, p) + r1.shape[1:])).reshape(r1.shape)
    if r2.shape[0] == 0:
        return x1
    x2 = scipy.linalg.solve_triangular(F.l22, r2 - F.l21 @ x1, lower=True)
    return np.concatenate([x1, x2])


def backward(F: Factor, r: np.ndarray) -> np.ndarray:
    """``L^{-T} r`` for ``r (q,)`` or ``(q, m)``."""
    r1, r2 = _split(F, r)
    J, p, _ = F.l11.shape
    if r2.shape[0]:
        x2 = scipy.linalg.solve_triangular(F.l22, r2, lower=True, trans="T")
        r1 = r1 - F.l21.T @ x2
    x1 = np.einsum("jba,jb...->ja...", F.l11_inv, r1.reshape((J, p) + r1.shape[1:])).reshape(r1.shape)
    return np.concatenate([x1, x2]) if r2.shape[0] else x1


def _zl_dot(zl: tuple, u: np.ndarray) -> np.ndarray:
    """``Z Lambda u`` ``(n,)``."""
    out, pos = 0.0, 0
    for m in zl:
        out = out + m @ u[pos:pos + m.shape[1]]
        pos += m.shape[1]
    return out


def _zl_tdot(zl: tuple, r: np.ndarray) -> np.ndarray:
    """``Lambda' Z' r`` ``(q,)`` or ``(q, m)``."""
    return np.concatenate([m.T @ r for m in zl])


class Mode(NamedTuple):
    """PIRLS at its end: the conditional modes and what the criterion reads there.

    Attributes:
        u: ``(q,)`` spherical conditional modes (elimination order). beta: ``(p,)`` (given, or PIRLS's own
        when ``nAGQ = 0``). factor: :class:`Factor` at the weights at ``u``. logp: ``(n,)`` ``log p(y_i | u)``.
        objective: ``()`` ``-2 sum logp + |u|^2 + log|L|^2``. n_iter: PIRLS steps. converged: by ``_U_TOL``.
        rzx, rx: ``(q, p)`` ``L^{-1} Lambda' Z' W X`` and ``(p, p)`` lower factor of
        ``X' W X - RZX' RZX`` (lme4's ``RX``; its inverse product is lme4's non-Hessian ``vcov``); with
        ``beta`` given, ``None`` (:func:`fixed_factor` makes them).
    """

    u: np.ndarray
    beta: np.ndarray
    factor: Factor
    logp: np.ndarray
    objective: float
    n_iter: int
    converged: bool
    rzx: np.ndarray
    rx: np.ndarray


def _penalised(data, zl, u, beta):
    eta = data.offset + data.X @ beta + _zl_dot(zl, u)
    logp, mu, w, d = response(data, eta)
    return -2.0 * float(np.sum(logp)) + float(u @ u), (eta, logp, mu, w, d)


def fixed_factor(data: GlmmData, theta, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
    """``(RZX (q, p), RX (p, p))`` at the mode's weights (see :class:`Mode`)."""
    zl = zlambda(data, theta)
    eta = data.offset + data.X @ mode.beta + _zl_dot(zl, mode.u)
    return _fixed_part(data, zl, mode.factor, response(data, eta)[2])


def _fixed_part(data, zl, F, w):
    """``RZX (q, p)`` and ``RX (p, p)`` at weights ``w``."""
    rzx = forward(F, _zl_tdot(zl, w[:, None] * data.X))
    xtwx = data.X.T @ (w[:, None] * data.X) - rzx.T @ rzx
    return rzx, np.linalg.cholesky(xtwx)


def pirls(data: GlmmData, theta, beta=None, u0=None) -> Mode:
    """Conditional modes at ``theta`` and ``beta`` (``beta=None``: ``beta`` is found jointly with ``u``, as
    lme4's first stage, ``nAGQ = 0``). Fisher scoring with step halving on the penalised deviance.

    Args:
        data: :func:`glmm_data`. theta: ``(n_theta,)`` design order. beta: ``(p,)`` or ``None``.
        u0: ``(q,)`` start (zeros by default); with ``beta=None`` beta starts at the GLM's fit
            (:func:`_glm_start`).
    """
    zl = zlambda(data, theta)
    q = sum(m.shape[1] for m in zl)
    joint = beta is None
    u = np.zeros(q) if u0 is None else np.asarray(u0, np.float64)
    b = np.zeros(data.X.shape[1]) if joint else np.asarray(beta, np.float64)
    if joint:  # start beta at the GLM's working response from the response mean (as glm's start)
        b = _glm_start(data)
    pdev, (eta, logp, mu, w, d) = _penalised(data, zl, u, b)
    converged, it = False, 0
    for it in range(1, _MAX_ITER + 1):
        F = factor(zl, w)
        wz = w * ((eta - data.offset - (0.0 if joint else data.X @ b)) + (data.y - mu) / d)
        rhs_u = forward(F, _zl_tdot(zl, wz))
        if joint:
            rzx, rx = _fixed_part(data, zl, F, w)
            cb = scipy.linalg.solve_triangular(rx, data.X.T @ wz - rzx.T @ rhs_u, lower=True)
            b_new = scipy.linalg.solve_triangular(rx, cb, lower=True, trans="T")
            u_new = backward(F, rhs_u - rzx @ b_new)
        else:
            b_new, u_new = b, backward(F, rhs_u)
        du, db = u_new - u, b_new - b
        if max(np.max(np.abs(du), initial=0.0), np.max(np.abs(db), initial=0.0)) < _U_TOL:
            converged = True
            break
        step = 1.0
        for _ in range(_MAX_HALVINGS):
            new_pdev, new_state = _penalised(data, zl, u + step * du, b + step * db)
            if new_pdev <= pdev + 1e-12 * abs(pdev):
                break
            step /= 2.0
        u, b, pdev, (eta, logp, mu, w, d) = u + step * du, b + step * db, new_pdev, new_state
    F = factor(zl, w)
    rzx, rx = _fixed_part(data, zl, F, w) if joint else (None, None)
    obj = -2.0 * float(np.sum(logp)) + float(u @ u) + F.logdet
    return Mode(u, b, F, logp, obj, it, converged, rzx, rx)


def _glm_start(data: GlmmData) -> np.ndarray:
    """``beta (p,)`` of a few IRLS steps of the GLM without random effects, from the response's mean."""
    f, y = data.family, data.y
    with jax.enable_x64(True):
        eta = np.full_like(y, float(f.link.link(np.clip(np.mean(y), 1e-3, None))))
    beta = np.zeros(data.X.shape[1])
    for _ in range(8):
        _, mu, w, d = response(data, eta)
        z = eta - data.offset + (y - mu) / d
        beta = np.linalg.solve(data.X.T @ (w[:, None] * data.X), data.X.T @ (w * z))
        eta = data.offset + data.X @ beta
    return beta


def laplace_objective(data: GlmmData, theta, beta=None, u0=None) -> float:
    """glmer's ``-2 log L`` by the Laplace approximation at ``(theta, beta)`` (``beta=None``: the ``nAGQ = 0``
    criterion, beta at PIRLS's joint mode)."""
    return pirls(data, theta, beta, u0).objective


def effects(data: GlmmData, theta, mode: Mode) -> tuple[tuple, tuple]:
    """Conditional modes ``b_k = Lambda_k u_k`` ``(J_k, p_k)`` and conditional covariances
    ``Lambda_k [(L L')^{-1}]_kk Lambda_k'`` ``(J_k, p_k, p_k)`` per term, in design order (lme4's ``ranef``
    with ``condVar``: the factor at the PIRLS weights, ``beta`` held fixed)."""
    lams = _lambdas_numpy(np.asarray(theta, np.float64), data.n_coefs)
    F = mode.factor
    J1, p1, _ = F.l11.shape
    # diagonal blocks of (L L')^{-1} = L^{-T} L^{-1}: lead blocks via M = L22^{-1} L21 L11^{-1}
    inv11 = np.einsum("jca,jcb->jab", F.l11_inv, F.l11_inv)
    q2 = F.l22.shape[0]
    if q2:
        l22_inv = scipy.linalg.solve_triangular(F.l22, np.eye(q2), lower=True)
        M = -l22_inv @ (F.l21 @ _block_diag(F.l11_inv)).toarray()  # (q2, q1): block (2,1) of L^{-1}
        inv11 = inv11 + np.einsum("cja,cjb->jab", M.reshape(q2, J1, p1), M.reshape(q2, J1, p1))
        inv22 = l22_inv.T @ l22_inv
    out_b, out_v, pos = {}, {}, 0
    for slot, k in enumerate(data.order):
        J, p = data.n_levels[k], data.n_coefs[k]
        uk = mode.u[pos:pos + J * p].reshape(J, p)
        if slot == 0:
            vk = inv11
        else:
            s = pos - J1 * p1
            idx = s + np.arange(J)[:, None] * p + np.arange(p)[None, :]
            vk = inv22[idx[:, :, None], idx[:, None, :]]
        out_b[k] = uk @ lams[k].T
        out_v[k] = np.einsum("ab,jbc,dc->jad", lams[k], vk, lams[k])
        pos += J * p
    n = len(data.n_levels)
    return tuple(out_b[k] for k in range(n)), tuple(out_v[k] for k in range(n))
