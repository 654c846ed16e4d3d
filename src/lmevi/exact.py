"""Exact ML/REML estimates by lme4's profiled deviance, with blocked elimination (as MixedModels.jl).

lme4 (Bates et al. 2015, J. Stat. Softw. 67(1), sec. 3) writes the random effects as ``b = Lambda_theta u``
with ``u ~ N(0, sigma^2 I)`` and profiles beta and sigma out of the likelihood. What is left is a function
of the relative covariance parameters ``theta`` alone, computed from the Cholesky factor of

    [[Lambda' Z'Z Lambda + I,  Lambda' Z'X],          [[L_Z,  0  ],  [[L_Z', R_ZX'],
     [X'Z Lambda,              X'X        ]]    =      [R_ZX, R_X]]    [0,    R_X' ]]         (eqs. 34-36)

and of the penalised residual sum of squares ``r^2 = y'y - c'c`` where ``c`` solves
``L [c_u; c_beta] = [Lambda'Z'y; X'y]`` (eqs. 37-40):

    ML:    -2 log L      = log|L_Z|^2 + n (1 + log(2 pi r^2 / n))                                   (eq. 41)
    REML:  -2 log L_R    = log|L_Z|^2 + log|R_X|^2 + (n - p)(1 + log(2 pi r^2 / (n - p)))          (eq. 42)

Blocked elimination. As MixedModels.jl does, the factor is built blockwise. The random term with the most
coefficients ``J_1 p_1`` ("term 1") is block diagonal in ``Lambda'Z'Z Lambda + I``: one ``(p_1, p_1)``
block ``D_j`` per level, eliminated level by level. Everything else -- the other terms' coefficients
(term by term, each level-major) followed by X's columns -- forms the dense "rest" block of size
``P = sum_{k != 1} J_k p_k + p``. With ``R = [Z_rest, X]``, ``Lambda_e = blockdiag(Lambda_rest, I_p)`` and
``G_j = Z_1j' R`` (``(p_1, P)``, sparse), the rest block's Schur complement is

    S = Lambda_e' (R'R - sum_j G_j' W_j G_j) Lambda_e + diag(1_Q, 0_p),   W_j = Lambda_1 D_j^{-1} Lambda_1',

whose dense Cholesky factor holds the remaining rows of ``L_Z`` (its first ``Q`` rows) and ``R_X`` (its last
``p``). ``sum_j G_j' W_j G_j`` is a sum over pairs of non-zeros of ``G`` that share a level ``j``; the pairs
are listed once on the host (:func:`build_structure`) so that evaluating it is a gather, a multiply and one
``segment_sum``.

Parameters. ``theta`` concatenates, over the random terms in the order of ``design.terms`` (the formula's
order), the lower triangle of each ``Lambda_k`` read column by column, as lme4's ``getME(m, "theta")`` lays
out one term. lme4 itself orders its terms by decreasing number of levels, so for formulas not already in
that order the terms' blocks of lme4's theta come in a different order; within a block the order is the same.

Unlike the rest of lmevi this is not variational: it is lme4's own criterion. One implementation runs on two
array backends (:class:`_Ops`): JAX, jitted with exact, partly hand-written gradients, for larger dense blocks
(Newton's method or scipy's L-BFGS-B); NumPy, optimised by the derivative-free BOBYQA of NLopt (the optimiser
of lme4's default ``nloptwrap``, with tighter tolerances), for small ones (:data:`NUMPY_MAX`), where compiling
would cost far more than evaluating. The NumPy path compiles nothing and does not import scipy (0.4 s to
import scipy.optimize), so a small model's fit costs milliseconds in a fresh process. Where JAX runs on the
CPU, larger blocks take the hybrid path (:func:`_hybrid_evaluator`): JAX for the sums over level pairs and
the chain rule back to theta, the host's LAPACK for the dense block's factorisation and inverse. It is meant
for designs whose dense rest block is small enough (:func:`dense_block_size`; ``q="auto"`` uses it up to
``lmevi.build.AUTO_EXACT_MAX``): the cost of one evaluation is ``O(P^3)``.

Precision: float64 throughout (JAX's 64-bit types are switched on for lmevi's own calls only, as
``jax.enable_x64`` contexts; the host's LAPACK is double precision).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.design import Design
from lmevi.likelihood import LOG_2PI
from lmevi.runtime import sized_jit



# ----------------------------------------------------------------------------------------------------
# Structure: everything about the design that does not depend on theta, computed once on the host


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
        design: the model's arrays (:func:`lmevi.design.build_design`); must have at least one random term.
        reml: the criterion :func:`profiled_deviance` computes by default.

    Returns:
        A :class:`Structure` of NumPy arrays.
    """
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


# ----------------------------------------------------------------------------------------------------
# theta <-> Lambda


def _tril_columnwise(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a ``(p, p)`` lower triangle read column by column (lme4's theta order)."""
    rows = np.concatenate([np.arange(c, p) for c in range(p)])
    cols = np.concatenate([np.full(p - c, c) for c in range(p)])
    return rows, cols


def theta_size(n_coefs: tuple[int, ...]) -> int:
    """Length of theta: ``sum_k p_k (p_k + 1) / 2``."""
    return int(sum(q * (q + 1) // 2 for q in n_coefs))


def theta_lower_bounds(n_coefs: tuple[int, ...]) -> np.ndarray:
    """lme4's lower bounds: 0 for the diagonal of each ``Lambda_k``, ``-inf`` below it."""
    out = []
    for q in n_coefs:
        rows, cols = _tril_columnwise(q)
        out.append(np.where(rows == cols, 0.0, -np.inf))
    return np.concatenate(out)


def theta_default(n_coefs: tuple[int, ...]) -> np.ndarray:
    """lme4's starting value: every ``Lambda_k`` the identity."""
    return np.where(theta_lower_bounds(n_coefs) == 0.0, 1.0, 0.0)


def theta_from_chol(chol, sigma: float) -> np.ndarray:
    """``theta`` of per-term lower Cholesky factors ``L_k`` of ``Sigma_k`` (design order) and the residual SD:
    ``Lambda_k = L_k / sigma`` with each column's sign flipped so that its diagonal is non-negative (``L_k``'s
    columns may carry either sign; ``L_k L_k'`` does not change)."""
    out = []
    for L in chol:
        L = np.asarray(L, np.float64)
        L = L * np.where(np.diag(L) < 0, -1.0, 1.0)[None, :]
        rows, cols = _tril_columnwise(L.shape[0])
        out.append(L[rows, cols] / float(sigma))
    return np.concatenate(out) if out else np.zeros(0)


def lambdas(theta, n_coefs: tuple[int, ...], xp=jnp) -> tuple:
    """Per term ``(p_k, p_k)`` lower-triangular ``Lambda_k`` from ``theta`` (a gather, so that it runs on JAX
    and NumPy arrays alike: ``xp`` is ``jax.numpy`` or ``numpy``)."""
    flat = xp.concatenate([theta, xp.zeros(1, theta.dtype)])
    out, pos = [], 0
    for q in n_coefs:
        rows, cols = _tril_columnwise(q)
        index = np.full((q, q), theta.shape[0])
        index[rows, cols] = pos + np.arange(len(rows))
        out.append(flat[index])
        pos += len(rows)
    return tuple(out)


def _rest_weights(mats, s: Structure, xp=jnp) -> list[tuple[int, jax.Array]]:
    """``B = blockdiag(I_{J_k} kron B_k, I_p)`` over the rest terms as diagonals: ``(d, w_d)`` pairs with
    ``(M B)[:, i] = sum_d M[:, i + d] w_d[i]``, ``w_d[i] = B_k[r + d, r]`` for coordinate ``i`` = (level j,
    coefficient r) of term k (zero where ``r + d`` leaves the block)."""
    q_max = max([s.n_coefs[k] for k in s.order[1:]], default=1)
    flat = xp.concatenate([m.reshape(-1) for m in mats] + [xp.ones(1), xp.zeros(1)])
    one, zero = flat.shape[0] - 2, flat.shape[0] - 1
    out, base = [], 0
    index = {d: [] for d in range(-(q_max - 1), q_max)}
    for k in s.order[1:]:
        J, q = s.n_levels[k], s.n_coefs[k]
        r = np.tile(np.arange(q), J)
        for d in index:
            c = r + d
            index[d].append(np.where((c >= 0) & (c < q), base + np.clip(c, 0, q - 1) * q + r, zero))
        base += q * q
    for d in index:
        index[d].append(np.full(s.n_fixed, one if d == 0 else zero))
        out.append((d, flat[np.concatenate(index[d])]))
    return out


def _rest_times(M, weights, xp=jnp, axis: int = -1, transpose: bool = False):
    """``M B`` (``axis=-1``, ``M`` of shape ``(..., P)``) or ``B' M`` (``axis=0``, ``M`` of shape ``(P, ...)``)
    for ``B`` given by :func:`_rest_weights`; with ``transpose``, ``M B'`` or ``B M``. As ``B[i + d, i] = w_d[i]``,
    ``(M B)[:, i] = sum_d M[:, i + d] w_d[i]`` and ``(M B')[:, r] = sum_d M[:, r - d] w_d[r - d]`` (entries that
    wrap around have ``w_d = 0``).

    Elementwise products with shifted copies: slicing the term blocks out of ``M`` and concatenating them
    back made the gradient of an InstEval evaluation ten times slower."""
    out = 0.0
    for d, w in weights:
        w = w if axis == -1 else w[:, None]
        if transpose:
            out = out + (M * w if d == 0 else xp.roll(M * w, d, axis=axis))
        else:
            out = out + (M if d == 0 else xp.roll(M, -d, axis=axis)) * w
    return out


def _congruence_parts(M, weights, xp=jnp):
    """``(B' M B, M B)`` for a ``(P, P)`` ``M``: rows and columns combined in place, with no transpose (a
    transposed copy of a ``(P, P)`` matrix, and its gradient, cost XLA's CPU backend more than the products);
    ``M B`` is what the gradient of the Schur complement keeps (:func:`_schur_bwd`)."""
    N = _rest_times(M, weights, xp)
    return _rest_times(N, weights, xp, axis=0), N


def _congruence(M, weights, xp=jnp):
    """``B' M B`` (:func:`_congruence_parts`)."""
    return _congruence_parts(M, weights, xp)[0]


# ----------------------------------------------------------------------------------------------------
# The profiled deviance


class _Factor(NamedTuple):
    """Pieces of the blocked factorisation at one theta (internal)."""

    lams: tuple
    D: jax.Array  # (J_1, p_1, p_1) Lambda_1' Z_1j'Z_1j Lambda_1 + I
    W: jax.Array  # (J_1, p_1, p_1) Lambda_1 D_j^{-1} Lambda_1'
    logdet_D: jax.Array  # sum_j log|D_j|
    S: jax.Array  # (P, P) Schur complement of the rest block
    rhs: jax.Array  # (P,) rest right-hand side after eliminating term 1
    quad1: jax.Array  # sum_j |c_1j|^2


def _term1(theta, s: Structure, ops: "_Ops"):
    """``(lams, D, W, sum_j log|D_j|, sum_j |c_1j|^2, v)``: term 1's elimination, and the rest right-hand side
    before ``Lambda_e`` scales it, ``v = R'y - sum_j G_j' W_j Z_1j'y`` ``(P,)``. Of ``theta`` only term 1's
    entries enter, besides ``lams``."""
    xp = ops.xp
    lams = lambdas(theta, s.n_coefs, xp)
    lam1 = lams[s.order[0]]
    p1 = s.zy1.shape[1]
    D = xp.einsum("ba,jbc,cd->jad", lam1, s.zz1, lam1) + xp.eye(p1)
    logdet_D, Dinv = _small_spd_inverse(D, xp)
    W = lam1 @ Dinv @ lam1.T
    # c_1j = L_Dj^{-1} Lambda_1' Z_1j'y, so sum_j |c_1j|^2 = sum_j y'Z_1j W_j Z_1j'y
    Wzy = xp.einsum("jab,jb->ja", W, s.zy1)
    Gt = ops.segment_sum(s.cross_value * Wzy[s.cross_level, s.cross_coef], s.cross_rest, s.rr.shape[0])
    return lams, D, W, logdet_D, xp.sum(Wzy * s.zy1), s.ry - Gt


def _factor(theta, s: Structure, ops: "_Ops") -> _Factor:
    xp = ops.xp
    lams, D, W, logdet_D, quad1, v = _term1(theta, s, ops)
    P, Q = s.rr.shape[0], s.n_rest_random
    weights = _rest_weights([lams[k] for k in s.order[1:]], s, xp)
    S = ops.schur(W.reshape(-1), weights, s) + xp.diag(xp.concatenate([xp.ones(Q), xp.zeros(P - Q)]))
    return _Factor(lams, D, W, logdet_D, S, _rest_times(v, weights, xp), quad1)


def _small_spd_inverse(D, xp=jnp):
    """``(sum_j log|D_j|, D^{-1})`` of a batch ``(J, q, q)`` of small SPD matrices.

    The Cholesky factor is unrolled over the ``q^2`` entries, each step an elementwise operation over the
    ``J`` levels: LAPACK's batched Cholesky loops over the levels one call at a time, and its gradient
    rule was most of an InstEval evaluation's time.
    """
    q = D.shape[-1]
    L = [[None] * q for _ in range(q)]
    for c in range(q):
        L[c][c] = xp.sqrt(D[:, c, c] - sum(L[c][k] ** 2 for k in range(c)))
        for r in range(c + 1, q):
            L[r][c] = (D[:, r, c] - sum(L[r][k] * L[c][k] for k in range(c))) / L[c][c]
    logdet = 2.0 * sum(xp.sum(xp.log(L[c][c])) for c in range(q))
    # Forward substitution for L^{-1}, then D^{-1} = L^{-T} L^{-1}.
    Li = [[None] * q for _ in range(q)]
    for c in range(q):
        Li[c][c] = 1.0 / L[c][c]
        for r in range(c + 1, q):
            Li[r][c] = -sum(L[r][k] * Li[k][c] for k in range(c, r)) / L[r][r]
    zero = xp.zeros_like(L[0][0])
    Linv = xp.stack([xp.stack([Li[r][c] if r >= c else zero for c in range(q)], -1) for r in range(q)], -2)
    return logdet, xp.swapaxes(Linv, -1, -2) @ Linv


def _unscaled_rest(w, rr, block, value, target, ops: "_Ops"):
    """``(P, P)`` ``M = R'R - K - K'``, the rest block's Schur complement before ``Lambda_e`` scales it, with
    ``K[t] = sum_{pairs with target t} w[block] value`` (the lower triangle of ``sum_j G_j' W_j G_j``, half
    diagonals): it depends on term 1's ``theta`` alone."""
    P = rr.shape[0]
    K = ops.segment_sum(w[block] * value, target, P * P).reshape(P, P)
    return rr - K - K.T


def _schur_value(w, wvals, shifts, rr, block, value, target, ops: "_Ops | None" = None):
    """``(B'MB, (M, MB))`` with ``M = R'R - K - K'`` and ``K[t] = sum_{pairs with target t} w[block] value`` (the
    lower triangle of ``sum_j G_j' W_j G_j``, half diagonals), ``B`` given by ``zip(shifts, wvals)`` as in
    :func:`_rest_weights`; on the backend ``ops`` (:data:`JAX_OPS` when ``None``)."""
    ops = JAX_OPS if ops is None else ops
    M = _unscaled_rest(w, rr, block, value, target, ops)
    S, N = _congruence_parts(M, list(zip(shifts, wvals)), ops.xp)
    return S, (M, N)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _schur(w, wvals, shifts, rr, block, value, target):
    """``(P, P)`` ``B'(R'R - sum_j G_j' W_j G_j)B``, the rest block's Schur complement before its identity
    (:func:`_factor`), from ``w = W.reshape(-1)`` and the rest weights ``wvals`` (shifts ``shifts``).

    Written with its own gradient for symmetric cotangents (the criterion's, from :func:`_logdet_quad` or the
    host's inverse): every reduction runs along rows, the pair sum's transpose is a gather at the targets, and
    no transposed copy is made. The gradient JAX derives reduces along columns and transposes, and cost XLA's
    CPU backend three times the forward pass on InstEval.
    """
    return _schur_value(w, wvals, shifts, rr, block, value, target)[0]


def _schur_fwd(w, wvals, shifts, rr, block, value, target):
    S, (M, N) = _schur_value(w, wvals, shifts, rr, block, value, target)
    return S, (M, N, wvals, block, value, target, w.shape[0])


def _schur_bwd(shifts, res, S_bar):
    # S = B'N, N = MB with M and S_bar symmetric: N_bar = B S_bar, M_bar = B S_bar B' = B T with T = S_bar B';
    # w_d[i] gets sum_c S_bar[i, c] N[i + d, c] (from S) + sum_r T[i, r] M[i + d, r] (from N, by symmetry).
    M, N, wvals, block, value, target, n_w = res
    weights = list(zip(shifts, wvals))
    T = _rest_times(S_bar, weights, transpose=True)
    M_bar = _rest_times(T, weights, axis=0, transpose=True)
    w_bar = tuple(
        jnp.sum(S_bar * (N if d == 0 else jnp.roll(N, -d, axis=0)), axis=1)
        + jnp.sum(T * (M if d == 0 else jnp.roll(M, -d, axis=0)), axis=1)
        for d in shifts
    )
    # M = R'R - K - K' with K the lower triangle: K_bar = -(M_bar + M_bar') = -2 M_bar (M_bar is symmetric)
    g = -2.0 * M_bar.reshape(-1)
    grad_w = jax.ops.segment_sum(g[target] * value, block, num_segments=n_w)
    return grad_w, w_bar, None, None, None, None


_schur.defvjp(_schur_fwd, _schur_bwd)


def _jax_schur(w, weights, s: Structure):
    return _schur(w, tuple(v for _, v in weights), tuple(d for d, _ in weights), s.rr, s.pair_block, s.pair_value,
                  s.pair_target)


def _numpy_schur(w, weights, s: Structure):
    return _schur_value(w, tuple(v for _, v in weights), tuple(d for d, _ in weights), s.rr, s.pair_block,
                        s.pair_value, s.pair_target, NUMPY_OPS)[0]


def _criterion(logdet, pwrss, n, p, reml: bool, xp=jnp):
    """lme4's eq. 41 (ML) or eq. 42 (REML, ``logdet`` including ``log|R_X|^2``)."""
    dof = n - p if reml else n
    return logdet + dof * (1.0 + LOG_2PI + xp.log(pwrss / dof))


def _chol_logdet(L, m: int, xp=jnp):
    """``log|S_mm|`` of the leading ``(m, m)`` block of ``S = L L'`` from its lower Cholesky factor ``L`` (whose
    leading block is the block's own factor)."""
    return 2.0 * xp.sum(xp.log(xp.abs(xp.diagonal(L)[:m])))


def _chol_inverse(L, m: int, xp=jnp, cho_solve=jax.scipy.linalg.cho_solve):
    """``S_mm^{-1}`` from ``S``'s lower Cholesky factor ``L``: two triangular solves."""
    inv = cho_solve((L[:m, :m], True), xp.eye(m, dtype=L.dtype))
    return 0.5 * (inv + inv.T)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logdet_quad(S, b, m: int):
    """``(log|S[:m, :m]|, b' S^{-1} b)`` for symmetric positive definite ``S``.

    The gradient is written out from the inverses (``d log|S_mm| = pad(S_mm^{-1})``,
    ``d b'S^{-1}b = -x x'`` with ``x = S^{-1} b``) rather than traced through a Cholesky factor, whose rule
    costs several ``P^3`` triangular solves.
    """
    return _logdet_quad_fwd(S, b, m)[0]


def _cholesky(S):
    """Lower Cholesky factor of a symmetric ``S`` from its lower triangle (``S`` is symmetric by construction
    here: averaging it with its transpose first, as ``jnp.linalg.cholesky`` does, cost a third of the
    factorisation on InstEval's 1,144 x 1,144 block)."""
    return jax.lax.linalg.cholesky(S, symmetrize_input=False)


def _logdet_quad_fwd(S, b, m):
    L = _cholesky(S)
    logdet_m, inv_m = _chol_logdet(L, m), _chol_inverse(L, m)
    x = jax.scipy.linalg.cho_solve((L, True), b)
    return (logdet_m, b @ x), (inv_m, x)


def _logdet_quad_bwd(m, res, g):
    inv_m, x = res
    g_logdet, g_quad = g
    dS = (-g_quad * jnp.outer(x, x)).at[:m, :m].add(g_logdet * inv_m)
    return dS, 2.0 * g_quad * x


_logdet_quad.defvjp(_logdet_quad_fwd, _logdet_quad_bwd)


def _np_cho_solve(factor, b):
    """``scipy.linalg.cho_solve`` for a lower factor ``L`` (``(m, m)``), in NumPy: ``b`` is ``(m,)`` or
    ``(m, k)``. Two general solves: the NumPy path's blocks are at most :data:`NUMPY_MAX` wide."""
    L, lower = factor
    if not lower:
        raise ValueError("only lower Cholesky factors are used here")
    return np.linalg.solve(L.T, np.linalg.solve(L, b))


def _np_logdet_quad(S, b, m: int):
    """:func:`_logdet_quad`'s value in NumPy (no gradient: the NumPy path's optimiser needs none)."""
    L = np.linalg.cholesky(S)
    return _chol_logdet(L, m, np), b @ _np_cho_solve((L, True), b)


@dataclass(frozen=True)
class _Ops:
    """The array operations the criterion needs, on JAX (jit-able, differentiable, hand-written gradients)
    or on NumPy (no compilation: for small dense blocks, where compiling costs far more than evaluating).

    One implementation of the criterion and the estimates runs on either, so the two cannot drift apart."""

    xp: object
    segment_sum: object  # (data, ids, n) -> (n,) sums of data by id
    schur: object  # (W.reshape(-1), rest weights, structure) -> (P, P) B'(R'R - sum_j G_j'W_j G_j)B
    logdet_quad: object  # (S, b, m) -> (log|S[:m, :m]|, b' S^{-1} b)
    cholesky: object
    cho_solve: object  # ((L, lower), b) -> S^{-1} b from S's Cholesky factor L
    solve: object


JAX_OPS = _Ops(
    xp=jnp,
    segment_sum=lambda data, ids, n: jax.ops.segment_sum(data, ids, num_segments=n),
    schur=_jax_schur,
    logdet_quad=_logdet_quad,
    cholesky=_cholesky,
    cho_solve=jax.scipy.linalg.cho_solve,
    solve=jnp.linalg.solve,
)
NUMPY_OPS = _Ops(
    xp=np,
    segment_sum=lambda data, ids, n: np.bincount(ids, data, minlength=n),
    schur=_numpy_schur,
    logdet_quad=_np_logdet_quad,
    cholesky=np.linalg.cholesky,
    cho_solve=_np_cho_solve,
    solve=np.linalg.solve,
)


def profiled_deviance(
    theta: jax.Array, structure: Structure, reml: bool | None = None, ops: _Ops = JAX_OPS
) -> jax.Array:
    """lme4's profiled objective at ``theta``: REML criterion (eq. 42) or ``-2 log L`` (eq. 41).

    Pure and jit-able (``reml`` static); run it with 64-bit JAX on (``with jax.enable_x64(True):``), as
    :func:`fit_exact` does, with the structure's arrays converted by ``jax.device_put`` once.

    Args:
        theta: ``(n_theta,)`` relative Cholesky parameters, lower triangles of each ``Lambda_k`` column by
            column, terms in design order (see the module docstring).
        structure: :func:`build_structure` of the design.
        reml: ``True`` for the REML criterion, ``False`` for the deviance; ``None`` takes ``structure.reml``.
        ops: :data:`JAX_OPS` (default) or :data:`NUMPY_OPS` (the structure's NumPy arrays, float64).

    Returns:
        ``()``: ``log|L_Z|^2 (+ log|R_X|^2) + d (1 + log(2 pi r^2 / d))`` with ``d = n - p`` (REML) or ``n``.
    """
    reml = structure.reml if reml is None else reml
    f = _factor(theta, structure, ops)
    Q = structure.n_rest_random
    logdet_rest, quad_rest = ops.logdet_quad(f.S, f.rhs, f.S.shape[0] if reml else Q)
    pwrss = structure.yy - f.quad1 - quad_rest
    return _criterion(f.logdet_D + logdet_rest, pwrss, structure.n_obs, structure.n_fixed, reml, ops.xp)


# ----------------------------------------------------------------------------------------------------
# Estimates at a given theta


class Conditional(NamedTuple):
    """Estimates at one theta (lme4's ``mkMerMod`` quantities).

    Attributes:
        objective: ``()`` REML criterion or ``-2 log L``.
        pwrss: ``()`` penalised residual sum of squares ``r^2``.
        sigma: ``()`` ``sqrt(r^2 / (n - p))`` (REML) or ``sqrt(r^2 / n)`` (ML).
        beta: ``(p,)`` fixed effects.
        beta_cov: ``(p, p)`` ``sigma^2 (R_X R_X')^{-1}``, lme4's ``vcov``.
        effects: per term (design order) ``(J_k, p_k)`` conditional modes ``b = Lambda u`` in data units.
        effects_cov: per term ``(J_k, p_k, p_k)`` covariances of each level's ``b``: conditional on beta as
            lme4's ``condVar`` (``sigma^2 Lambda (Lambda'Z'Z Lambda + I)^{-1} Lambda'``), or with beta's
            uncertainty added when ``marginal=True``.
    """

    objective: jax.Array
    pwrss: jax.Array
    sigma: jax.Array
    beta: jax.Array
    beta_cov: jax.Array
    effects: tuple[jax.Array, ...]
    effects_cov: tuple[jax.Array, ...]


class DenseInverse(NamedTuple):
    """The dense block's factorisation as :func:`conditional_estimates` uses it (:func:`_dense_inverse`, or the
    host's LAPACK on the hybrid path: :func:`_host_dense_inverse`).

    Attributes:
        logdet_s: ``()`` ``log|S|``.
        logdet_q: ``()`` ``log|S_QQ|`` (the random-effects part: ML's determinant).
        inv_s: ``(P, P)`` ``S^{-1}``.
    """

    logdet_s: jax.Array
    logdet_q: jax.Array
    inv_s: jax.Array


def _dense_inverse(S, Q: int, ops: _Ops) -> DenseInverse:
    xp = ops.xp
    P = S.shape[0]
    L = ops.cholesky(S)
    return DenseInverse(_chol_logdet(L, P, xp), _chol_logdet(L, Q, xp), _chol_inverse(L, P, xp, ops.cho_solve))


def conditional_estimates(
    theta: jax.Array, structure: Structure, reml: bool | None = None, marginal: bool = False, ops: _Ops = JAX_OPS,
    dense: DenseInverse | None = None,
) -> Conditional:
    """Conditional modes, beta, sigma and covariances at ``theta`` (pure, jit-able; run it with x64 on).

    With ``x = [u_rest; beta] = S^{-1} rhs`` from the dense block, term 1's modes are
    ``u_1j = D_j^{-1}(Lambda_1' Z_1j'y - C_j x)`` with ``C_j = Lambda_1' G_j Lambda_e``. The covariance of
    ``u`` is ``sigma^2`` times a block of the inverse of the penalised system: for a rest level, a diagonal
    block of ``S_Z^{-1}``; for a term-1 level, ``D_j^{-1} + D_j^{-1} C_j S_Z^{-1} C_j' D_j^{-1}``, where
    ``S_Z`` is the Schur complement of the random-effects part only (``S[:Q, :Q]``, as lme4 conditions on
    beta) or the whole ``S`` (``marginal=True``, beta integrated with its flat prior, as REML does).

    Args:
        theta: ``(n_theta,)``.
        structure: :func:`build_structure` of the design.
        reml: as in :func:`profiled_deviance`.
        marginal: include beta's uncertainty in ``effects_cov``.
        ops: the array backend (:class:`_Ops`).
        dense: the dense block's inverse at ``theta``, computed elsewhere (the hybrid path's host LAPACK);
            ``None``: computed here from the factorisation.

    Returns:
        A :class:`Conditional`.
    """
    s = structure
    reml = s.reml if reml is None else reml
    xp = ops.xp
    f = _factor(theta, s, ops)
    P, Q, p, n = s.rr.shape[0], s.n_rest_random, s.n_fixed, s.n_obs
    J1, p1 = s.zy1.shape
    lam1 = f.lams[s.order[0]]
    lams_rest = [f.lams[k] for k in s.order[1:]]

    logdet_s, logdet_q, inv_s = _dense_inverse(f.S, Q, ops) if dense is None else dense
    # (S_QQ)^{-1} from S^{-1} by a rank-p correction: S_QQ^{-1} = V_QQ - V_Qp V_pp^{-1} V_pQ with V = S^{-1}.
    Vqp = inv_s[:Q, Q:]
    inv_q = inv_s[:Q, :Q] - Vqp @ ops.solve(inv_s[Q:, Q:], Vqp.T)
    x = inv_s @ f.rhs
    pwrss = s.yy - f.quad1 - f.rhs @ x
    objective = _criterion(f.logdet_D + (logdet_s if reml else logdet_q), pwrss, n, p, reml, xp)
    sigma2 = pwrss / (n - p if reml else n)

    # Term 1: u_1j = D_j^{-1}(Lambda_1' Z_1j'y - Lambda_1' G_j Lambda_e x).
    weights_t = _rest_weights([lam.T for lam in lams_rest], s, xp)
    y_rest = _rest_times(x, weights_t, xp)
    Gy = ops.segment_sum(
        s.cross_value * y_rest[s.cross_rest], s.cross_level * p1 + s.cross_coef, J1 * p1
    ).reshape(J1, p1)
    u1 = ops.solve(f.D, ((s.zy1 - Gy) @ lam1)[..., None])[..., 0]
    b_rest = y_rest[:Q]

    beta_cov = sigma2 * inv_s[Q:, Q:]
    Sz = inv_s if marginal else xp.pad(inv_q, ((0, P - Q), (0, P - Q)))
    # H_j = G_j (Lambda_e S_Z^{-1} Lambda_e') G_j' over the pairs, then C_j S_Z^{-1} C_j' = Lambda_1' H_j Lambda_1.
    Shat = _congruence(Sz, weights_t, xp)
    Hk = ops.segment_sum(s.pair_value * Shat.reshape(-1)[s.pair_target], s.pair_block, J1 * p1 * p1).reshape(
        J1, p1, p1
    )
    H = Hk + xp.swapaxes(Hk, -1, -2)
    _, Dinv = _small_spd_inverse(f.D, xp)
    A11 = Dinv + Dinv @ (lam1.T @ H @ lam1) @ Dinv
    cov1 = sigma2 * (lam1 @ A11 @ lam1.T)

    effects, covs = [None] * len(s.n_coefs), [None] * len(s.n_coefs)
    effects[s.order[0]] = u1 @ lam1.T
    covs[s.order[0]] = cov1
    for k, off, lam in zip(s.order[1:], s.rest_offsets, lams_rest):
        J, q = s.n_levels[k], s.n_coefs[k]
        effects[k] = b_rest[off : off + J * q].reshape(J, q)
        idx = off + np.arange(J)[:, None] * q + np.arange(q)
        block = Sz[idx[:, :, None], idx[:, None, :]]
        covs[k] = sigma2 * (lam @ block @ lam.T)
    return Conditional(
        objective=objective,
        pwrss=pwrss,
        sigma=xp.sqrt(sigma2),
        beta=x[Q:],
        beta_cov=beta_cov,
        effects=tuple(effects),
        effects_cov=tuple(covs),
    )


# ----------------------------------------------------------------------------------------------------
# The fit


class ExactFit(NamedTuple):
    """The optimum of lme4's profiled criterion.

    Attributes:
        theta: ``(n_theta,)`` relative Cholesky parameters (design order, see the module docstring).
        chol: per term ``(p_k, p_k)`` ``L_k = sigma Lambda_k``, the lower Cholesky factor of ``Sigma_k`` in the
            data's units (as :class:`lmevi.model.ModelParams.chol`).
        sigma: ``()`` residual standard deviation.
        beta: ``(p,)`` fixed effects.
        beta_cov: ``(p, p)`` their covariance (lme4's ``vcov``).
        effects: per term ``(J_k, p_k)`` conditional modes (lme4's ``ranef``).
        effects_cov: per term ``(J_k, p_k, p_k)`` conditional covariances given beta (lme4's ``condVar``).
        objective: ``()`` REML criterion or ``-2 log L`` (lme4's ``REMLcrit`` / ``deviance``).
        loglik: ``()`` ``-objective / 2``, lme4's ``logLik``.
        n_evals: criterion evaluations used (values and values-and-gradients).
        grad_norm: norm of the projected gradient of ``objective / (2 n)`` (minus the log-likelihood per
            observation) with respect to theta at the end: near zero at an optimum. After Newton's method, at
            the point before its last step (which is below ``sqrt(tol)`` relative and is not evaluated).
        converged: whether the optimiser stopped by its tolerances (not its budget), or stopped because no
            step lowered the criterion any more with a projected gradient below ``1e-6`` per observation.
        optimizer: ``"BOBYQA"`` (NLopt, the NumPy path); on the JAX path ``"Newton"`` (up to
            :data:`NEWTON_MAX` parameters), ``"Newton, then L-BFGS-B"`` where Newton's steps handed over, or
            ``"L-BFGS-B"`` (scipy).
        seconds: wall time of the optimisation and the final estimates.
    """

    theta: np.ndarray
    chol: tuple[np.ndarray, ...]
    sigma: np.ndarray
    beta: np.ndarray
    beta_cov: np.ndarray
    effects: tuple[np.ndarray, ...]
    effects_cov: tuple[np.ndarray, ...]
    objective: np.ndarray
    loglik: np.ndarray
    n_evals: int
    grad_norm: float
    converged: bool
    optimizer: str
    seconds: float


_BOUNDARY_STEP = 1e-3
# L-BFGS-B's line search gives up ("ABNORMAL_TERMINATION_IN_LNSRCH") when no step lowers the criterion any
# more, and BOBYQA stops "limited by roundoff" likewise: converged if the projected gradient per observation is
# below this (lmevi warns from 1e-3).
_STALL_GRAD = 1e-6
# BOBYQA stops when its trust region (the change of theta it can still resolve) is below this times ``tol``:
# 1e-11 at the default tol 1e-10, where lme4's nloptwrap stops at 1e-8 in theta (or in the criterion). No stop
# on the criterion's change: on the corpus a relative 1e-10 there stopped up to 5e-6 short in log-likelihood.
_BOBYQA_XTOL = 0.1
_value_and_grad = sized_jit(jax.value_and_grad(profiled_deviance), sized=False, static_argnames=("reml",),
                            name="lmevi.exact.value_and_grad(profiled_deviance)")
_conditional = sized_jit(conditional_estimates, sized=False, static_argnames=("reml", "marginal"))
_value = sized_jit(profiled_deviance, sized=False, static_argnames=("reml",))

# ----------------------------------------------------------------------------------------------------
# The hybrid path (CPU): JAX for the sparse sums and the gradient, the host's LAPACK for the dense block


def _parts(theta, structure: Structure, ops: _Ops = JAX_OPS):
    """``(S (P, P), rhs (P,), sum_j log|D_j| (), sum_j |c_1j|^2 ())`` at ``theta``: what the dense block's
    factorisation starts from (pure, jit-able)."""
    f = _factor(theta, structure, ops)
    return f.S, f.rhs, f.logdet_D, f.quad1


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scaled_rest(w, wvals, shifts, M, block, value, target):
    """``(P, P)`` ``B'MB`` with ``M = _unscaled_rest(w, ...)`` given, not summed again over the pairs, and
    :func:`_schur`'s gradient (which needs ``M``, not the pair sum): the gradient at a theta whose criterion
    value was just computed reuses that value's ``M``."""
    return _congruence(M, list(zip(shifts, wvals)))


def _scaled_rest_fwd(w, wvals, shifts, M, block, value, target):
    S, N = _congruence_parts(M, list(zip(shifts, wvals)))
    return S, (M, N, wvals, block, value, target, w.shape[0])


_scaled_rest.defvjp(_scaled_rest_fwd, _schur_bwd)


def _parts_pullback(theta, structure: Structure, M, V, x, g):
    """``(n_theta,)`` the gradient of the criterion with respect to ``theta``, given ``M`` ``(P, P)`` of
    :func:`_unscaled_parts` at ``theta`` and the host's pieces of the dense block: ``V`` ``(P, P)``, the
    inverse of ``S`` (REML) or of its leading ``(Q, Q)`` block padded with zeros (ML), ``x = S^{-1} rhs``
    ``(P,)`` and ``g = dof / r^2`` ``()``. The criterion's derivatives in the pieces of :func:`_parts` are
    ``V + g x x'`` in ``S``, ``-2 g x`` in the right-hand side, ``1`` in ``log|D|`` and ``-g`` in ``quad1``;
    the chain rule carries them back to theta."""

    def schur(w, weights, s):
        return _scaled_rest(w, tuple(v for _, v in weights), tuple(d for d, _ in weights), M, s.pair_block,
                            s.pair_value, s.pair_target)

    ops = dataclasses.replace(JAX_OPS, schur=schur)
    _, pull = jax.vjp(lambda t: _parts(t, structure, ops), theta)
    S_bar = V + g * jnp.outer(x, x)
    return pull((S_bar, -2.0 * g * x, jnp.ones((), theta.dtype), -g))[0]


def _unscaled_parts(theta, structure: Structure):
    """``(M (P, P), v (P,), sum_j log|D_j| (), sum_j |c_1j|^2 ())``: the pieces of :func:`_parts` before
    ``Lambda_e`` scales them (:func:`_unscaled_rest`, :func:`_term1`); they depend on term 1's ``theta`` only
    (pure, jit-able)."""
    _, _, W, logdet_D, quad1, v = _term1(theta, structure, JAX_OPS)
    s = structure
    return _unscaled_rest(W.reshape(-1), s.rr, s.pair_block, s.pair_value, s.pair_target, JAX_OPS), v, logdet_D, quad1


def _host_scaled(M: np.ndarray, v: np.ndarray, theta: np.ndarray, s: Structure) -> tuple[np.ndarray, np.ndarray]:
    """``(S, rhs)`` of :func:`_parts` from :func:`_unscaled_parts`' ``M`` and ``v``, on the host: ``S = B'MB +
    diag(1_Q, 0)``, ``rhs = B'v``. With scalar rest terms ``B`` is diagonal and ``S = M * b b'``, exactly
    symmetric."""
    lams = _lambdas_numpy(theta, s.n_coefs)
    weights = _rest_weights([lams[k] for k in s.order[1:]], s, np)
    if len(weights) == 1:  # every rest term scalar: B = diag(b)
        b = weights[0][1]
        S = M * np.outer(b, b)
    else:
        S = _congruence(M, weights, np)
    Q = s.n_rest_random
    S[np.arange(Q), np.arange(Q)] += 1.0
    return S, _rest_times(v, weights, np)


_unscaled_parts_jit = sized_jit(_unscaled_parts, sized=False, name="lmevi.exact._unscaled_parts")
_parts_pullback_jit = sized_jit(_parts_pullback, sized=False, name="lmevi.exact._parts_pullback")


def _host_lapack():
    """SciPy's LAPACK for the host (its f2py module ``scipy.linalg._flapack``, loaded without importing
    ``scipy.linalg``: :func:`lmevi.runtime.scipy_linalg_extension`), or ``None``."""
    from lmevi.runtime import scipy_linalg_extension

    module = scipy_linalg_extension("scipy.linalg._flapack")
    return module if all(hasattr(module, f) for f in ("dpotrf", "dpotrs", "dpotri")) else None


def _host_cholesky(S: np.ndarray, lapack):
    """Lower Cholesky factor of the symmetric ``(P, P)`` float64 ``S`` (zero above the diagonal), or ``None``
    where ``S`` is not positive definite. Overwrites ``S``, a writable host array: a C-ordered ``S`` is read as
    its transpose (the same matrix), one triangle."""
    c, info = lapack.dpotrf(S.T if S.flags.c_contiguous else np.asfortranarray(S), lower=1, clean=1, overwrite_a=1)
    return c if info == 0 else None


def _host_inverse(c: np.ndarray, m: int, lapack) -> np.ndarray:
    """``S[:m, :m]^{-1}`` (symmetric) from the factor ``c`` of :func:`_host_cholesky` by LAPACK's ``potri``,
    which inverts from the factor in a third of the floating-point work of the two triangular solves JAX
    has (InstEval's 1,144 x 1,144 block: 21 ms against 48 ms). Overwrites ``c`` when ``m`` is its size."""
    lead = c if m == c.shape[0] else np.array(c[:m, :m], order="F")
    inv, info = lapack.dpotri(lead, lower=1, overwrite_c=1)
    if info != 0:
        return np.full((m, m), np.nan)
    out = inv + inv.T  # potri fills the lower triangle; the factor's upper one is zero (clean=1)
    out[np.diag_indices(m)] = np.diagonal(inv)
    return out


def _host_dense_inverse(S: np.ndarray, Q: int, lapack) -> DenseInverse:
    """:class:`DenseInverse` of ``S`` on the host's LAPACK (NaN where ``S`` is not positive definite)."""
    P = S.shape[0]
    c = _host_cholesky(S, lapack)
    if c is None:
        return DenseInverse(np.asarray(np.nan), np.asarray(np.nan), np.full((P, P), np.nan))
    logdet_s, logdet_q = _chol_logdet(c, P, np), _chol_logdet(c, Q, np)
    return DenseInverse(np.asarray(logdet_s), np.asarray(logdet_q), _host_inverse(c, P, lapack))


def _hybrid_evaluator(s: Structure, sj: Structure, reml: bool, put, lapack) -> "_Evaluator":
    """The criterion with the dense block factorised by the host's LAPACK: JAX computes ``S`` and the right-hand
    side (:func:`_parts`, the sums over level pairs), the host factorises and inverts ``S``, and JAX carries
    the criterion's derivatives in ``S`` back to theta (:func:`_parts_pullback`). On a CPU this replaces JAX's
    inverse by two triangular solves (the largest piece of a gradient) by ``potri``; the numbers are the same
    criterion to rounding (tests/test_exact.py)."""
    P, Q, n, p = s.size, s.n_rest_random, s.n_obs, s.n_fixed
    m, dof = (P, n - p) if reml else (Q, n)
    yy = float(s.yy)
    start = theta_size(s.n_coefs[: s.order[0]])  # term 1's entries of theta
    first = slice(start, start + theta_size(s.n_coefs[s.order[0] : s.order[0] + 1]))
    # The pieces that depend on term 1's theta alone, for the last two values of it: of the six points of
    # Newton's Hessian (_fd_hessian) three keep term 1's theta and three share one step of it, so the pair
    # sums run twice for the seven evaluations, not seven times
    memo: dict = {}

    def parts(th):
        key = tuple(th[first])
        if key not in memo:
            if len(memo) == 2:
                memo.pop(next(iter(memo)))
            M, v, logdet_D, quad1 = _unscaled_parts_jit(put(th), sj)
            memo[key] = (M, np.asarray(M), np.asarray(v), float(logdet_D), float(quad1))
        _, M, v, logdet_D, quad1 = memo[key]
        return *_host_scaled(M, v, th, s), logdet_D, quad1

    def evaluate(th):
        S, rhs, logdet_D, quad1 = parts(th)
        c = _host_cholesky(S, lapack)
        if c is None:
            return np.nan, None, None, None
        x = lapack.dpotrs(c, rhs, lower=1)[0]
        pwrss = yy - quad1 - float(rhs @ x)
        return float(_criterion(logdet_D + float(_chol_logdet(c, m, np)), pwrss, n, p, reml, np)), c, x, pwrss

    def value_and_grad(th):
        value, c, x, pwrss = evaluate(th)
        if c is None:
            return value, np.full(len(th), np.nan)
        g = dof / pwrss  # minus the criterion's derivative in the penalised residual sum of squares
        if m == P:
            V = _host_inverse(c, P, lapack)
        else:
            V = np.zeros((P, P))
            V[:m, :m] = _host_inverse(c, m, lapack)
        M = memo[tuple(th[first])][0]  # the device's M that evaluate's parts just used
        grad = _parts_pullback_jit(put(th), sj, M, jax.device_put(V), jax.device_put(x), jax.device_put(np.asarray(g)))
        return value, np.asarray(grad, np.float64)

    def conditional(th):
        dense = jax.device_put(_host_dense_inverse(parts(th)[0], Q, lapack))
        return jax.tree.map(np.asarray, _conditional(put(th), sj, reml=reml, dense=dense))

    return _Evaluator(lambda th: evaluate(th)[0], value_and_grad, conditional)


# Dense blocks up to this size are fitted in NumPy: an evaluation there takes well under a millisecond,
# where compiling the JAX criterion for a new shape takes 1-2 s (experiments/families.py measures both).
NUMPY_MAX = 128
BACKENDS = ("jax", "numpy", "hybrid")
# Central differences for the NumPy path's final gradient (the convergence check): a step of about
# eps^(1/3) (relative to theta, at least absolute) balances truncation (step^2) against rounding (eps / step),
# about 1e-10 relative to the criterion.
_FD_STEP = 6e-6


class _Evaluator(NamedTuple):
    """The criterion on one backend, as functions of a NumPy ``(n_theta,)`` theta."""

    value: object  # theta -> float
    value_and_grad: object  # theta -> (float, (n_theta,) gradient)
    conditional: object  # theta -> Conditional of NumPy arrays


def _evaluator(s: Structure, reml: bool, backend: str) -> _Evaluator:
    if backend == "numpy":

        def value(th):
            return float(profiled_deviance(th, s, reml, NUMPY_OPS))

        def value_and_grad(th):
            steps = _FD_STEP * np.maximum(np.abs(th), 1.0)
            grad = [(value(th + h * e) - value(th - h * e)) / (2.0 * h) for h, e in zip(steps, np.eye(len(th)))]
            return value(th), np.asarray(grad)

        return _Evaluator(value, value_and_grad, lambda th: conditional_estimates(th, s, reml, ops=NUMPY_OPS))
    sj = jax.device_put(s)

    def put(th):  # a host copy to the device compiles nothing (jnp.asarray does)
        return jax.device_put(np.asarray(th, np.float64))

    if backend == "hybrid":
        lapack = _host_lapack()
        if lapack is None:
            raise ValueError("backend='hybrid' needs SciPy's LAPACK module (scipy.linalg._flapack)")
        return _hybrid_evaluator(s, sj, reml, put, lapack)

    def value_and_grad(th):
        value, grad = _value_and_grad(put(th), sj, reml=reml)
        return float(value), np.asarray(grad, np.float64)

    return _Evaluator(lambda th: float(_value(put(th), sj, reml=reml)), value_and_grad,
                      lambda th: jax.tree.map(np.asarray, _conditional(put(th), sj, reml=reml)))


class _Optimum(NamedTuple):
    x: np.ndarray  # (n_theta,)
    fun: float
    jac: np.ndarray | None  # (n_theta,) the gradient at x where the optimiser has it
    converged: bool  # stopped by its tolerances, not by the evaluation budget
    stalled: bool  # stopped because no step lowered the criterion any more
    method: str  # the optimiser(s) that produced x, as the summary names them
    # Newton's last step is taken without evaluating the criterion at x: ``previous`` is the point it started
    # from, where ``fun`` and ``jac`` were evaluated (see _newton); None when fun and jac are at x
    previous: np.ndarray | None = None


def _lbfgsb(ev: _Evaluator, x0, lower, tol: float, max_evals: int) -> _Optimum:
    """scipy's L-BFGS-B with the exact gradient: ``ftol`` and ``gtol`` are ``tol``."""
    import scipy.optimize  # imported here: 0.4 s, which a fit on the NumPy path does not pay

    bounds = [(None if np.isinf(lo) else lo, None) for lo in lower]
    options = {"ftol": tol, "gtol": tol, "maxfun": max_evals, "maxiter": max_evals}
    res = scipy.optimize.minimize(ev.value_and_grad, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                  options=options)
    return _Optimum(np.asarray(res.x, np.float64), float(res.fun), np.asarray(res.jac), bool(res.success),
                    res.status == 2, "L-BFGS-B")


def _bobyqa(ev: _Evaluator, x0, lower, tol: float, max_evals: int) -> _Optimum:
    """NLopt's BOBYQA (lme4's default optimiser), derivative-free: stops when its trust region falls below
    ``_BOBYQA_XTOL * tol`` in theta. Returns the best point it evaluated, also when NLopt stops with an
    exception (round-off)."""
    import nlopt

    best = [np.inf, np.asarray(x0, np.float64)]

    def objective(x, grad):
        f = ev.value(np.asarray(x, np.float64))
        if f < best[0]:
            best[:] = [f, np.array(x, np.float64)]
        return f

    opt = nlopt.opt(nlopt.LN_BOBYQA, len(x0))
    opt.set_lower_bounds(np.asarray(lower, np.float64))
    opt.set_min_objective(objective)
    opt.set_xtol_abs(_BOBYQA_XTOL * tol)
    opt.set_maxeval(max_evals)
    try:
        opt.optimize(np.asarray(x0, np.float64))
        code = opt.last_optimize_result()
    except nlopt.RoundoffLimited:
        code = nlopt.ROUNDOFF_LIMITED
    done = code in (nlopt.SUCCESS, nlopt.FTOL_REACHED, nlopt.XTOL_REACHED)
    return _Optimum(best[1], float(best[0]), None, done, code == nlopt.ROUNDOFF_LIMITED, "BOBYQA")


# Newton's method runs for at most this many parameters: its Hessian costs n (n + 1) / 2 criterion values.
NEWTON_MAX = 4
# Forward-difference step of the Hessian, times max(|theta|, 1). Newton's steps need the Hessian only roughly:
# the start's Hessian differs from the optimum's by a few percent anyway, which the BFGS updates correct.
_HESSIAN_STEP = 1e-4
# Newton's steps change a relative SD (on the log scale) by at most this much, and a step that does not descend
# is halved up to _NEWTON_HALVINGS times: from a start far off (the structured fit's is 30 % off for a factor
# crossed with a nested pair) the log scale's quadratic model can overshoot by far.
_LOG_STEP_MAX, _NEWTON_HALVINGS = 0.5, 2
# Below this a relative SD (a diagonal entry of Lambda_k near its bound 0) is taken linearly by Newton's
# method, not on a log scale, and Newton's stop measures its steps absolutely.
_NEWTON_SCALE = 1e-2


def _fd_hessian(value, x, f, g) -> np.ndarray:
    """``(n, n)`` Hessian of ``value`` at ``x`` (where it is ``f`` with gradient ``g``) from ``n (n + 1) / 2``
    values at forward steps: ``H_ii`` from the second-order Taylor remainder along ``e_i``, ``H_ij`` from the
    four corners ``x, x + h_i e_i, x + h_j e_j, x + h_i e_i + h_j e_j``. Values rather than gradients: on
    InstEval a value costs a third of a value and gradient, and since the criterion's programs are kept as
    executables (:mod:`lmevi.runtime`) a second program costs a fresh process milliseconds to load, not the
    half second its tracing took."""
    n = len(x)
    h = _HESSIAN_STEP * np.maximum(np.abs(x), 1.0)
    E = np.eye(n) * h
    fi = np.array([value(x + E[i]) for i in range(n)])
    H = np.zeros((n, n))
    for i in range(n):
        H[i, i] = 2.0 * (fi[i] - f - h[i] * g[i]) / h[i] ** 2
        for j in range(i):
            H[i, j] = H[j, i] = (value(x + E[i] + E[j]) - fi[i] - fi[j] + f) / (h[i] * h[j])
    return H


def _newton(ev: _Evaluator, x0, lower, tol: float, max_evals: int) -> _Optimum:
    """Newton's method from a start near the optimum (the structured fit's): a Hessian from criterion values
    (:func:`_fd_hessian`), then steps ``-H^{-1} g`` with BFGS updates of ``H``.

    The diagonal entries of the ``Lambda_k`` that start at least :data:`_NEWTON_SCALE` from their bound 0 are
    taken on a log scale (relative SDs): the criterion is closer to quadratic there, and on InstEval the steps
    shrink 200-fold each instead of 30- to 80-fold (relative errors 1.5e-2, 7.4e-5, 7.7e-7 against 1.5e-2,
    2.4e-4, 6.4e-6). Entries near 0 stay linear (the criterion is even in them, flat, not log-quadratic).

    Stops when a step is below ``sqrt(tol)`` relative to theta (absolute below :data:`_NEWTON_SCALE`), or when
    the error left after it, predicted from the last two steps' contraction (``|s_k|^2 / |s_{k-1}|``), is below
    ``sqrt(tol) / 10``: that step is taken without evaluating the criterion after it (``previous``;
    :func:`fit_exact` checks that it descended with the estimates it computes there, and reports the gradient
    from before it). The point returned is within about ``sqrt(tol) / 10`` (``1e-6`` relative at the default
    ``tol``) of the optimum; InstEval REML takes two values and gradients.

    From a start far off the log scale's quadratic model can overshoot by far: a step changes a relative SD by
    at most a factor ``exp(0.5)`` (:data:`_LOG_STEP_MAX`), a step that does not descend is halved (up to
    :data:`_NEWTON_HALVINGS` times), and where the log scale's Hessian is not positive definite theta's own
    curvature (in relative units) is taken. A step that still does not descend, leaves the bounds, takes a
    log-scale SD below :data:`_NEWTON_SCALE` (heading for its bound, which the log scale never reaches), or
    meets a Hessian that is not positive definite hands over to :func:`_lbfgsb` from the best point so far
    (``method`` then names both)."""
    x0 = np.asarray(x0, np.float64)
    logged = (lower == 0.0) & (x0 >= _NEWTON_SCALE)

    def theta(u):
        return np.where(logged, np.exp(np.where(logged, u, 0.0)), u)

    def value_and_grad(u):  # the gradient in u: d theta / d u = theta on the log scale
        t = theta(u)
        f, g = ev.value_and_grad(t)
        return f, np.asarray(g), np.where(logged, g * t, g)

    def size(step, t):  # the step relative to theta (absolutely below _NEWTON_SCALE)
        rel = np.where(logged, np.abs(step) / np.maximum(1.0, _NEWTON_SCALE / t),
                       np.abs(step) / np.maximum(np.abs(t), _NEWTON_SCALE))
        return float(np.max(rel)) if rel.size else 0.0

    x = np.where(logged, np.log(np.where(logged, x0, 1.0)), x0)
    low = np.where(logged, -np.inf, lower)
    f, g_theta, g = value_and_grad(x)
    n = len(x)
    H = _fd_hessian(lambda u: ev.value(theta(u)), x, f, g)
    used = 1 + n * (n + 1) // 2
    last = None  # size of the step before
    while used < max_evals:
        try:
            L = np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            # Far from the optimum the log scale's curvature d2f/du2 = theta^2 f'' + theta f' can be negative
            # where f'' > 0: take theta's own curvature, in relative units, from here on
            H = H - np.diag(np.where(logged, g, 0.0))
            try:
                L = np.linalg.cholesky(H)
            except np.linalg.LinAlgError:
                break
        step = -_np_cho_solve((L, True), g)
        big = float(np.max(np.abs(step[logged]), initial=0.0))
        if big > _LOG_STEP_MAX:  # at most a factor exp(0.5) on a relative SD per step
            step *= _LOG_STEP_MAX / big
        accepted = False
        for _ in range(_NEWTON_HALVINGS + 1):  # a step that does not descend is halved, then handed over
            x1 = x + step
            t1 = theta(x1)
            # leaving the bounds, or a relative SD on the log scale heading for its bound 0 (which the log
            # scale never reaches): L-BFGS-B takes over, as it does for a step that does not descend
            if (np.any(x1 < low) or not np.all(np.isfinite(x1)) or np.any(logged & (t1 < _NEWTON_SCALE))
                    or used >= max_evals):
                break
            m = size(step, t1)
            if m <= np.sqrt(tol) or (last is not None and 10.0 * m * m / last <= np.sqrt(tol)):
                # The last step: taken without its own value and gradient. fit_exact computes the estimates
                # at x1 anyway, and checks with their criterion that the step descended (else it keeps x).
                return _Optimum(t1, float(f), g_theta, True, False, "Newton", previous=theta(x))
            f1, g1_theta, g1 = value_and_grad(x1)
            used += 1
            if f1 <= f + 8 * np.finfo(float).eps * abs(f):  # lower (to rounding)
                accepted = True
                break
            step = step / 2.0
        if not accepted:  # out of bounds, or no descent: not a Newton region
            break
        y = g1 - g
        if step @ y > 0:  # BFGS update: stays positive definite
            Hs = H @ step
            H = H - np.outer(Hs, Hs) / (step @ Hs) + np.outer(y, y) / (step @ y)
        x, f, g, g_theta, last = x1, f1, g1, g1_theta, m
    rest = _lbfgsb(ev, theta(x), lower, tol, max(max_evals - used, 1))
    if rest.fun > f:  # L-BFGS-B ran out of evaluations above the Newton point
        rest = rest._replace(x=theta(x), fun=float(f), jac=g_theta)
    return rest._replace(method="Newton, then L-BFGS-B")


def _large_backend() -> str:
    """The backend of a dense block above :data:`NUMPY_MAX`: ``"hybrid"`` where JAX runs on the CPU (the host's
    LAPACK is then the same machine's, and faster for the block), ``"jax"`` on an accelerator."""
    return "hybrid" if jax.default_backend() == "cpu" and _host_lapack() is not None else "jax"


_OPTIMISERS = {"bobyqa": _bobyqa, "newton": _newton, "lbfgsb": _lbfgsb}
OPTIMISERS = tuple(_OPTIMISERS)


def _default_optimiser(backend: str, n_theta: int, warm_start: bool) -> str:
    """BOBYQA on NumPy; on JAX Newton from a start near the optimum (a warm start: the structured fit's) with
    up to :data:`NEWTON_MAX` parameters, else L-BFGS-B. From lme4's start, far from the optimum, Newton's
    Hessian is spent on a region it does not describe."""
    if backend == "numpy":
        return "bobyqa"
    return "newton" if warm_start and n_theta <= NEWTON_MAX else "lbfgsb"


def fit_exact(
    design: Design,
    reml: bool = True,
    *,
    theta0=None,
    tol: float = 1e-10,
    max_evals: int = 1000,
    structure: Structure | None = None,
    backend: str | None = None,
    optimizer: str | None = None,
) -> ExactFit:
    """Maximise the (restricted) likelihood exactly: lme4's profiled criterion, minimised over theta.

    lme4 runs derivative-free BOBYQA (nloptwrap). Here small dense blocks (NumPy) run the same BOBYQA from
    NLopt with tighter tolerances; larger ones (JAX, or hybrid) use the criterion's exact gradient: Newton's
    method on a finite-difference Hessian from a given start (``theta0``) with up to :data:`NEWTON_MAX`
    parameters (:func:`_newton`), else L-BFGS-B. The jit-compiled value and ``value_and_grad`` are shared by
    fits of the same shapes, so only a fit of a new shape compiles. Bounds and default start are lme4's: ``theta >= 0`` on
    the diagonal of every ``Lambda_k``, start at ``Lambda_k = I``.

    Args:
        design: the model's arrays.
        reml: REML criterion (lme4's default) or maximum likelihood.
        theta0: ``(n_theta,)`` start; lme4's default when ``None``.
        tol: L-BFGS-B's ``ftol`` (relative change of the criterion) and ``gtol`` (projected gradient);
            Newton's method stops after a step below ``sqrt(tol)`` relative to theta; BOBYQA stops when its
            trust region in theta is below ``tol / 10``.
        max_evals: the most criterion evaluations.
        structure: a :func:`build_structure` of ``design`` to reuse; built here when ``None``.
        backend: ``"numpy"``, ``"hybrid"`` (JAX with the host's LAPACK for the dense block) or ``"jax"``;
            ``None`` takes NumPy when the dense block has at most :data:`NUMPY_MAX` coefficients, else the
            hybrid path where JAX runs on the CPU and JAX alone on an accelerator (:func:`_large_backend`).
        optimizer: one of :data:`OPTIMISERS` (``"bobyqa"`` needs no gradient and suits NumPy; ``"newton"``
            and ``"lbfgsb"`` use the gradient, exact on JAX); ``None`` chooses as
            :func:`_default_optimiser` says.

    Returns:
        An :class:`ExactFit` of NumPy float64 arrays; ``grad_norm`` is the final projected gradient (exact on
        JAX, central differences on NumPy) per observation.
    """
    start = time.perf_counter()
    s = build_structure(design, reml) if structure is None else structure
    n_coefs = s.n_coefs
    warm_start = theta0 is not None
    theta0 = theta_default(n_coefs) if theta0 is None else np.asarray(theta0, np.float64)
    lower = theta_lower_bounds(n_coefs)
    if backend is None:
        backend = "numpy" if s.size <= NUMPY_MAX else _large_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    optimizer = _default_optimiser(backend, len(theta0), warm_start) if optimizer is None else optimizer
    if optimizer not in OPTIMISERS:
        raise ValueError(f"optimizer must be one of {OPTIMISERS}, got {optimizer!r}")
    n_evals = 0
    with jax.enable_x64(True):
        raw = _evaluator(s, reml, backend)

        def counted(f):
            def g(th):
                nonlocal n_evals
                n_evals += 1
                return f(np.asarray(th, np.float64))

            return g

        ev = raw._replace(value=counted(raw.value), value_and_grad=counted(raw.value_and_grad))
        minimise = _OPTIMISERS[optimizer]
        res = minimise(ev, theta0, lower, tol, max_evals)
        # The criterion is even in a scalar term's theta, so its gradient vanishes on the bound theta = 0:
        # an optimiser that lands there stops even where the criterion falls on moving back in (a saddle,
        # not a minimum). Step off each such bound once and restart if that is lower.
        for _ in range(len(theta0)):
            best, trial = res.fun, None
            for i in np.flatnonzero((lower == 0.0) & (res.x == 0.0)):
                candidate = res.x.copy()
                candidate[i] = _BOUNDARY_STEP
                value = ev.value(candidate)
                if value < best:
                    best, trial = value, candidate
            if trial is None:
                break
            res = minimise(ev, trial, lower, tol, max(max_evals - n_evals, 1))
        theta = res.x
        est = ev.conditional(theta)
        if res.previous is not None and not float(est.objective) <= res.fun + 8 * np.finfo(float).eps * abs(res.fun):
            theta = res.previous  # Newton's unevaluated last step did not descend: the point before it
            est = ev.conditional(theta)
        jac = res.jac if res.jac is not None else raw.value_and_grad(theta)[1]
    sigma = float(est.sigma)
    lams = _lambdas_numpy(theta, n_coefs)
    grad_norm = _projected_grad_norm(theta, jac, lower) / (2.0 * s.n_obs)
    return ExactFit(
        theta=theta,
        chol=tuple(sigma * lam for lam in lams),
        sigma=np.asarray(sigma),
        beta=est.beta,
        beta_cov=est.beta_cov,
        effects=tuple(est.effects),
        effects_cov=tuple(est.effects_cov),
        objective=np.asarray(est.objective),
        loglik=np.asarray(-0.5 * est.objective),
        n_evals=n_evals,
        grad_norm=grad_norm,
        converged=res.converged or (res.stalled and grad_norm <= _STALL_GRAD),
        optimizer=res.method,
        seconds=time.perf_counter() - start,
    )


def _projected_grad_norm(x, grad, lower) -> float:
    """The gradient's norm once the components pushing a parameter at its lower bound outwards are dropped."""
    grad = np.where((x <= lower) & (grad > 0), 0.0, np.asarray(grad, np.float64))
    return float(np.linalg.norm(grad))


def _lambdas_numpy(theta: np.ndarray, n_coefs: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    out, pos = [], 0
    for q in n_coefs:
        rows, cols = _tril_columnwise(q)
        lam = np.zeros((q, q))
        lam[rows, cols] = theta[pos : pos + len(rows)]
        out.append(lam)
        pos += len(rows)
    return tuple(out)
