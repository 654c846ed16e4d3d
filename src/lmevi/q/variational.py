r"""Family stage: Gaussian variational families over the random effects (and, REML-like, beta).

q factorises across *blocks*. A block holds

* at most one *large* term ``L`` (``J_L`` levels, ``p_L`` coefficients each), whose levels are
  independent of each other given the rest of the block, and
* a *small* part ``w`` (``p_w`` numbers): the coefficients of a few small terms (all their levels) and,
  when ``reml=True``, the fixed effects beta; ``w`` is jointly Gaussian with a dense covariance.

Conditional parameterisation of one block (Goplerud, Papaspiliopoulos & Zanella 2024 call this family
partially factorised)::

    w          ~ N(m_w, U U^T)                                  U: (p_w, p_w) lower triangular
    b_Lj | w   ~ N(m_Lj + K_j (w - m_w), T_j T_j^T)             T_j: (p_L, p_L), K_j: (p_L, p_w)

It is the arrowhead-precision Gaussian of the notes in other coordinates: with
``Lambda = [[D, C], [C^T, A]]`` (``D`` block diagonal per level), ``T_j T_j^T = D_j^{-1}``,
``K_j = -D_j^{-1} C_j`` and ``U U^T = S^{-1}`` with the Schur complement ``S = A - sum_j C_j^T D_j^{-1} C_j``.
Everything the ELBO needs costs one pass over the rows (for the means) plus ``O(J_L p_L p_w^2 + p_w^3)``,
and no ``J_L x J_L`` matrix::

    Cov(b_Lj, w)  = K_j U U^T
    Var(b_Lj)     = T_j T_j^T + (K_j U)(K_j U)^T
    log|Cov q|    = 2 sum_j log|T_j| + 2 log|U|
    Var(eta_i)    = z^T (T_g T_g^T + G_g K_g^T) z + 2 z^T G_g w_i + w_i^T V w_i     (g = g_L(i), z = z_iL)

with ``V = U U^T`` and ``G_j = K_j V`` ``(p_L, p_w)``. Here ``w_i`` is row i of the small-part design ``W``
``(n_obs, p_w)`` (the level slots of the small terms times their covariates, and ``x_i`` when beta is in the
block), which is never formed: row i has non-zeros only in the slots of its own levels, so ``W m_w``,
``W^T r`` and the quadratic forms above are gathers and ``jax.ops.segment_sum`` over the level codes, as for
a large term. In particular ``w_i^T V w_i = sum_{k,l} z_ik^T V[slot_k(i), slot_l(i)] z_il`` over the small
terms and beta (beta's "level" is the same for every row), and the cross terms gather ``G`` at the pair of
levels ``(g_L(i), g_k(i))``; every table gathered has at most ``J_L J_k p_L p_k`` entries. Summed over the
rows, as the ELBO and the M-step need them, the variances are traces against the cross-products of
:class:`BlockData` (:func:`row_var_sum`) and take no pass over the rows at all.

* ``q="meanfield"``: every term is its own block with no small part (the Edward tutorial's fully
  factorised normal when every term is a random intercept; with slopes, a full ``p_k x p_k`` covariance
  per level), and beta, if in q, a block of its own.
* ``q="structured"``: each small term (``J_k p_k <= small_threshold``) joins the block of the large
  term it is most nested in (share of its rows explained by the large term's levels, 1.0 for exact
  nesting); beta joins the block with the most entangled small terms. Without large terms everything is
  one dense block, and q is then the exact conditional posterior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.runtime.collective import LOCAL, Local
from lmevi.frame.design import Design, DesignInfo
from lmevi.q.model import LOG_2PI, ModelParams, log_abs_diag
from lmevi.q.protocol import VIParams
from lmevi.runtime.precision import level_rows, row_dot, row_segment_sum, wide


@dataclass(frozen=True)
class Block:
    """Which coefficients share one Gaussian factor of q.

    Attributes:
        large: index of the large term, or ``None``.
        small: indices of the small terms, in order.
        fixed: whether beta is in this block (REML-like fits).
    """

    large: int | None
    small: tuple[int, ...] = ()
    fixed: bool = False


@dataclass(frozen=True)
class QSpec:
    """Static description of q: the blocks plus the shapes they need (hashable, used as a jit key).

    Attributes:
        name: ``"meanfield"`` or ``"structured"``.
        blocks: the blocks; every term is in exactly one, beta in at most one.
        n_levels: ``(K,)`` levels per term.
        n_coefs: ``(K,)`` coefficients per term.
        n_fixed: number of fixed effects.
        reml: whether beta is in q (flat prior) rather than a point estimate.
    """

    name: str
    blocks: tuple[Block, ...]
    n_levels: tuple[int, ...]
    n_coefs: tuple[int, ...]
    n_fixed: int
    reml: bool

    def small_offsets(self, block: Block) -> tuple[dict[int, int], int, int]:
        """Offsets in ``w`` of each small term and of beta, and ``p_w``."""
        offsets, pos = {}, 0
        for k in block.small:
            offsets[k] = pos
            pos += self.n_levels[k] * self.n_coefs[k]
        fixed_at = pos
        if block.fixed:
            pos += self.n_fixed
        return offsets, fixed_at, pos

    def small_size(self, block: Block) -> int:
        return self.small_offsets(block)[2]

    def block_of(self, term: int) -> int:
        for i, b in enumerate(self.blocks):
            if b.large == term or term in b.small:
                return i
        raise KeyError(term)

    def fixed_block(self) -> int | None:
        for i, b in enumerate(self.blocks):
            if b.fixed:
                return i
        return None


class BlockParams(NamedTuple):
    """Parameters of one block of q (see the module docstring); absent parts are ``None``.

    Attributes:
        loc_large: ``(J_L, p_L)`` conditional means ``m_L``.
        chol_large: ``(J_L, p_L, p_L)`` lower-triangular ``T_j``.
        coupling: ``(J_L, p_L, p_w)`` regression of ``b_L`` on ``w``, ``K_j``.
        loc_small: ``(p_w,)`` mean ``m_w``.
        chol_small: ``(p_w, p_w)`` lower-triangular ``U``.
    """

    loc_large: jax.Array | None
    chol_large: jax.Array | None
    coupling: jax.Array | None
    loc_small: jax.Array | None
    chol_small: jax.Array | None


class BlockData(NamedTuple):
    """Design-only cross-products of one block, computed once per fit by segment sums over level pairs.

    ``W`` is the block's small-part design (see the module docstring); it is never formed.

    Attributes:
        ZtZ: ``(J_L, p_L, p_L)`` per-level ``sum_i z_i z_i^T`` of the large term, or ``None``.
        ZtW: ``(J_L, p_L, p_w)`` per-level ``sum_i z_i w_i^T``, or ``None``.
        WtW: ``(p_w, p_w)`` ``W^T W``, or ``None`` when ``p_w = 0``.
    """

    ZtZ: jax.Array | None
    ZtW: jax.Array | None
    WtW: jax.Array | None


# ----------------------------------------------------------------------------------------------------
# Choosing the blocks


def meanfield_spec(info: DesignInfo, reml: bool) -> QSpec:
    """Every term its own block, beta (if in q) a block of its own."""
    n_terms = len(info.terms)
    blocks = [Block(large=k) for k in range(n_terms)]
    if reml:
        blocks.append(Block(large=None, fixed=True))
    return _spec("meanfield", info, blocks, reml)


def meanfield_layout(
    design: Design, info: DesignInfo, reml: bool, small_threshold: int = 50, blocks=None, collective: Local = LOCAL
) -> QSpec:
    return meanfield_spec(info, reml)


def entanglement(design: Design, small: int, large: int, collective: Local = LOCAL) -> float:
    """Share of the rows of term ``small`` explained by the levels of term ``large``.

    For each level of ``large``, count its rows at its most common level of ``small``; divide the sum by
    ``n_obs``. It is 1.0 when ``large`` is nested in ``small`` (every instructor in one department).
    """
    js, jl = design.terms[small].n_levels, design.terms[large].n_levels
    # the key made in NumPy's index type as it is computed (np.bincount would copy narrower keys into it; at
    # 10^7 rows widening both code arrays first cost more than the count)
    key = np.multiply(np.asarray(design.terms[large].index), js, dtype=np.intp)
    key += np.asarray(design.terms[small].index)
    counts = collective.sum(np.bincount(key, minlength=jl * js))  # over every process's rows
    return float(counts.reshape(-1, js).max(axis=1).sum() / counts.sum())


# A factor nests another when at least this share of the other's rows sit in its most common level for each
# of the other's levels (:func:`entanglement`); nesting parents up to NESTED_MAX coefficients join the
# nested factor's block (the dense part of a block costs J_L p_w^2 per sweep).
NEST_SHARE = 0.95
NESTED_MAX = 200


def structured_spec(
    design: Design, info: DesignInfo, reml: bool, small_threshold: int = 50, blocks=None,
    collective: Local = LOCAL
) -> QSpec:
    """Blocks of the structured family, chosen from the data unless ``blocks`` names them.

    Args:
        design: the arrays (for the nesting shares).
        info: labels of the terms.
        reml: whether beta joins q.
        small_threshold: a term with ``J_k p_k <= small_threshold`` is small; so is a term that nests a larger
            one (:data:`NEST_SHARE`) and has at most :data:`NESTED_MAX` coefficients. Each small term joins the
            block of the large term it is most entangled with.
        blocks: optional override, a sequence of tuples of grouping-factor names (as lme4 prints them);
            a tuple may also contain ``"fixed"`` to put beta there when ``reml=True``.
        collective: in a multi-process fit, the processes whose rows together give the nesting shares.

    Returns:
        The :class:`QSpec`.
    """
    size = [t.n_levels * t.n_coefs for t in info.terms]
    if blocks is not None:
        return _spec("structured", info, _user_blocks(info, size, reml, small_threshold, blocks), reml)
    large = [k for k, s in enumerate(size) if s > small_threshold]
    # Nesting is never split: a large factor whose levels (nearly) nest those of another large factor joins
    # that factor's block as its dense part when it has at most NESTED_MAX coefficients. In a block of its
    # own, q would drain its variance into the nested factor's, as mean-field q drains InstEval's departments.
    # Children are tried smallest first: the count behind a share has J_parent x J_child bins, and the first
    # child found nested ends the search (InstEval-shaped 1e7 rows: instructors, not 400,000 students).
    for parent in sorted(large, key=lambda k: size[k]):
        if size[parent] <= NESTED_MAX and any(
            size[child] > size[parent] and entanglement(design, parent, child, collective) >= NEST_SHARE
            for child in sorted(large, key=lambda k: size[k]) if child != parent
        ):
            large.remove(parent)
    small = [k for k in range(len(size)) if k not in large]
    if not large:
        return _spec("structured", info, [Block(large=None, small=tuple(small), fixed=reml)], reml)
    members: dict[int, list[int]] = {k: [] for k in large}
    best_share: dict[int, float] = {k: -1.0 for k in large}
    for s in small:
        # smallest large term first: the first that the small term nests is its host (the cheapest block's
        # dense part, and no count over the larger terms' J_L x J_s bins: at 10^7 InstEval-shaped rows the
        # departments' count against 400,000 students costs 0.2 s); else the most entangled
        shares: dict[int, float] = {}
        for k in sorted(large, key=lambda k: size[k]):
            shares[k] = entanglement(design, s, k, collective)
            if shares[k] >= NEST_SHARE:
                host = k
                break
        else:
            host = max(large, key=lambda k: (shares[k], -size[k]))
        members[host].append(s)
        best_share[host] = max(best_share[host], shares[host])
    fixed_host = None
    if reml:
        with_small = [k for k in large if members[k]]
        pool = with_small or large
        fixed_host = max(pool, key=lambda k: (best_share[k], -size[k]))
    out = [Block(large=k, small=tuple(members[k]), fixed=(k == fixed_host)) for k in large]
    return _spec("structured", info, out, reml)


def _user_blocks(info, size, reml, small_threshold, blocks):
    names = {t.group: k for k, t in enumerate(info.terms)}
    if len(names) != len(info.terms):
        raise ValueError("blocks= needs distinct grouping-factor names; two terms share one here")
    seen: set[int] = set()
    fixed_seen = False
    out = []
    for group in blocks:
        group = (group,) if isinstance(group, str) else tuple(group)
        ks = []
        has_fixed = False
        for name in group:
            if name == "fixed":
                if not reml:
                    raise ValueError("'fixed' can join a block only with reml=True (beta is then in q)")
                has_fixed = True
                continue
            if name not in names:
                raise ValueError(f"blocks= names {name!r}, which is not a grouping factor of the formula")
            k = names[name]
            if k in seen:
                raise ValueError(f"blocks= lists {name!r} twice")
            seen.add(k)
            ks.append(k)
        large = [k for k in ks if size[k] > small_threshold]
        if len(large) > 1:
            raise ValueError(
                f"a block can hold one large factor (more than {small_threshold} coefficients); "
                f"{[info.terms[k].group for k in large]} are all large"
            )
        big = large[0] if large else None
        out.append(Block(large=big, small=tuple(k for k in ks if k != big), fixed=has_fixed))
        fixed_seen |= has_fixed
    out.extend(Block(large=k) for k in range(len(info.terms)) if k not in seen)  # unnamed terms: own block
    if reml and not fixed_seen:
        out.append(Block(large=None, fixed=True))
    return out


def _spec(name, info: DesignInfo, blocks, reml) -> QSpec:
    return QSpec(
        name=name,
        blocks=tuple(blocks),
        n_levels=tuple(t.n_levels for t in info.terms),
        n_coefs=tuple(t.n_coefs for t in info.terms),
        n_fixed=len(info.fixed_names),
        reml=reml,
    )


# ----------------------------------------------------------------------------------------------------
# Design-only arrays


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


# ----------------------------------------------------------------------------------------------------
# Moments of q


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


def expected_log_prior(spec: QSpec, params: VIParams, level_mask=None) -> jax.Array:
    """``sum_k sum_j E_q[log N(b_kj | 0, Sigma_k)]`` (beta's flat prior adds nothing); returns ``()``.

    ``level_mask``: ``None``, or one ``(J_k,)`` 0/1 array per term; padding levels (0) add nothing."""
    total = 0.0
    for k, L in enumerate(params.model.chol):
        p = spec.n_coefs[k]
        mask = None if level_mask is None else level_mask[k]
        J = spec.n_levels[k] if mask is None else jnp.sum(mask)
        M = second_moment_sum(spec, params.blocks, k, mask)
        white = jax.scipy.linalg.solve_triangular(L, M, lower=True)
        trace = jnp.trace(jax.scipy.linalg.solve_triangular(L, white.T, lower=True))
        logdet = jnp.sum(log_abs_diag(L))
        total = total - 0.5 * J * p * LOG_2PI - J * logdet - 0.5 * trace
    return total


def small_coordinate_mask(spec: QSpec, block: Block, level_mask, dtype) -> jax.Array:
    """``(p_w,)`` 0/1: which coordinates of a block's small part belong to levels of the data (beta's do)."""
    parts = [jnp.repeat(level_mask[k].astype(dtype), spec.n_coefs[k]) for k in block.small]
    if block.fixed:
        parts.append(jnp.ones((spec.n_fixed,), dtype))
    return jnp.concatenate(parts)


def entropy(spec: QSpec, blocks, level_mask=None) -> jax.Array:
    """``sum_B H[q_B]``, with ``H[N(m, V)] = 1/2 log|2 pi e V|``; returns ``()``.

    With ``level_mask`` (see :func:`expected_log_prior`), padding levels add nothing. That is exact when they
    are independent of the rest under q, as block updates leave them (their rows of the design are zero):
    then each diagonal entry of a Cholesky factor belongs to one side, and ``log|V|`` splits."""
    total = 0.0
    for block, bp in zip(spec.blocks, blocks):
        dim = 0
        if bp.chol_large is not None:
            logs = log_abs_diag(bp.chol_large)
            if level_mask is None:
                total = total + jnp.sum(logs)
                dim += bp.chol_large.shape[0] * bp.chol_large.shape[1]
            else:
                mask = level_mask[block.large]
                total = total + jnp.sum(logs * mask[:, None])
                dim += jnp.sum(mask) * bp.chol_large.shape[1]
        if bp.chol_small is not None:
            logs = log_abs_diag(bp.chol_small)
            if level_mask is None:
                total = total + jnp.sum(logs)
                dim += bp.chol_small.shape[0]
            else:
                mask = small_coordinate_mask(spec, block, level_mask, logs.dtype)
                total = total + jnp.sum(logs * mask)
                dim += jnp.sum(mask)
        total = total + 0.5 * dim * (1.0 + LOG_2PI)
    return total


def sample(rng_key, spec: QSpec, blocks) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
    """One reparameterised draw from q.

    Returns:
        ``(effects, beta)``: one ``(J_k, p_k)`` array per term, and ``(p,)`` beta when it is in q (else None).
    """
    effects: list = [None] * len(spec.n_levels)
    beta = None
    keys = jax.random.split(rng_key, len(spec.blocks))
    for key, block, bp in zip(keys, spec.blocks, blocks):
        k_small, k_large = jax.random.split(key)
        w = None
        if bp.chol_small is not None:
            eps = jax.random.normal(k_small, bp.loc_small.shape, bp.loc_small.dtype)
            w = bp.loc_small + bp.chol_small @ eps
            offsets, at, _ = spec.small_offsets(block)
            for k in block.small:
                J, p = spec.n_levels[k], spec.n_coefs[k]
                effects[k] = w[offsets[k] : offsets[k] + J * p].reshape(J, p)
            if block.fixed:
                beta = w[at : at + spec.n_fixed]
        if block.large is not None:
            eps = jax.random.normal(k_large, bp.loc_large.shape, bp.loc_large.dtype)
            b = bp.loc_large + jnp.einsum("jpq,jq->jp", bp.chol_large, eps)
            if w is not None:
                b = b + jnp.einsum("jpw,w->jp", bp.coupling, w - bp.loc_small)
            effects[block.large] = b
    return tuple(effects), beta


# ----------------------------------------------------------------------------------------------------
# Initial values and the unconstrained coordinates the optax path moves in


def init_params(
    design: Design, spec: QSpec, likelihood, fixed_sigma, init_scale: float = 0.1, n_obs=None
) -> VIParams:
    """Starting point: beta and the residual SD from the likelihood's starting values (least squares for the
    Gaussian), every SD at half that residual SD, q at its prior mean with scale ``init_scale`` (numpyro's
    ``AutoNormal`` default), no coupling.

    ``fixed_sigma`` ``()`` fixes sigma (the tutorial's 1.0); ``None`` starts it at the likelihood's value.
    ``n_obs`` ``()``: the number of rows of the data when ``design`` carries zero padding rows after them.
    """
    y = design.y
    n = y.shape[0] if n_obs is None else n_obs
    beta, resid_sd = likelihood.start(design.X, y, n)
    chol = []
    for term in design.terms:
        # padding rows are zero: the sums are the data's
        mean = jnp.sum(wide(term.covariates), axis=0).astype(y.dtype) / n
        sd = jnp.sqrt(jnp.maximum(jnp.sum(wide(term.covariates) ** 2, axis=0).astype(y.dtype) / n - mean**2, 0.0))
        spread = jnp.maximum(sd, 1.0)
        chol.append(jnp.diag(0.5 * resid_sd / spread))
    sigma = resid_sd if fixed_sigma is None else jnp.asarray(fixed_sigma, y.dtype)
    model = ModelParams(beta=None if spec.reml else beta, chol=tuple(chol), sigma=sigma)
    blocks = []
    for block in spec.blocks:
        loc_l = chol_l = coup = loc_s = chol_s = None
        pw = spec.small_size(block)
        if block.large is not None:
            J, p = spec.n_levels[block.large], spec.n_coefs[block.large]
            loc_l = jnp.zeros((J, p), y.dtype)
            chol_l = jnp.broadcast_to(init_scale * jnp.eye(p, dtype=y.dtype), (J, p, p))
            if pw:
                coup = jnp.zeros((J, p, pw), y.dtype)
        if pw:
            loc_s = jnp.zeros((pw,), y.dtype)
            if block.fixed:
                _, at, _ = spec.small_offsets(block)
                loc_s = loc_s.at[at : at + spec.n_fixed].set(beta)
            chol_s = init_scale * jnp.eye(pw, dtype=y.dtype)
        blocks.append(BlockParams(loc_l, chol_l, coup, loc_s, chol_s))
    return VIParams(model=model, blocks=tuple(blocks))


def _softplus_inv(x):
    return x + jnp.log(-jnp.expm1(-x))


def _tril_map(a, diag_fn):
    """Lower triangle of ``a`` (batched over leading axes) with ``diag_fn`` applied to the diagonal."""
    p = a.shape[-1]
    eye = jnp.eye(p, dtype=bool)
    low = jnp.tril(a, -1)
    d = diag_fn(jnp.diagonal(a, axis1=-2, axis2=-1))
    return low + jnp.where(eye, d[..., None, :] * jnp.ones_like(a), 0.0)


def to_unconstrained(params: VIParams) -> VIParams:
    """Map to the coordinates the optax path moves in: log of the model's SDs and of the Cholesky
    diagonals of Sigma_k, inverse softplus of q's Cholesky diagonals (the tutorial's ``softplus`` scales).
    """
    m = params.model
    model = ModelParams(
        beta=m.beta,
        chol=tuple(_tril_map(L, jnp.log) for L in m.chol),
        sigma=jnp.log(m.sigma),
    )
    blocks = tuple(
        bp._replace(
            chol_large=None if bp.chol_large is None else _tril_map(bp.chol_large, _softplus_inv),
            chol_small=None if bp.chol_small is None else _tril_map(bp.chol_small, _softplus_inv),
        )
        for bp in params.blocks
    )
    return VIParams(model=model, blocks=blocks)


def to_constrained(raw: VIParams, fixed_sigma) -> VIParams:
    """Inverse of :func:`to_unconstrained`; a fixed sigma ``fixed_sigma`` ``()`` (``None``: estimated)
    overrides sigma."""
    m = raw.model
    sigma = jnp.exp(m.sigma) if fixed_sigma is None else jnp.asarray(fixed_sigma, m.sigma.dtype)
    model = ModelParams(beta=m.beta, chol=tuple(_tril_map(L, jnp.exp) for L in m.chol), sigma=sigma)
    blocks = tuple(
        bp._replace(
            chol_large=None if bp.chol_large is None else _tril_map(bp.chol_large, jax.nn.softplus),
            chol_small=None if bp.chol_small is None else _tril_map(bp.chol_small, jax.nn.softplus),
        )
        for bp in raw.blocks
    )
    return VIParams(model=model, blocks=blocks)


# ----------------------------------------------------------------------------------------------------
# Padding levels (shape buckets, :mod:`lmevi.fitting.build`): masks and the map back to the data's levels


def coordinate_mask(spec: QSpec, params: VIParams, level_mask) -> VIParams:
    """0/1 arrays shaped as ``params``: 1 where a parameter belongs to the data, 0 where it belongs to a
    padding level (the model's point estimates are all 1)."""
    blocks = []
    for block, bp in zip(spec.blocks, params.blocks):
        ml = None if block.large is None else level_mask[block.large]
        mw = None if bp.loc_small is None else small_coordinate_mask(spec, block, level_mask, bp.loc_small.dtype)
        new = {}
        if ml is not None:
            new["loc_large"] = jnp.broadcast_to(ml[:, None], bp.loc_large.shape).astype(bp.loc_large.dtype)
            new["chol_large"] = jnp.broadcast_to(ml[:, None, None], bp.chol_large.shape).astype(bp.loc_large.dtype)
        if mw is not None:
            new["loc_small"] = mw
            new["chol_small"] = mw[:, None] * mw[None, :]
            if bp.coupling is not None:
                new["coupling"] = ml[:, None, None] * mw[None, None, :] * jnp.ones_like(bp.coupling)
        blocks.append(BlockParams(**{f: new.get(f) for f in BlockParams._fields}))
    model = jax.tree_util.tree_map(jnp.ones_like, params.model)
    return VIParams(model=model, blocks=tuple(blocks))


def unpad(params: VIParams, padded: QSpec, spec: QSpec) -> VIParams:
    """``params`` of the padded layout restricted to the data's levels (``spec``'s counts). Exact: padding
    levels are independent of the rest under q, so the Cholesky factors' rows and columns of the data's
    coordinates are those of the restricted covariance."""
    blocks = []
    for block, bp in zip(padded.blocks, params.blocks):
        keep = None
        if bp.loc_small is not None:
            offsets, at, _ = padded.small_offsets(block)
            parts = [np.arange(offsets[k], offsets[k] + spec.n_levels[k] * spec.n_coefs[k]) for k in block.small]
            if block.fixed:
                parts.append(np.arange(at, at + padded.n_fixed))
            keep = np.concatenate(parts)
        J = None if block.large is None else spec.n_levels[block.large]
        blocks.append(
            BlockParams(
                loc_large=None if J is None else bp.loc_large[:J],
                chol_large=None if J is None else bp.chol_large[:J],
                coupling=None if bp.coupling is None else bp.coupling[:J][:, :, keep],
                loc_small=None if keep is None else bp.loc_small[keep],
                chol_small=None if keep is None else bp.chol_small[np.ix_(keep, keep)],
            )
        )
    return VIParams(model=params.model, blocks=tuple(blocks))


# ----------------------------------------------------------------------------------------------------
# Units and given moments: what the stages outside q ask of it through the protocol


def blocks_to_data_units(spec: QSpec, blocks, term_scales, fixed_scale, fixed_shift) -> tuple:
    """q's blocks from standardised units to the data's (NumPy in, NumPy out). Block by block, with
    ``b_L = s_L b'_L`` and ``w = s_w w' + shift``: ``m_L = s_L m'_L``, ``T = diag(s_L) T'``,
    ``K = diag(s_L) K' diag(1 / s_w)``, ``m_w = s_w m'_w + shift``, ``U = diag(s_w) U'``.

    Args:
        spec: the layout.
        blocks: one :class:`BlockParams` per block (host arrays).
        term_scales: per term ``(p_k,)`` data units per standardised unit.
        fixed_scale, fixed_shift: ``(p,)`` each, beta's.
    """
    out = []
    for block, bp in zip(spec.blocks, blocks):
        dtype = next(a.dtype for a in bp if a is not None)
        s_large = None if block.large is None else np.asarray(term_scales[block.large], dtype)
        parts = [np.tile(term_scales[k], spec.n_levels[k]) for k in block.small]
        shift = [np.zeros(spec.n_levels[k] * spec.n_coefs[k]) for k in block.small]
        if block.fixed:
            parts.append(fixed_scale)
            shift.append(fixed_shift)
        new = bp
        if s_large is not None:
            new = new._replace(loc_large=bp.loc_large * s_large, chol_large=bp.chol_large * s_large[:, None])
        if parts:
            fw = np.asarray(np.concatenate(parts), dtype)
            new = new._replace(loc_small=bp.loc_small * fw + np.asarray(np.concatenate(shift), dtype),
                               chol_small=bp.chol_small * fw[:, None])
            if bp.coupling is not None:
                new = new._replace(coupling=bp.coupling * s_large[:, None] / fw)
        out.append(new)
    return tuple(out)


def psd_factor(cov) -> np.ndarray:
    """A lower-triangular ``L`` with ``L L^T = cov`` for (batched) positive semi-definite ``cov`` ``(..., p, p)``,
    also where Cholesky fails (a variance at zero makes ``condVar`` singular): ``L = R^T`` from the QR
    factorisation of ``(V sqrt(Lambda))^T``, ``cov = V Lambda V^T``."""
    cov = np.asarray(cov, np.float64)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        lam, V = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        B = V * np.sqrt(np.maximum(lam, 0.0))[..., None, :]
        return np.swapaxes(np.linalg.qr(np.swapaxes(B, -1, -2), mode="r"), -1, -2)


def from_moments(spec: QSpec, model: ModelParams, effects, effects_cov, beta, beta_cov) -> VIParams:
    """q holding given Gaussian moments, in a layout of one block per term (and beta's block under REML):
    per term ``(J_k, p_k)`` means and ``(J_k, p_k, p_k)`` covariances, beta's ``(p,)`` and ``(p, p)``."""
    blocks = []
    for block in spec.blocks:
        if block.small:
            raise ValueError("from_moments needs a layout of one block per term (meanfield_spec)")
        if block.large is not None:
            k = block.large
            blocks.append(BlockParams(effects[k], psd_factor(effects_cov[k]), None, None, None))
        else:  # beta's block (REML)
            blocks.append(BlockParams(None, None, None, beta, psd_factor(beta_cov)))
    return VIParams(model, tuple(blocks))
