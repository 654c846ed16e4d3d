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
``lmevi.fitting.build.AUTO_EXACT_MAX``): the cost of one evaluation is ``O(P^3)``.

Precision: float64 throughout (JAX's 64-bit types are switched on for lmevi's own calls only, as
``jax.enable_x64`` contexts; the host's LAPACK is double precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.families.base import LOG_2PI
from lmevi.exact.structure import Structure
from lmevi.exact.covfactors import lambdas
from lmevi.runtime.jit import sized_jit


# ----------------------------------------------------------------------------------------------------
# Structure: everything about the design that does not depend on theta, computed once on the host


# ----------------------------------------------------------------------------------------------------
# theta <-> Lambda


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


# ----------------------------------------------------------------------------------------------------
# The fit


_value_and_grad = sized_jit(jax.value_and_grad(profiled_deviance), sized=False, static_argnames=("reml",),
                            name="lmevi.exact.criterion.value_and_grad(profiled_deviance)")
_value = sized_jit(profiled_deviance, sized=False, static_argnames=("reml",))
