"""The block-Gaussian family's moments (see :mod:`lmevi.q.variational` for the algebra): its design-only
cross-products (:class:`~lmevi.q.layout.BlockData`), the rows' means and variances under q, and each term's
and beta's moments, by gathers and ``jax.ops.segment_sum`` over the level codes (no dense Z).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.frame.design import Design
from lmevi.runtime.precision import level_rows, row_dot, row_segment_sum, wide
from lmevi.q.layout import Block, BlockData, BlockParams, QSpec


class _Piece(NamedTuple):
    """One part of a block's ``w``: a small term, or beta as a "term" whose one level every row shares.

    Attributes:
        index: ``(n_obs,)`` level codes, or ``None`` for beta (every row at level 0).
        covariates: ``(n_obs, p)`` covariates ``z_ik`` (``X`` for beta).
        n_levels: ``J`` (1 for beta).
        offset: where the piece starts in ``w``; it takes ``J p`` slots, level-major.
        unit: the covariates are the row weight (:attr:`lmevi.frame.design.TermData.unit`).
    """

    index: jax.Array | None
    covariates: jax.Array
    n_levels: int
    offset: int
    unit: bool = False

    @property
    def size(self) -> int:
        return self.n_levels * self.covariates.shape[1]


def _pieces(design: Design, spec: QSpec, block: Block) -> list[_Piece]:
    """The pieces of the block's small part ``w``, in their order in ``w`` (empty when ``p_w = 0``)."""
    offsets, at, _ = spec.small_offsets(block)
    terms = design.terms
    out = [_Piece(terms[k].index, terms[k].covariates, spec.n_levels[k], offsets[k], terms[k].unit) for k in block.small]
    if block.fixed:
        out.append(_Piece(None, design.X, 1, at))
    return out


def _pair_index(a_index, b_index, n_b: int):
    """Code of the level pair ``(g_a(i), g_b(i))`` among ``J_a J_b`` (``None`` stands for level 0)."""
    if a_index is None:
        return b_index
    if b_index is None:
        return a_index
    return a_index * n_b + b_index


def _pair_sum(za, a_index, n_a: int, zb, b_index, n_b: int) -> jax.Array:
    """``sum_i z_ia z_ib^T`` per pair of levels, by one segment sum; ``(J_a, p_a, J_b, p_b)``."""
    outer = wide(za)[:, :, None] * zb[:, None, :]
    idx = _pair_index(a_index, b_index, n_b)
    if idx is None:
        sums = jnp.sum(outer, axis=0)[None]
    else:
        sums = jax.ops.segment_sum(outer, idx, n_a * n_b)
    sums = sums.astype(za.dtype)
    return jnp.transpose(sums.reshape(n_a, n_b, za.shape[1], zb.shape[1]), (0, 2, 1, 3))


def _level_sum(z, index, n_levels: int) -> jax.Array:
    """``sum_i z_i z_i^T`` per level; ``(J, p, p)``."""
    outer = wide(z)[:, :, None] * z[:, None, :]
    if index is None:
        return jnp.sum(outer, axis=0)[None].astype(z.dtype)
    return jax.ops.segment_sum(outer, index, n_levels).astype(z.dtype)


def _gram(pieces: list[_Piece], pw: int, dtype) -> jax.Array:
    """``W^T W`` ``(p_w, p_w)`` from segment sums over the level pairs of every two pieces."""
    out = jnp.zeros((pw, pw), dtype)
    for a_i, a in enumerate(pieces):
        sa = slice(a.offset, a.offset + a.size)
        diag = _level_sum(a.covariates, a.index, a.n_levels)  # a row sits at one level of a piece
        eye = jnp.eye(a.n_levels, dtype=dtype)
        out = out.at[sa, sa].set(jnp.einsum("jk,jpq->jpkq", eye, diag).reshape(a.size, a.size))
        for b in pieces[a_i + 1 :]:
            sb = slice(b.offset, b.offset + b.size)
            cross = _pair_sum(a.covariates, a.index, a.n_levels, b.covariates, b.index, b.n_levels)
            cross = cross.reshape(a.size, b.size)
            out = out.at[sa, sb].set(cross).at[sb, sa].set(cross.T)
    return out


def block_data(design: Design, spec: QSpec) -> tuple[BlockData, ...]:
    """The per-block cross-products ``Z_L^T Z_L``, ``Z_L^T W`` and ``W^T W`` (segment sums over level pairs)."""
    out = []
    for block in spec.blocks:
        pieces = _pieces(design, spec, block)
        pw = spec.small_size(block)
        ZtZ = ZtW = WtW = None
        if pieces:
            WtW = _gram(pieces, pw, design.y.dtype)
        if block.large is not None:
            term = design.terms[block.large]
            z, g, J = term.covariates, term.index, term.n_levels
            ZtZ = _level_sum(z, g, J)
            if pieces:
                parts = [_pair_sum(z, g, J, a.covariates, a.index, a.n_levels) for a in pieces]
                ZtW = jnp.concatenate([c.reshape(J, z.shape[1], a.size) for c, a in zip(parts, pieces)], axis=2)
        out.append(BlockData(ZtZ=ZtZ, ZtW=ZtW, WtW=WtW))
    return tuple(out)


def _gathered_dot(z: jax.Array, table: jax.Array, index) -> jax.Array:
    """``z_i . table[g(i)]`` per row, ``(n_obs,)``; ``table`` ``(J, p)``, ``index`` ``None`` for level 0.

    Column by column with 1-D gathers, so that XLA fuses it into one pass over the rows (no ``(n_obs, p)``
    gathered array, and no matrix product with a handful of columns, slow on CPU).
    """
    out = 0.0
    for c in range(z.shape[1]):
        out = out + z[:, c] * (table[0, c] if index is None else level_rows(table[:, c], index))
    return out


def small_mean(design: Design, spec: QSpec, block: Block, loc_small: jax.Array) -> jax.Array:
    """``W m_w``: one gather per small term plus ``X beta_part``; ``(n_obs,)``."""
    return _gathered_sum(design, _small_parts(design, spec, block, loc_small))


def _small_parts(design: Design, spec: QSpec, block: Block, loc_small: jax.Array) -> list[tuple]:
    """``(z, table, index, unit)`` of each piece of the block's small part (:func:`_gathered_sum`), its
    ``(J, p)`` table cut from ``loc_small`` ``(p_w,)``."""
    return [(a.covariates, loc_small[a.offset : a.offset + a.size].reshape(a.n_levels, -1), a.index, a.unit)
            for a in _pieces(design, spec, block)]


def _gathered_sum(design: Design, parts) -> jax.Array:
    """``sum over parts of z_i . table[g(i)]``, ``(n_obs,)``, for parts ``(z, table, index, unit)``: the unit
    parts (``z`` the row weight) are summed first and multiplied by one of their ``z`` once, so a pass over
    the rows reads one weight column however many intercept-only terms it gathers."""
    mean = jnp.zeros_like(design.y)
    weight, units = None, 0.0
    for z, table, index, unit in parts:
        if unit:
            weight = z if weight is None else weight
            units = units + level_rows(table[:, 0], index)
        else:
            mean = mean + _gathered_dot(z, table, index)
    return mean if weight is None else mean + weight[:, 0] * units


def weighted_level_sums(
    z: jax.Array, r: jax.Array, index: jax.Array, n_levels: int, unit: bool = False, dtype=None
) -> jax.Array:
    """``sum_{i: g(i) = j} z_i r_i`` for every level j, ``(J, p)``, from ``z`` ``(n_obs, p)`` and ``r`` ``(n_obs,)``;
    accumulated in float64 and returned in ``dtype`` (default: ``r``'s).

    One 1-D segment sum per column: on XLA's CPU backend a segment sum of ``(n_obs, 1)`` rows ran 3x slower
    than of ``(n_obs,)`` at 1e6 rows. ``unit``: ``z`` is the row weight (:attr:`lmevi.frame.design.TermData.unit`)
    and ``r`` is already 0 on padding rows, so ``z`` is not read (a residual of the sweeps always is: the
    response, the covariates and therefore every mean are 0 there).
    """
    if unit:
        return row_segment_sum(r, index, n_levels, dtype)[:, None]
    return jnp.stack([row_segment_sum(z[:, c] * r, index, n_levels, dtype) for c in range(z.shape[1])], axis=1)


def small_crossprod(design: Design, spec: QSpec, block: Block, r: jax.Array, dtype=None) -> jax.Array:
    """``W^T r``: one segment sum per small term plus ``X^T r``; ``(p_w,)``, in ``dtype`` (default: ``r``'s).
    ``r`` must be 0 on padding rows (see :func:`weighted_level_sums`)."""
    parts = []
    for a in _pieces(design, spec, block):
        if a.index is None:
            # as (n_obs,) @ (n_obs, p): XLA then does not copy X transposed
            parts.append(row_dot(r, a.covariates, dtype))
        else:
            parts.append(weighted_level_sums(a.covariates, r, a.index, a.n_levels, a.unit, dtype).reshape(-1))
    return jnp.concatenate(parts)


def _bilinear(za, table, index, zb) -> jax.Array:
    """``z_ia^T table[index(i)] z_ib`` per row; ``table`` ``(J, p_a, p_b)``, ``index`` ``None`` for level 0."""
    pa, pb = table.shape[1:]
    total = 0.0
    # one scalar gather per entry keeps each product a fused pass over the rows: no (n_obs, p_a, p_b) array,
    # and no matrix product with a handful of columns (slow on CPU)
    for p in range(pa):
        for q in range(pb):
            entry = table[0, p, q] if index is None else level_rows(table[:, p, q], index)
            total = total + za[:, p] * entry * zb[:, q]
    return total


def _small_row_var(design: Design, spec: QSpec, block: Block, bp: BlockParams) -> jax.Array:
    """The small part's share of ``Var(eta_i)`` including its coupling to the large term; ``(n_obs,)``.

    All terms of the module docstring's ``Var(eta_i)`` but ``z^T T_g T_g^T z``: a sum of bilinear forms
    ``z_ia^T table[level(s) of row i] z_ib``, whose tables are per-level (or per level pair) blocks of ``V``
    and of ``G = K V``, formed first (``O(J_L p_L p_w^2)``) and then gathered.
    """
    pieces = _pieces(design, spec, block)
    V = bp.chol_small @ bp.chol_small.T
    forms = []  # (z_a, index or None, z_b, scale); the tables go in a separate list
    tables = []
    if block.large is not None:
        term = design.terms[block.large]
        z, g, J, pL = term.covariates, term.index, term.n_levels, term.covariates.shape[1]
        G = jnp.einsum("jpw,wv->jpv", bp.coupling, V)
        tables.append(jnp.einsum("jpv,jqv->jpq", G, bp.coupling))
        forms.append((z, g, z, 1.0))
        for a in pieces:
            pa = a.covariates.shape[1]
            tab = G[:, :, a.offset : a.offset + a.size].reshape(J, pL, a.n_levels, pa)
            tables.append(jnp.transpose(tab, (0, 2, 1, 3)).reshape(J * a.n_levels, pL, pa))
            forms.append((z, _pair_index(g, a.index, a.n_levels), a.covariates, 2.0))
    for a_i, a in enumerate(pieces):
        pa = a.covariates.shape[1]
        sa = slice(a.offset, a.offset + a.size)
        # diagonal blocks of V (a row has one level of each piece), taken by indexing: as a reduction XLA would
        # fuse it into the pass over the rows and redo it for every row
        levels = jnp.arange(a.n_levels)
        tables.append(V[sa, sa].reshape(a.n_levels, pa, a.n_levels, pa)[levels, :, levels, :])
        forms.append((a.covariates, a.index, a.covariates, 1.0))
        for b in pieces[a_i + 1 :]:
            pb = b.covariates.shape[1]
            Vab = V[sa, b.offset : b.offset + b.size].reshape(a.n_levels, pa, b.n_levels, pb)
            tables.append(jnp.transpose(Vab, (0, 2, 1, 3)).reshape(a.n_levels * b.n_levels, pa, pb))
            forms.append((a.covariates, _pair_index(a.index, b.index, b.n_levels), b.covariates, 2.0))
    var = jnp.zeros_like(design.y)
    for tab, (za, index, zb, scale) in zip(tables, forms):
        var = var + scale * _bilinear(za, tab, index, zb)
    return var


def row_moments(design: Design, spec: QSpec, blocks, data) -> tuple[jax.Array, jax.Array]:
    """Mean and variance under q of the random part of every row's predictor.

    The random part is ``sum_k z_ik . b_k,g_k(i)`` plus ``x_i beta`` when beta is in q.

    Returns:
        ``(mean (n_obs,), var (n_obs,))``.
    """
    mean = jnp.zeros_like(design.y)
    var = jnp.zeros_like(design.y)
    for i, block in enumerate(spec.blocks):
        m, v = _block_row_moments(design, spec, block, blocks[i])
        mean, var = mean + m, var + v
    return mean, var


def block_row_moments(design: Design, block: Block, bp: BlockParams, bd: BlockData):
    """Mean and variance of one block's share of each row's predictor; ``(n_obs,)`` each."""
    return _block_row_moments(design, _spec_of(design, block), block, bp)


def _block_row_moments(design: Design, spec: QSpec, block: Block, bp: BlockParams):
    mean = _block_mean(design, spec, block, bp)
    var = jnp.zeros_like(design.y)
    if block.large is not None:
        term = design.terms[block.large]
        tz = jnp.einsum("np,npq->nq", term.covariates, level_rows(bp.chol_large, term.index))
        var = var + jnp.sum(tz**2, axis=-1)
    if bp.loc_small is not None:
        var = var + _small_row_var(design, spec, block, bp)
    return mean, var


def block_mean(design: Design, block: Block, bp: BlockParams, bd: BlockData) -> jax.Array:
    """Mean only of one block's share of each row's predictor, ``(n_obs,)``."""
    return _block_mean(design, _spec_of(design, block), block, bp)


def _block_mean(design: Design, spec: QSpec, block: Block, bp: BlockParams) -> jax.Array:
    parts = []
    if block.large is not None:
        term = design.terms[block.large]
        parts.append((term.covariates, bp.loc_large, term.index, term.unit))
    if bp.loc_small is not None:
        parts += _small_parts(design, spec, block, bp.loc_small)
    return _gathered_sum(design, parts)


def _spec_of(design: Design, block: Block) -> QSpec:
    """A spec with the shapes one block's functions need, read off the design (for callers that pass none)."""
    return QSpec(
        name="",
        blocks=(block,),
        n_levels=tuple(t.n_levels for t in design.terms),
        n_coefs=tuple(t.covariates.shape[1] for t in design.terms),
        n_fixed=design.X.shape[1],
        reml=block.fixed,
    )


def row_mean(design: Design, spec: QSpec, blocks) -> jax.Array:
    """``E_q`` of the random part of every row's predictor (the mean of :func:`row_moments`), ``(n_obs,)``."""
    mean = jnp.zeros_like(design.y)
    for block, bp in zip(spec.blocks, blocks):
        mean = mean + _block_mean(design, spec, block, bp)
    return mean


def row_var_sum(spec: QSpec, blocks, data) -> jax.Array:
    """``sum_i Var_q(eta_i)`` (the sum of :func:`row_moments`' variances) without a pass over the rows.

    Summed over the rows, each quadratic form of the module docstring's ``Var(eta_i)`` is a trace against the
    design cross-products of :class:`BlockData`::

        sum_i Var(eta_i) = sum_B [ sum_j tr((T_j T_j^T + G_j K_j^T) Z_j^T Z_j) + 2 sum_j tr(G_j W^T Z_j)
                                   + tr(V W^T W) ]

    so it costs ``O(J_L p_L p_w^2 + p_w^2)`` per block. Returns ``()``.
    """
    total = 0.0
    for bp, bd in zip(blocks, data):
        M = None
        if bp.chol_large is not None:
            M = jnp.einsum("jpq,jrq->jpr", bp.chol_large, bp.chol_large)
        if bp.chol_small is not None:
            V = bp.chol_small @ bp.chol_small.T
            total = total + jnp.sum(V * bd.WtW)
            if M is not None:
                G = jnp.einsum("jpw,wv->jpv", bp.coupling, V)
                M = M + jnp.einsum("jpv,jqv->jpq", G, bp.coupling)
                total = total + 2.0 * jnp.sum(G * bd.ZtW)
        if M is not None:
            total = total + jnp.sum(M * bd.ZtZ)
    return total


def term_moments(spec: QSpec, blocks, k: int, given_beta: bool = False) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and covariance of every level of term ``k`` under q.

    Args:
        spec: the family.
        blocks: q's block parameters.
        k: the term.
        given_beta: when beta is in q, return the covariance conditional on beta (what lme4's
            ``condVar`` reports: it conditions on the estimated fixed effects) instead of the marginal one.

    Returns:
        ``(mean (J_k, p_k), cov (J_k, p_k, p_k))``.
    """
    bi = spec.block_of(k)
    block, bp = spec.blocks[bi], blocks[bi]
    xp = _xp(*bp)
    V = None
    if bp.chol_small is not None:
        V = bp.chol_small @ bp.chol_small.T
        if given_beta and block.fixed:
            V = _condition_on_fixed(spec, block, V, xp)
    if block.large == k:
        cov = xp.einsum("jpq,jrq->jpr", bp.chol_large, bp.chol_large)
        if V is not None:
            cov = cov + xp.einsum("jpw,wv,jrv->jpr", bp.coupling, V, bp.coupling)
        return bp.loc_large, cov
    offsets, _, _ = spec.small_offsets(block)
    J, p = spec.n_levels[k], spec.n_coefs[k]
    start = offsets[k]
    mean = bp.loc_small[start : start + J * p].reshape(J, p)
    sub = V[start : start + J * p, start : start + J * p].reshape(J, p, J, p)
    return mean, xp.einsum("jpjr->jpr", sub)


def _xp(*arrays):
    """NumPy when every array given is a host array (a fit's results: nothing to compile), else jax.numpy."""
    return np if all(isinstance(a, np.ndarray) for a in arrays if a is not None) else jnp


def _condition_on_fixed(spec: QSpec, block: Block, V: jax.Array, xp=jnp) -> jax.Array:
    """``Cov(w | beta)``: the Schur complement of beta's slots in ``V``, zero in beta's rows and columns."""
    _, at, pw = spec.small_offsets(block)
    idx = xp.arange(pw)
    is_fixed = (idx >= at) & (idx < at + spec.n_fixed)
    Vbb = V[at : at + spec.n_fixed, at : at + spec.n_fixed]
    Vwb = V[:, at : at + spec.n_fixed]
    cond = V - Vwb @ xp.linalg.solve(Vbb, Vwb.T)
    mask = (~is_fixed)[:, None] & (~is_fixed)[None, :]
    return xp.where(mask, cond, 0.0)


def fixed_moments(spec: QSpec, blocks) -> tuple[jax.Array, jax.Array]:
    """Mean ``(p,)`` and covariance ``(p, p)`` of beta under q (only when ``spec.reml``)."""
    bi = spec.fixed_block()
    block, bp = spec.blocks[bi], blocks[bi]
    _, at, _ = spec.small_offsets(block)
    mean = bp.loc_small[at : at + spec.n_fixed]
    rows = bp.chol_small[at : at + spec.n_fixed]
    return mean, rows @ rows.T


def second_moment_sum(spec: QSpec, blocks, k: int, mask: jax.Array | None = None) -> jax.Array:
    """``sum_j E_q[b_kj b_kj^T]``, ``(p_k, p_k)``: what both the prior term and the M-step need.

    ``mask`` ``(J_k,)`` (1 for a level of the data, 0 for a padding level) leaves padding levels out."""
    mean, cov = term_moments(spec, blocks, k)
    if mask is not None:
        mean, cov = mean * mask[:, None], cov * mask[:, None, None]
    return jnp.einsum("jp,jq->pq", mean, mean) + jnp.sum(cov, axis=0)
