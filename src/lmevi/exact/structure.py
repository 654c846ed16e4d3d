"""The structure of a design for blocked elimination: every cross-product that does not depend on theta,
computed once on the host (see :mod:`lmevi.exact.criterion` for the algebra).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import numpy as np

from lmevi.frame.design import Design


@partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "zz1", "zy1", "cross_level", "cross_coef", "cross_rest", "cross_value", "rr", "ry", "yy",
        "pair_block", "pair_value", "pair_target",
    ],
    meta_fields=["order", "n_levels", "n_coefs", "rest_offsets", "n_rest_random", "n_fixed", "n_obs", "reml"],
)
@dataclass(frozen=True)
class Structure:
    """Cross-products of a design, arranged for blocked elimination (host-side NumPy arrays).

    Term 1 is ``order[0]``, the term with the most coefficients ``J_1 p_1``. The rest coordinates
    ``r = 0..P-1`` are the coefficients of the terms ``order[1:]`` (each level-major, starting at
    ``rest_offsets``), then the ``p`` columns of X starting at ``Q = n_rest_random``.

    Attributes:
        zz1: ``(J_1, p_1, p_1)`` per-level ``Z_1j' Z_1j``.
        zy1: ``(J_1, p_1)`` per-level ``Z_1j' y``.
        cross_level, cross_coef, cross_rest, cross_value: ``(n_cross,)`` the non-zeros of ``Z_1' R``: entry
            (level ``j``, coefficient ``a`` of term 1, rest coordinate ``r``) has the given value.
        rr: ``(P, P)`` ``R'R`` with ``R = [Z_rest, X]``.
        ry: ``(P,)`` ``R'y``.
        yy: ``()`` ``y'y``.
        pair_block: ``(n_pairs,)`` flat index ``j p_1^2 + a p_1 + a'`` into ``(J_1, p_1, p_1)``.
        pair_value: ``(n_pairs,)`` ``w v v'`` for two entries ``(j, a, r, v)`` and ``(j, a', r', v')`` of the
            same level with ``r >= r'``; ``w = 1/2`` when ``r = r'`` so that a matrix ``K`` accumulated over
            the pairs gives the symmetric sum as ``K + K'``.
        pair_target: ``(n_pairs,)`` flat index ``r P + r'`` into ``(P, P)``, sorted.
        order: design term indices, term 1 first, then the rest by decreasing size.
        n_levels, n_coefs: ``J_k`` and ``p_k`` of every term, in design order.
        rest_offsets: first rest coordinate of each term of ``order[1:]``.
        n_rest_random: ``Q``, the number of rest random-effect coordinates.
        n_fixed: ``p``.
        n_obs: ``n``.
        reml: the criterion the structure was built for (the default of :func:`profiled_deviance`).
    """

    zz1: np.ndarray
    zy1: np.ndarray
    cross_level: np.ndarray
    cross_coef: np.ndarray
    cross_rest: np.ndarray
    cross_value: np.ndarray
    rr: np.ndarray
    ry: np.ndarray
    yy: np.ndarray
    pair_block: np.ndarray
    pair_value: np.ndarray
    pair_target: np.ndarray
    order: tuple[int, ...]
    n_levels: tuple[int, ...]
    n_coefs: tuple[int, ...]
    rest_offsets: tuple[int, ...]
    n_rest_random: int
    n_fixed: int
    n_obs: int
    reml: bool

    @property
    def size(self) -> int:
        """``P``, the size of the dense rest block."""
        return self.n_rest_random + self.n_fixed


def _term_order(design: Design) -> tuple[int, ...]:
    sizes = [t.n_levels * t.covariates.shape[1] for t in design.terms]
    # Stable sort: among terms of equal size the formula's order decides, so the choice is reproducible.
    return tuple(sorted(range(len(sizes)), key=lambda k: -sizes[k]))


def dense_block_size(design: Design) -> int:
    """``P = sum_{k != 1} J_k p_k + p``: the size of the dense block left after eliminating the largest
    term level by level. One deviance evaluation costs ``O(P^3)`` time and ``O(P^2)`` memory."""
    order = _term_order(design)
    rest = sum(design.terms[k].n_levels * design.terms[k].covariates.shape[1] for k in order[1:])
    return int(rest + design.X.shape[1])


def _index_dtype(bound: int):
    return np.int32 if bound < np.iinfo(np.int32).max else np.int64


def build_structure(design: Design, reml: bool = True) -> Structure:
    """Precompute the theta-free cross-products of ``design`` for :func:`profiled_deviance`.

    Never forms Z, a dense ``(n_obs, P)`` matrix or a dense ``(J_1, P)`` matrix: every product is a
    ``np.bincount`` over level codes. The pair list has ``sum_j n_j (n_j + 1) / 2``-ish entries where ``n_j``
    is the number of non-zeros of ``Z_1j' R`` (InstEval: about 1.4 million).

    Args:
        design: the model's arrays (:func:`lmevi.frame.design.build_design`); must have at least one random term.
        reml: the criterion :func:`profiled_deviance` computes by default.

    Returns:
        A :class:`Structure` of NumPy arrays.
    """
    # Long: one pass over the terms building cross-products that share the same sorted level codes and row
    # buffers; the pieces are commented in order, and split apart they would pass most of these locals around.
    if not design.terms:
        raise ValueError("the exact fit needs at least one random-effect term")
    y = np.asarray(design.y, np.float64)
    X = np.asarray(design.X, np.float64)
    n, p = X.shape
    index = [np.asarray(t.index, np.int64) for t in design.terms]
    cov = [np.asarray(t.covariates, np.float64) for t in design.terms]
    n_levels = tuple(int(t.n_levels) for t in design.terms)
    n_coefs = tuple(c.shape[1] for c in cov)
    order = _term_order(design)
    first, rest = order[0], order[1:]

    offsets, pos = [], 0
    for k in rest:
        offsets.append(pos)
        pos += n_levels[k] * n_coefs[k]
    Q, P = pos, pos + p

    # Each row of R = [Z_rest, X] has sum_{k != 1} p_k + p non-zeros: their coordinates and values.
    cols = [off + index[k][:, None] * n_coefs[k] + np.arange(n_coefs[k]) for k, off in zip(rest, offsets)]
    cols.append(np.broadcast_to(Q + np.arange(p), (n, p)))
    rcols = np.concatenate(cols, axis=1)
    rvals = np.concatenate([cov[k] for k in rest] + [X], axis=1)

    groups = [(off, index[k], n_levels[k], cov[k]) for k, off in zip(rest, offsets)] + [(Q, None, 1, X)]
    rr = _cross_products(groups, P)
    ry = np.bincount(rcols.ravel(), (rvals * y[:, None]).ravel(), minlength=P)

    g1, z1 = index[first], cov[first]
    J1, p1 = n_levels[first], n_coefs[first]
    a = np.arange(p1)
    zz1 = _level_blocks(g1, z1, J1)
    zy1 = np.bincount((g1[:, None] * p1 + a).ravel(), (z1 * y[:, None]).ravel(), minlength=J1 * p1).reshape(J1, p1)

    # Non-zeros of Z_1' R, keyed (level, coef, rest coordinate); np.unique sorts them by level first.
    keys = ((g1[:, None, None] * p1 + a[None, :, None]) * P + rcols[:, None, :]).ravel()
    # (a count over all J_1 p_1 P possible keys instead of the sort was slower on InstEval: fresh memory)
    keys, inverse = np.unique(keys, return_inverse=True)
    values = np.bincount(inverse, (z1[:, :, None] * rvals[:, None, :]).ravel(), minlength=len(keys))
    keep = values != 0.0
    keys, values = keys[keep], values[keep]
    level, coef, rest_coord = keys // (p1 * P), (keys // P) % p1, keys % P

    # Each unordered pair of entries within a level once (an entry with itself included), its target (r, r')
    # oriented so that r >= r'; W_j is symmetric, so either entry's coefficient may come first in the block.
    ientry = _index_dtype(len(keys))
    level = level.astype(ientry)
    count = np.bincount(level, minlength=J1)
    start = (np.cumsum(count) - count).astype(ientry)
    position = np.arange(len(keys), dtype=ientry)
    reps = position - start[level] + 1  # entry i pairs with the entries of its level up to itself
    ends = np.cumsum(reps)  # entry i's pairs end at ends[i]; the last is the entry with itself
    # right runs over start[level_i] .. i for each left entry i; per-left values are repeated, not gathered.
    # In place where possible: each pair array is n_pairs long (InstEval: 2 million), and fresh memory costs
    # a new process more than the arithmetic.
    right = np.arange(ends[-1] if len(ends) else 0, dtype=ientry)
    right -= np.repeat(ends - reps - start[level], reps)
    pair_value = np.repeat(values, reps)
    pair_value *= values[right]
    pair_value[ends - 1] *= 0.5
    itarget = _index_dtype(P * P)
    rest_t = rest_coord.astype(itarget)
    target = np.repeat(rest_t, reps)
    if p1 == 1:
        # One coefficient: a level's entries are sorted by rest coordinate, so right's is never the larger.
        target *= P
        target += rest_t[right]
    else:
        r_right = rest_t[right]
        target, low = np.maximum(target, r_right), np.minimum(target, r_right)
        target *= P
        target += low
    # Left in the order made (by level): sorting by target made the segment sum no faster (measured on
    # InstEval's 2 million pairs) and cost 0.25 s on the host.
    iblock = _index_dtype(J1 * p1 * p1)
    if p1 == 1:
        pair_block = np.repeat(level.astype(iblock), reps)
    else:
        pair_block = np.repeat(level.astype(iblock) * (p1 * p1) + coef * p1, reps) + coef[right]
    return Structure(
        zz1=zz1,
        zy1=zy1,
        cross_level=level.astype(_index_dtype(J1)),
        cross_coef=coef.astype(np.int32),
        cross_rest=rest_coord.astype(_index_dtype(P)),
        cross_value=values,
        rr=rr,
        ry=ry,
        yy=np.asarray(y @ y),
        pair_block=pair_block.astype(iblock, copy=False),
        pair_value=pair_value,
        pair_target=target,
        order=order,
        n_levels=n_levels,
        n_coefs=n_coefs,
        rest_offsets=tuple(offsets),
        n_rest_random=Q,
        n_fixed=p,
        n_obs=n,
        reml=bool(reml),
    )


def _level_blocks(codes: np.ndarray, values: np.ndarray, J: int) -> np.ndarray:
    """``(J, q, q)`` ``sum_{i at level j} v_i v_i'`` for row values ``values`` ``(n, q)`` at levels ``codes``
    ``(n,)``: one term's diagonal block of the cross-products, one ``np.bincount``."""
    q = values.shape[1]
    a = np.arange(q)
    return np.bincount((codes[:, None, None] * (q * q) + a[:, None] * q + a).ravel(),
                       (values[:, :, None] * values[:, None, :]).ravel(), minlength=J * q * q).reshape(J, q, q)


def _cross_products(groups, P: int) -> np.ndarray:
    """``(P, P)`` ``R'R`` for ``R = [Z_rest, X]`` given as column groups ``(offset, codes (n,) or None, J,
    values (n, q))``: a term's ``J q`` columns, level ``codes[i]`` holding row i's ``q`` values (``None``: one
    level, X). Block by block: a term's block with itself is block diagonal (one level per row), the others
    are ``np.bincount``s into ``J_g q_g x J_h q_h`` bins. One count over all ``(sum q)^2`` entries of every
    row into ``P^2`` bins cost InstEval three times as much (1.2 million entries scattered over 1.3 million
    bins, against 0.4 million over 16,000)."""
    rr = np.zeros((P, P))
    for g, (og, cg, Jg, vg) in enumerate(groups):
        qg = vg.shape[1]
        a = np.arange(qg)
        for oh, ch, Jh, vh in groups[g:]:
            qh = vh.shape[1]
            if ch is cg and cg is not None:  # a term with itself: (J, q, q) blocks on the diagonal
                coord = og + np.arange(Jg)[:, None] * qg + a  # (J, q)
                rr[coord[:, :, None], coord[:, None, :]] = _level_blocks(cg, vg, Jg)
                continue
            if cg is None and ch is None:  # X with itself
                block = vg.T @ vh
            else:
                rows = cg[:, None] * qg + a  # (n, q_g): g is a term (X, the last group, meets only itself)
                cols = np.arange(qh) if ch is None else ch[:, None] * qh + np.arange(qh)  # (n or 1, q_h)
                block = np.bincount((rows[:, :, None] * (Jh * qh) + cols[..., None, :]).ravel(),
                                    (vg[:, :, None] * vh[:, None, :]).ravel(),
                                    minlength=Jg * qg * Jh * qh).reshape(Jg * qg, Jh * qh)
            rr[og : og + Jg * qg, oh : oh + Jh * qh] = block
            rr[oh : oh + Jh * qh, og : og + Jg * qg] = block.T
    return rr
