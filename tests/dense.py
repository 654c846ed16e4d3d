"""Naive dense references for the tests: the matrices the library never forms.

``Z``, the full covariance of q and the prior precision are built densely here so that the segment-sum code
of :mod:`lmevi` can be checked against textbook linear algebra on small designs. Coordinates of the dense
vectors are ordered term by term, each term level-major (the ``p_k`` coefficients of level 0, then of
level 1, ...), i.e. ``b_k.reshape(-1)`` of a ``(J_k, p_k)`` array, then beta when beta is in q.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmevi.frame.design import Design, DesignInfo, build_design
from lmevi.q.layout import BlockParams, QSpec
from lmevi.q.variational import VIParams
from lmevi.frame.formula import parse_formula
from lmevi.q.model import ModelParams


class Problem(NamedTuple):
    """A small design with its dense counterpart.

    Attributes:
        frame: the data.
        design, info: what :func:`lmevi.frame.design.build_design` made of it.
        Z: one dense ``(n_obs, J_k p_k)`` matrix per random term, built row by row from ``frame``.
        X: ``(n_obs, p)`` fixed-effects design.
    """

    frame: pd.DataFrame
    design: Design
    info: DesignInfo
    Z: tuple[np.ndarray, ...]
    X: np.ndarray


def dense_z(frame: pd.DataFrame, info: DesignInfo) -> tuple[np.ndarray, ...]:
    """Dense ``Z_k`` of every term, one row at a time: a row's covariates land in its level's slot.

    Only plain grouping columns and covariates named like the frame's columns are supported, which is
    all the fixtures use.
    """
    out = []
    for term in info.terms:
        (col,) = term.group_columns
        p = term.n_coefs
        Z = np.zeros((len(frame), term.n_levels * p))
        for i, (label, row) in enumerate(zip(frame[col].astype(str), frame.itertuples(index=False))):
            j = term.levels.index(label)
            for c, name in enumerate(term.coef_names):
                Z[i, j * p + c] = 1.0 if name == "(Intercept)" else getattr(row, name)
        out.append(Z)
    return tuple(out)


def make_problem(frame: pd.DataFrame, formula: str) -> Problem:
    design, info = build_design(parse_formula(formula), frame)
    return Problem(frame, design, info, dense_z(frame, info), np.asarray(design.X))


# ----------------------------------------------------------------------------------------------------
# Random, non-trivial parameters


def random_lower(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.5) -> np.ndarray:
    """Lower-triangular matrices with positive diagonals and non-zero entries below it."""
    a = np.tril(rng.normal(0.0, scale, shape))
    p = shape[-1]
    diag = scale * np.exp(rng.normal(0.0, 0.3, shape[:-1]))
    idx = np.arange(p)
    a[..., idx, idx] = diag
    return a


def random_params(seed: int, spec: QSpec, sigma: float = 1.3) -> VIParams:
    """Random model point estimates and random block parameters of q (coupling included)."""
    rng = np.random.default_rng(seed)
    chol = tuple(jnp.asarray(random_lower(rng, (p, p), 0.8)) for p in spec.n_coefs)
    beta = None if spec.reml else jnp.asarray(rng.normal(size=spec.n_fixed))
    model = ModelParams(beta=beta, chol=chol, sigma=jnp.asarray(sigma))
    blocks = []
    for block in spec.blocks:
        loc_l = chol_l = coup = loc_s = chol_s = None
        pw = spec.small_size(block)
        if block.large is not None:
            J, p = spec.n_levels[block.large], spec.n_coefs[block.large]
            loc_l = jnp.asarray(rng.normal(size=(J, p)))
            chol_l = jnp.asarray(random_lower(rng, (J, p, p), 0.4))
            if pw:
                coup = jnp.asarray(rng.normal(0.0, 0.3, (J, p, pw)))
        if pw:
            loc_s = jnp.asarray(rng.normal(size=pw))
            chol_s = jnp.asarray(random_lower(rng, (pw, pw), 0.3))
        blocks.append(BlockParams(loc_l, chol_l, coup, loc_s, chol_s))
    return VIParams(model=model, blocks=tuple(blocks))


# ----------------------------------------------------------------------------------------------------
# Dense q


def coordinates(spec: QSpec) -> tuple[list[slice], slice | None, int]:
    """Slices of each term and of beta in the dense vector, and its length."""
    slices, pos = [], 0
    for J, p in zip(spec.n_levels, spec.n_coefs):
        slices.append(slice(pos, pos + J * p))
        pos += J * p
    beta = None
    if spec.reml:
        beta = slice(pos, pos + spec.n_fixed)
        pos += spec.n_fixed
    return slices, beta, pos


def block_coordinates(spec: QSpec, block) -> tuple[np.ndarray, np.ndarray]:
    """Dense indices of a block's large term and of its small part ``w`` (small terms, then beta)."""
    slices, beta, _ = coordinates(spec)
    large = np.arange(0) if block.large is None else np.arange(slices[block.large].start, slices[block.large].stop)
    parts = [np.arange(slices[k].start, slices[k].stop) for k in block.small]
    if block.fixed:
        parts.append(np.arange(beta.start, beta.stop))
    small = np.concatenate(parts) if parts else np.arange(0)
    return large, small


def dense_block(bp: BlockParams) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of one block in its own coordinates ``(b_L, w)``.

    ``w ~ N(m_w, U U^T)`` and ``b_L = m_L + K (w - m_w) + blockdiag(T_j) eps``, so
    ``Cov(b_L) = blockdiag(T_j T_j^T) + K V K^T`` and ``Cov(b_L, w) = K V`` with ``V = U U^T``.
    """
    means, covs = [], []
    if bp.loc_large is not None:
        T = np.asarray(bp.chol_large)
        J, p, _ = T.shape
        D = np.zeros((J * p, J * p))
        for j in range(J):
            D[j * p : (j + 1) * p, j * p : (j + 1) * p] = T[j] @ T[j].T
        means.append(np.asarray(bp.loc_large).reshape(-1))
    if bp.loc_small is None:
        return means[0], D
    U = np.asarray(bp.chol_small)
    V = U @ U.T
    if bp.loc_large is None:
        return np.asarray(bp.loc_small), V
    K = np.asarray(bp.coupling).reshape(J * p, -1)
    cov = np.block([[D + K @ V @ K.T, K @ V], [V @ K.T, V]])
    return np.concatenate([means[0], np.asarray(bp.loc_small)]), cov


def dense_q(spec: QSpec, blocks) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of the whole q (zero between blocks)."""
    _, _, dim = coordinates(spec)
    mean, cov = np.zeros(dim), np.zeros((dim, dim))
    for block, bp in zip(spec.blocks, blocks):
        large, small = block_coordinates(spec, block)
        idx = np.concatenate([large, small])
        m, c = dense_block(bp)
        mean[idx] = m
        cov[np.ix_(idx, idx)] = c
    return mean, cov


def dense_design(problem: Problem, spec: QSpec) -> np.ndarray:
    """``[Z_1, ..., Z_K, X]`` (``X`` only when beta is in q): the rows the dense q vector multiplies."""
    parts = list(problem.Z)
    if spec.reml:
        parts.append(problem.X)
    return np.concatenate(parts, axis=1)


def dense_prior_precision(spec: QSpec, chol) -> np.ndarray:
    """``blockdiag(I_{J_k} kron Sigma_k^{-1})`` over the terms, zeros for beta's flat prior."""
    _, _, dim = coordinates(spec)
    P = np.zeros((dim, dim))
    pos = 0
    for J, L in zip(spec.n_levels, chol):
        L = np.asarray(L)
        block = np.kron(np.eye(J), np.linalg.inv(L @ L.T))
        P[pos : pos + block.shape[0], pos : pos + block.shape[0]] = block
        pos += block.shape[0]
    return P


def kernel_problem(design: Design, spec, fixed_sigma: float | None = None):
    """The kernels' :class:`lmevi.fitting.build.Problem` for ``design`` under ``spec`` (Gaussian likelihood)."""
    from lmevi.fitting.build import make_problem

    return make_problem(design, spec, fixed_sigma=fixed_sigma)


def dense_kl_part(spec: QSpec, params: VIParams, mean: np.ndarray, cov: np.ndarray) -> float:
    """``E_q[log p(b)] + H[q]`` for q's dense ``mean`` and ``cov`` (:func:`dense_q`):
    ``-D/2 log 2 pi + 1/2 log|P| - 1/2 (m^T P m + tr(P C))`` over the random effects plus
    ``H = 1/2 log|2 pi e C|`` over all of q (beta included when it is in q)."""
    slices, _, _ = coordinates(spec)
    b = np.concatenate([np.arange(s.start, s.stop) for s in slices])
    P = dense_prior_precision(spec, params.model.chol)[np.ix_(b, b)]
    m_b, C_b = mean[b], cov[np.ix_(b, b)]
    prior = (
        -0.5 * len(b) * np.log(2 * np.pi)
        + 0.5 * np.linalg.slogdet(P)[1]
        - 0.5 * (m_b @ P @ m_b + np.trace(P @ C_b))
    )
    entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1]
    return prior + entropy
