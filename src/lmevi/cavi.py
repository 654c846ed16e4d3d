r"""Coordinate ascent: closed-form block updates of q and the M-step of variational EM.

Each step maximises the closed-form ELBO exactly in one group of variables with the rest held fixed, so
the ELBO never decreases (Bishop 2006, sec. 10.1; Blei, Kucukelbir & McAuliffe 2017, CAVI).

Block update (one large term L plus small part w; see :mod:`lmevi.family`). With ``r`` the response minus
everything outside the block, the optimal q_B is Gaussian with precision ``Lambda = [[D, C], [C^T, A]]``::

    D_j = sum_{i in j} z_i z_i^T / sigma^2 + Sigma_L^{-1}        (p_L x p_L per level)
    C_j = sum_{i in j} z_i w_i^T / sigma^2                        (p_L x p_w per level)
    A   = W^T W / sigma^2 + blockdiag(Sigma_s^{-1} per small level; 0 for beta's flat prior)
    h_L = segment_sum(z_i r_i) / sigma^2,   h_w = W^T r / sigma^2

and, through the Schur complement ``S = A - sum_j C_j^T D_j^{-1} C_j``,
``m_w = S^{-1}(h_w - sum_j C_j^T D_j^{-1} h_Lj)``, ``m_Lj = D_j^{-1}(h_Lj - C_j m_w)``,
``K_j = -D_j^{-1} C_j``, ``T_j T_j^T = D_j^{-1}``, ``U U^T = S^{-1}``.

M-step given q: ``beta = (X^T X)^{-1} X^T (y - E eta)`` when beta is a point estimate,
``Sigma_k = (1/J_k) sum_j E_q[b_kj b_kj^T]``, ``sigma^2 = (1/n) sum_i E_q[(y_i - x_i beta - eta_i)^2]``
(skipped when sigma is fixed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmevi import elbo as elbo_lib
from lmevi import family
from lmevi.design import Design
from lmevi.family import Block, BlockData, BlockParams, FamilySpec, VIParams
from lmevi.model import ModelParams


def _prior_precision(L: jax.Array) -> jax.Array:
    """``Sigma^{-1}`` from its lower Cholesky factor ``L``; ``(p, p)``."""
    eye = jnp.eye(L.shape[0], dtype=L.dtype)
    return jax.scipy.linalg.cho_solve((L, True), eye)


def small_prior_precision(spec: FamilySpec, block: Block, chol: tuple[jax.Array, ...], dtype) -> jax.Array:
    """Block-diagonal prior precision of the small part ``w``; zeros for beta. ``(p_w, p_w)``."""
    parts = []
    for k in block.small:
        parts.append(jnp.kron(jnp.eye(spec.n_levels[k], dtype=dtype), _prior_precision(chol[k])))
    if block.fixed:
        parts.append(jnp.zeros((spec.n_fixed, spec.n_fixed), dtype))
    return jax.scipy.linalg.block_diag(*parts)


def update_block(
    design: Design, spec: FamilySpec, block: Block, bd: BlockData, model: ModelParams, resid: jax.Array
) -> BlockParams:
    """The optimal q for one block given everything else.

    Args:
        design: the model's arrays.
        spec: the family.
        block: which block.
        bd: its design-only arrays.
        model: current point estimates.
        resid: ``(n_obs,)`` response minus the fixed part and the other blocks' means.

    Returns:
        The block's new :class:`BlockParams`.
    """
    s2 = model.sigma**2
    dtype = design.y.dtype
    loc_l = chol_l = coup = loc_s = chol_s = None
    if block.large is not None:
        term = design.terms[block.large]
        D = bd.ZtZ / s2 + _prior_precision(model.chol[block.large])
        h_l = jax.ops.segment_sum(term.covariates * resid[:, None], term.index, term.n_levels) / s2
        cD = jnp.linalg.cholesky(D)
        solve_d = jax.vmap(lambda c, b: jax.scipy.linalg.cho_solve((c, True), b))
        d_h = solve_d(cD, h_l)
    if bd.W is not None:
        A = bd.WtW / s2 + small_prior_precision(spec, block, model.chol, dtype)
        rhs = bd.W.T @ resid / s2
        if block.large is not None:
            C = bd.ZtW / s2
            d_c = solve_d(cD, C)
            A = A - jnp.einsum("jpw,jpv->wv", C, d_c)
            rhs = rhs - jnp.einsum("jpw,jp->w", C, d_h)
        S = 0.5 * (A + A.T)
        cS = jnp.linalg.cholesky(S)
        loc_s = jax.scipy.linalg.cho_solve((cS, True), rhs)
        V = jax.scipy.linalg.cho_solve((cS, True), jnp.eye(S.shape[0], dtype=dtype))
        chol_s = jnp.linalg.cholesky(0.5 * (V + V.T))
    if block.large is not None:
        p = D.shape[-1]
        eye = jnp.broadcast_to(jnp.eye(p, dtype=dtype), D.shape)
        d_inv = solve_d(cD, eye)
        chol_l = jnp.linalg.cholesky(0.5 * (d_inv + jnp.swapaxes(d_inv, 1, 2)))
        loc_l = d_h
        if bd.W is not None:
            coup = -d_c
            loc_l = d_h - jnp.einsum("jpw,w->jp", d_c, loc_s)
    return BlockParams(loc_l, chol_l, coup, loc_s, chol_s)


def update_blocks(design: Design, spec: FamilySpec, params: VIParams, data) -> VIParams:
    """One pass of block updates, in order, each against the latest means of the others."""
    base = design.y - elbo_lib.fixed_part(design, params)
    blocks = list(params.blocks)
    means = [family.block_mean(design, b, bp, bd) for b, bp, bd in zip(spec.blocks, blocks, data)]
    total = sum(means)
    for i, block in enumerate(spec.blocks):
        others = total - means[i]
        blocks[i] = update_block(design, spec, block, data[i], params.model, base - others)
        means[i] = family.block_mean(design, block, blocks[i], data[i])
        total = others + means[i]
    return VIParams(model=params.model, blocks=tuple(blocks))


def m_step(
    design: Design, spec: FamilySpec, params: VIParams, data, estimate_sigma: bool
) -> tuple[VIParams, jax.Array]:
    """Closed-form point estimates given q, and the ELBO at the result.

    Returns:
        ``(params, elbo)`` with ``elbo`` ``()`` the closed-form ELBO after the update.
    """
    mean, var = family.row_moments(design, spec, params.blocks, data)
    model = params.model
    beta = model.beta
    if beta is not None:
        beta = jnp.linalg.solve(design.X.T @ design.X, design.X.T @ (design.y - mean))
        resid = design.y - design.X @ beta - mean
    else:
        resid = design.y - mean
    n = design.y.shape[0]
    sq, vs = jnp.sum(resid**2), jnp.sum(var)
    sigma = jnp.sqrt((sq + vs) / n) if estimate_sigma else model.sigma
    chol = []
    for k in range(len(spec.n_levels)):
        cov = family.second_moment_sum(spec, params.blocks, k) / spec.n_levels[k]
        chol.append(jnp.linalg.cholesky(0.5 * (cov + cov.T)))
    new = VIParams(model=ModelParams(beta=beta, chol=tuple(chol), sigma=sigma), blocks=params.blocks)
    value = elbo_lib.expected_log_likelihood(sq, vs, n, sigma) + elbo_lib.kl_part(spec, new)
    return new, value


def sweep(design: Design, spec: FamilySpec, params: VIParams, data, estimate_sigma: bool):
    """Block updates then the M-step; returns ``(params, elbo)``."""
    params = update_blocks(design, spec, params, data)
    return m_step(design, spec, params, data, estimate_sigma)
