"""The block-Gaussian family's layout: which coefficients share a block of q, chosen on the host with NumPy
(see :mod:`lmevi.q.variational` for the family itself).

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
import numpy as np

from lmevi.runtime.collective import LOCAL, Local
from lmevi.frame.design import Design, DesignInfo


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
