"""The hybrid path (CPU): JAX for the sums over level pairs and the chain rule back to theta, the host's
LAPACK for the dense block's factorisation and inverse.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.runtime.jit import sized_jit
from lmevi.exact.criterion import JAX_OPS, _Ops, _chol_logdet, _congruence, _congruence_parts, _criterion, _factor, _rest_times, _rest_weights, _schur_bwd, _term1, _unscaled_rest
from lmevi.exact.estimates import DenseInverse
from lmevi.exact.structure import Structure
from lmevi.exact.covfactors import _lambdas_numpy, theta_size
from lmevi.exact.estimates import _Evaluator, _conditional


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


_unscaled_parts_jit = sized_jit(_unscaled_parts, sized=False, name="lmevi.exact.criterion._unscaled_parts")


_parts_pullback_jit = sized_jit(_parts_pullback, sized=False, name="lmevi.exact.criterion._parts_pullback")


def _host_lapack():
    """SciPy's LAPACK for the host (its f2py module ``scipy.linalg._flapack``, loaded without importing
    ``scipy.linalg``: :func:`lmevi.runtime.lapack.scipy_linalg_extension`), or ``None``."""
    from lmevi.runtime.lapack import scipy_linalg_extension

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
