"""Satterthwaite degrees of freedom for t and F tests of the fixed effects of an exact Gaussian fit.

lmerTest (Kuznetsova, Brockhoff & Christensen 2017, J. Stat. Softw. 82(13)) tests a contrast ``L beta`` with
the variance parameters ``varpar = (theta, sigma)`` (lme4's relative Cholesky parameters and the residual SD)
treated as estimated with the asymptotic covariance ``A = 2 H^{-1}``, ``H`` the Hessian of the deviance

    d(theta, sigma) = log|L_Z|^2 + r^2(theta) / sigma^2 + n log(2 pi sigma^2)                     (ML)
                      + log|R_X|^2 - p log(2 pi sigma^2)                                         (REML, added)

(lmerTest's ``devfun_vp``: *not* profiled over sigma) at the optimum, and with ``Jac = d vcov(beta) / d varpar``,
``vcov(beta) = sigma^2 (R_X' R_X)^{-1}`` (``get_covbeta``). A one-row contrast ``l`` then has
``df = 2 (l'Vl)^2 / (g' A g)`` with ``g_i = l' Jac_i l`` (``contest1D``); a matrix ``L`` is split along the
eigenvectors of ``L V L'`` into independent t statistics whose dfs are pooled (``contestMD``,
``get_Fstat_ddf``).

Where lmerTest differentiates numerically (``numDeriv::hessian`` and ``numDeriv::jacobian``, Richardson
extrapolation), the derivatives here are JAX's autodiff in float64 of a plain-JAX copy of the blocked
criterion of :mod:`lmevi.exact` (the functions there carry hand-written ``custom_vjp`` gradients, which
support neither forward mode nor a second reverse pass). lmerTest's numbers therefore differ from these in
their numerical-differentiation error (about 1e-6 relative on sleepstudy's dfs).

Everything the functions need: a :class:`lmevi.frame.design.Design` (data units), ``theta`` (design order, as
:func:`lmevi.exact.optimise.fit_exact` returns it), ``sigma`` and whether the fit is REML, or a ready
:class:`lmevi.exact.structure.Structure` of the design.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy import stats

from lmevi.frame.design import Design
from lmevi.exact.structure import Structure, build_structure
from lmevi.exact.covfactors import lambdas
from lmevi.runtime.jit import sized_jit
from lmevi.runtime.precision import x64

# lmerTest's tolerance on the Hessian's eigenvalues (``as_lmerModLT(tol = 1e-8)``): directions with a smaller
# eigenvalue are left out of A (a Moore-Penrose inverse), as there.
HESSIAN_TOL = 1e-8


class VarparDerivatives(NamedTuple):
    """What every Satterthwaite contrast of one fit reuses (lmerTest's ``lmerModLmerTest`` slots).

    Attributes:
        beta: ``(p,)`` fixed effects at ``theta``.
        vcov: ``(p, p)`` ``sigma^2 (R_X'R_X)^{-1}``, lme4's ``vcov``.
        A: ``(k, k)`` ``2 H^+``, the asymptotic covariance of ``varpar`` (``k = n_theta + 1``): lmerTest's
            ``vcov_varpar``.
        jac: ``(k, p, p)`` ``d vcov / d varpar_i``: lmerTest's ``Jac_list``.
        hessian: ``(k, k)`` ``H``, the Hessian of the deviance in ``varpar``.
        sigma: the residual SD the derivatives were taken at.
    """

    beta: np.ndarray
    vcov: np.ndarray
    A: np.ndarray
    jac: np.ndarray
    hessian: np.ndarray
    sigma: float


class TTest(NamedTuple):
    """One contrast's t test (a row of lmerTest's ``contest1D``)."""

    estimate: float
    se: float
    df: float
    t: float
    p: float


class FTest(NamedTuple):
    """A multi-row contrast's F test (lmerTest's ``contestMD``)."""

    num_df: int
    den_df: float
    F: float
    p: float


# ----------------------------------------------------------------------------------------------------
# The criterion in plain JAX (differentiable to any order)


def _scale_columns(M, lams_rest, s: Structure):
    """``M B`` for ``M`` ``(m, P)`` and ``B = blockdiag(I_{J_k} kron Lambda_k (rest terms), I_p)``: each rest
    term's column block, read ``(m, J_k, p_k)`` (level-major as in :class:`~lmevi.exact.structure.Structure`), times
    ``Lambda_k``."""
    blocks = []
    for k, off, lam in zip(s.order[1:], s.rest_offsets, lams_rest):
        J, q = s.n_levels[k], s.n_coefs[k]
        blocks.append((M[:, off : off + J * q].reshape(M.shape[0], J, q) @ lam).reshape(M.shape[0], J * q))
    blocks.append(M[:, s.n_rest_random :])
    return jnp.concatenate(blocks, axis=1)


class _Pieces(NamedTuple):
    log_lz2: jax.Array  # log|L_Z|^2
    log_rx2: jax.Array  # log|R_X|^2
    pwrss: jax.Array  # r^2
    beta: jax.Array  # (p,)
    rx_inv: jax.Array  # (p, p) (R_X'R_X)^{-1}


def _pieces(theta, s: Structure) -> _Pieces:
    """lme4's blocked factorisation at ``theta`` (as :func:`lmevi.exact.criterion.profiled_deviance`, written with JAX's
    own rules only): term 1 eliminated level by level, the dense rest block ``S`` by its Cholesky factor
    ``L``, whose first ``Q`` rows hold the rest of ``L_Z`` and whose last ``p`` hold ``R_X'``."""
    S, rhs, logdet_d, quad1 = _sparse_parts(theta, s)
    P, Q = S.shape[0], s.n_rest_random
    L = jnp.linalg.cholesky(S)
    log_diag = jnp.log(jnp.diagonal(L))
    c = jax.scipy.linalg.solve_triangular(L, rhs, lower=True)
    x = jax.scipy.linalg.solve_triangular(L.T, c, lower=False)
    Lx_inv = jax.scipy.linalg.solve_triangular(L[Q:, Q:], jnp.eye(P - Q), lower=True)
    return _Pieces(
        log_lz2=logdet_d + 2.0 * jnp.sum(log_diag[:Q]),
        log_rx2=2.0 * jnp.sum(log_diag[Q:]),
        pwrss=s.yy - quad1 - c @ c,
        beta=x[Q:],
        rx_inv=Lx_inv.T @ Lx_inv,
    )


def deviance_varpar(varpar, s: Structure, reml: bool):
    """lmerTest's ``devfun_vp``: the deviance (``reml``: the REML criterion) at ``varpar = (theta, sigma)``
    ``(n_theta + 1,)``, not profiled over sigma. Equals :func:`lmevi.exact.criterion.profiled_deviance` where sigma is
    the estimate ``r / sqrt(n - p)`` (REML) or ``r / sqrt(n)`` (ML). Pure; run it with 64-bit JAX on."""
    theta, sigma = varpar[:-1], varpar[-1]
    f = _pieces(theta, s)
    log_2pi_s2 = jnp.log(2.0 * jnp.pi * sigma**2)
    dev = f.log_lz2 + f.pwrss / sigma**2 + s.n_obs * log_2pi_s2
    if reml:
        dev = dev + f.log_rx2 - s.n_fixed * log_2pi_s2
    return dev


def vcov_varpar(varpar, s: Structure):
    """lmerTest's ``get_covbeta``: ``(p, p)`` ``sigma^2 (R_X'R_X)^{-1}`` at ``varpar = (theta, sigma)``."""
    return varpar[-1] ** 2 * _pieces(varpar[:-1], s).rx_inv


def _sparse_parts(theta, s: Structure):
    """``(S (P, P), rhs (P,), sum_j log|D_j|, sum_j |c_1j|^2)``: everything of :func:`_pieces` before the dense
    block's factorisation; it costs ``O(n_pairs + P^2)``, so its second derivatives by forward mode are cheap."""
    lams = lambdas(theta, s.n_coefs)
    lam1 = lams[s.order[0]]
    lams_rest = [lams[k] for k in s.order[1:]]
    p1 = s.zy1.shape[1]
    P, Q = s.rr.shape[0], s.n_rest_random
    D = jnp.einsum("ba,jbc,cd->jad", lam1, s.zz1, lam1) + jnp.eye(p1)
    logdet_d = jnp.sum(jnp.linalg.slogdet(D)[1])
    W = lam1 @ jnp.linalg.inv(D) @ lam1.T
    K = jax.ops.segment_sum(W.reshape(-1)[s.pair_block] * s.pair_value, s.pair_target, num_segments=P * P)
    K = K.reshape(P, P)
    S = _scale_columns(_scale_columns(s.rr - K - K.T, lams_rest, s).T, lams_rest, s)
    S = S + jnp.diag(jnp.concatenate([jnp.ones(Q), jnp.zeros(P - Q)]))
    Wzy = jnp.einsum("jab,jb->ja", W, s.zy1)
    Gt = jax.ops.segment_sum(s.cross_value * Wzy[s.cross_level, s.cross_coef], s.cross_rest, num_segments=P)
    rhs = _scale_columns((s.ry - Gt)[None, :], lams_rest, s)[0]
    return S, rhs, logdet_d, jnp.sum(Wzy * s.zy1)


def _sparse_jacobians(theta, s: Structure):
    """Values and first derivatives in theta of :func:`_sparse_parts`: ``((S, rhs, logdet_d, quad1),
    (S1 (k, P, P), rhs1 (k, P), logdet_d1 (k,), quad1_1 (k,)))``, by forward-mode autodiff (``k`` tangents)."""
    f = lambda t: _sparse_parts(t, s)  # noqa: E731
    return f(theta), jax.tree_util.tree_map(lambda d: jnp.moveaxis(d, -1, 0), jax.jacfwd(f)(theta))


def _second_order_part(theta, s: Structure, C, c, w):
    """The scalar ``psi(theta) = log|D| + <C, S> + c'rhs + w quad1`` of :func:`_sparse_parts`' outputs with the
    weights ``C`` ``(P, P)`` (symmetric), ``c`` ``(P,)``, ``w`` held fixed: its Hessian is every term of the
    deviance's Hessian that holds a second derivative of the sparse part (see :func:`_dense_chain`).

    Written by the transposes of :func:`_sparse_parts`' maps, so that no ``(P, P)`` array depends on theta:
    ``S = B'(R - K - K')B + I_Q`` gives ``<C, S> = <M, R> - 2 <M, K>`` with ``M = B C B'`` (sym.), and
    ``<M, K>`` is a gather of ``M`` at the pairs' targets, weighted by ``W``; likewise ``c'rhs = (Bc)'(ry - Gt)``.
    Equal to the plain composition to rounding (the tests differentiate both)."""
    lams = lambdas(theta, s.n_coefs)
    lam1 = lams[s.order[0]]
    lams_t = [lams[k].T for k in s.order[1:]]
    p1 = s.zy1.shape[1]
    D = jnp.einsum("ba,jbc,cd->jad", lam1, s.zz1, lam1) + jnp.eye(p1)
    logdet_d = jnp.sum(jnp.linalg.slogdet(D)[1])
    W = lam1 @ jnp.linalg.inv(D) @ lam1.T
    M = _scale_columns(_scale_columns(C, lams_t, s).T, lams_t, s)  # B C B'
    MK = jnp.sum(M.reshape(-1)[s.pair_target] * s.pair_value * W.reshape(-1)[s.pair_block])
    Wzy = jnp.einsum("jab,jb->ja", W, s.zy1)
    Bc = _scale_columns(c[None, :], lams_t, s)[0]
    BcGt = jnp.sum(s.cross_value * Wzy[s.cross_level, s.cross_coef] * Bc[s.cross_rest])
    quad1 = jnp.sum(Wzy * s.zy1)
    return logdet_d + jnp.sum(M * s.rr) - 2.0 * MK + Bc @ s.ry - BcGt + w * quad1


# Kept as executables between processes (lmevi.runtime.jit): the first Satterthwaite table of a new process
# loads them instead of compiling (the structure's sizes key them, theta's size too)
_sparse_jacobians_jit = sized_jit(_sparse_jacobians, sized=False, name="lmevi.result.satterthwaite.jacobians")
_second_order_hessian = sized_jit(jax.hessian(_second_order_part), sized=False,
                                  name="lmevi.result.satterthwaite.second_order_hessian")


class _Second(NamedTuple):
    """A scalar function of theta with its gradient ``(k,)`` and the part of its Hessian ``(k, k)`` made of first
    derivatives (the rest comes from :func:`_second_order_part`)."""

    value: float
    grad: np.ndarray
    hess: np.ndarray


class _Dense(NamedTuple):
    """What :func:`_dense_chain` gives: the three scalar functions of the dense block, ``beta`` ``(p,)``,
    ``V_pp`` ``(p, p)``, ``dV_pp`` ``(k, p, p)`` and the weights ``(C (P, P), c (P,))`` of the second-order part."""

    logdet: _Second
    logdet_pp: _Second
    quad: _Second
    beta: np.ndarray
    Vpp: np.ndarray
    dV: np.ndarray
    V: np.ndarray
    x: np.ndarray
    Y_Vi_Yt: np.ndarray


def _dense_chain(S, S1, b, b1, Q: int) -> _Dense:
    """Chain rule through the dense block on the host's LAPACK: ``log|S|``, ``log|V_pp|``, ``b'S^{-1}b`` and
    ``V_pp`` (``V = S^{-1}``) with their theta derivatives, from ``S``'s and ``b``'s first derivatives
    (``S1`` ``(k, P, P)``, ``b1`` ``(k, P)``). Matrix calculus, exact: ``dV = -V dS V``,
    ``d log|S| = tr(V dS)``, ``d^2 log|S| = tr(V S_ij) - tr(V S_i V S_j)``. Each second derivative is a part
    in first derivatives (here) plus a fixed linear functional of the second derivatives ``S_ij``, ``b_ij``
    (``tr(V S_ij)``, ``x'S_ij x``, ``2 b_ij'x``, ``Y'S_ij Y``), which :func:`varpar_derivatives` gets at once as the
    Hessian of one scalar (:func:`_second_order_part`): no ``(P, P, k, k)`` array is ever formed."""
    k = S1.shape[0]
    c = scipy.linalg.cho_factor(S, lower=True)
    V = scipy.linalg.cho_solve(c, np.eye(S.shape[0]))
    V = 0.5 * (V + V.T)
    VS = np.stack([V @ S1[i] for i in range(k)])  # (k, P, P)
    logdet = _Second(
        2.0 * float(np.sum(np.log(np.diag(c[0])))),
        np.einsum("iaa->i", VS),
        -np.einsum("iab,jba->ij", VS, VS),
    )
    x = V @ b
    xj = np.stack([V @ (b1[j] - S1[j] @ x) for j in range(k)], axis=1)  # (P, k) dx/dtheta_j
    S1x = np.stack([S1[i] @ x for i in range(k)], axis=1)  # (P, k)
    quad = _Second(float(b @ x), 2.0 * b1 @ x - x @ S1x, 2.0 * b1 @ xj - 2.0 * S1x.T @ xj)
    quad = quad._replace(hess=0.5 * (quad.hess + quad.hess.T))
    # V_pp = Y'(.)Y with Y = V[:, Q:]: dV_pp = -Y'S_i Y, d2 V_pp = Y'(S_i V S_j + S_j V S_i - S_ij)Y
    Y = V[:, Q:]
    SY = np.stack([S1[i] @ Y for i in range(k)])  # (k, P, p)
    Vpp = V[Q:, Q:]
    dV = -np.einsum("ac,iad->icd", Y, SY)
    cross = np.einsum("iac,ab,jbd->ijcd", SY, V, SY, optimize=True)
    d2V = cross + np.swapaxes(cross, 0, 1)
    Vi = np.linalg.inv(Vpp)
    ViD = np.einsum("ab,ibc->iac", Vi, dV)
    logdet_pp = _Second(
        float(np.linalg.slogdet(Vpp)[1]),
        np.einsum("iaa->i", ViD),
        np.einsum("ab,ijba->ij", Vi, d2V) - np.einsum("iab,jba->ij", ViD, ViD),
    )
    return _Dense(logdet, logdet_pp, quad, x[Q:], Vpp, dV, V, x, Y @ Vi @ Y.T)


@x64
def varpar_derivatives(
    design: Design | None, theta, sigma: float, reml: bool = True, structure: Structure | None = None
) -> VarparDerivatives:
    """Hessian of the deviance and Jacobian of ``vcov(beta)`` in ``varpar = (theta, sigma)`` at the optimum,
    exactly: computed once per fit, shared by every contrast.

    The sparse part of the criterion (theta to the dense block ``S`` and its right-hand side, as
    :func:`lmevi.exact.criterion.profiled_deviance` builds them) is differentiated once by JAX's forward mode; the
    dense block's factorisation by the matrix-calculus chain rule on the host's LAPACK (:func:`_dense_chain`;
    XLA's CPU Cholesky and its derivatives were ten times slower on InstEval's 1,144 x 1,144 block). The second
    derivatives of the sparse part enter the Hessian only through fixed linear functionals, which are one
    scalar's ``(k, k)`` Hessian (:func:`_second_order_part`), never the ``(P, P, k, k)`` second derivative of
    ``S``. sigma enters in closed form. :func:`deviance_varpar` and :func:`vcov_varpar` are the same functions
    in plain JAX, differentiable end to end (the tests compare both). Both compiled programs are kept on disk
    between processes (:func:`lmevi.runtime.jit.sized_jit`).

    Args:
        design: the model's arrays in data units (ignored when ``structure`` is given).
        theta: ``(n_theta,)`` the (RE)ML estimate, design order (:attr:`lmevi.exact.optimise.ExactFit.theta`).
        sigma: the residual SD estimate of the same fit.
        reml: whether the fit maximised the REML criterion (the deviance differentiated is the fit's own).
        structure: :func:`lmevi.exact.structure.build_structure` of ``design``, if already built (saves its cost).

    Returns:
        A :class:`VarparDerivatives`; ``A`` is ``2 H^+`` over the eigenvalues of ``H`` above
        :data:`HESSIAN_TOL`, as lmerTest does (which warns about the others; here they are only left out).
    """
    s = build_structure(design, reml) if structure is None else structure
    theta = jnp.asarray(theta, jnp.float64).reshape(-1)
    s_dev = jax.device_put(s)
    vals, d1 = jax.tree_util.tree_map(np.asarray, _sparse_jacobians_jit(theta, s_dev))
    dense = _dense_chain(vals[0], d1[0], vals[1], d1[1], s.n_rest_random)
    sig = float(sigma)
    sign = 0.0 if reml else 1.0  # the REML criterion adds log|R_X|^2 back
    # the second-order parts of a_hess + pw.hess / sigma^2 (below): tr(V S_ij) - sign <Y V_pp^-1 Y', S_ij> from
    # the log-determinants, (x'S_ij x - 2 b_ij'x - quad1_ij) / sigma^2 from pwrss
    C = dense.V - sign * dense.Y_Vi_Yt + np.outer(dense.x, dense.x) / sig**2
    second = np.asarray(_second_order_hessian(theta, s_dev, jnp.asarray(C), jnp.asarray(-2.0 * dense.x / sig**2),
                                              jnp.asarray(-1.0 / sig**2)))
    logdet_s, logdet_pp, quad = dense.logdet, dense.logdet_pp, dense.quad
    # pwrss = y'y - quad1 - b'S^{-1}b; log|L_Z|^2 = log|D| + log|S| - log|R_X|^2, log|R_X|^2 = -log|V_pp|
    pw = _Second(float(s.yy) - float(vals[3]) - quad.value, -d1[3] - quad.grad, -quad.hess)
    a_hess = logdet_s.hess + sign * logdet_pp.hess
    dof = s.n_obs - (s.n_fixed if reml else 0)
    k = theta.shape[0]
    H = np.empty((k + 1, k + 1))
    H[:k, :k] = a_hess + pw.hess / sig**2 + second
    H[:k, k] = H[k, :k] = -2.0 * pw.grad / sig**3
    H[k, k] = 6.0 * pw.value / sig**4 - 2.0 * dof / sig**2
    jac = np.concatenate([sig**2 * dense.dV, (2.0 * sig * dense.Vpp)[None]], axis=0)
    H = 0.5 * (H + H.T)
    values, vectors = np.linalg.eigh(H)
    pos = values > HESSIAN_TOL
    A = 2.0 * (vectors[:, pos] / values[pos]) @ vectors[:, pos].T
    return VarparDerivatives(beta=dense.beta, vcov=sig**2 * dense.Vpp, A=A, jac=jac, hessian=H, sigma=sig)


def autodiff_derivatives(varpar, structure: Structure, reml: bool):
    """``(H (k, k), jac (k, p, p))`` of :func:`deviance_varpar` and :func:`vcov_varpar` by JAX's autodiff end to
    end (``jax.hessian``, ``jax.jacfwd``): the reference for :func:`varpar_derivatives` (slow on large dense
    blocks on the CPU)."""
    with jax.enable_x64(True):
        varpar = jnp.asarray(varpar, jnp.float64)
        s = jax.device_put(structure)
        H = jax.hessian(deviance_varpar)(varpar, s, reml)
        jac = jax.jacfwd(vcov_varpar)(varpar, s)
        return np.asarray(H), np.moveaxis(np.asarray(jac), -1, 0)


# ----------------------------------------------------------------------------------------------------
# Contrasts


def _qform(l, M) -> float:
    return float(l @ M @ l)


def satterthwaite_1d(L, deriv: VarparDerivatives) -> TTest:
    """t test of ``l' beta = 0`` with Satterthwaite's df (lmerTest's ``contest1D``).

    Args:
        L: ``(p,)`` contrast.
        deriv: :func:`varpar_derivatives` of the fit.

    Returns:
        ``TTest(estimate, se, df, t, p)``: ``df = 2 (l'Vl)^2 / (g'Ag)``, ``g_i = l' Jac_i l``, two-sided ``p``.
    """
    l = np.asarray(L, np.float64).reshape(-1)
    estimate = float(l @ deriv.beta)
    var = _qform(l, deriv.vcov)
    g = np.einsum("a,kab,b->k", l, deriv.jac, l)
    df = 2.0 * var**2 / _qform(g, deriv.A)
    t = estimate / np.sqrt(var)
    return TTest(estimate, float(np.sqrt(var)), float(df), float(t), float(2.0 * stats.t.sf(abs(t), df)))


def satterthwaite_table(deriv: VarparDerivatives) -> list[TTest]:
    """One :class:`TTest` per fixed effect (the coefficient table of lmerTest's ``summary``)."""
    p = deriv.beta.shape[0]
    return [satterthwaite_1d(np.eye(p)[i], deriv) for i in range(p)]


def pooled_ddf(nu, tol: float = 1e-8) -> float:
    """lmerTest's ``get_Fstat_ddf``: the df of the mean of ``q`` squared independent t statistics with dfs
    ``nu``: ``2E / (E - q)``, ``E = sum nu / (nu - 2)``; 2 if any ``nu <= 2``; the mean where all ``nu`` agree to
    ``tol`` (the formula is biased downwards there)."""
    nu = np.asarray(nu, np.float64)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(np.mean(nu))
    if np.any(nu <= 2):
        return 2.0
    E = float(np.sum(nu / (nu - 2.0)))
    return 2.0 * E / (E - nu.size)


def satterthwaite_md(L, deriv: VarparDerivatives, eps: float = float(np.sqrt(np.finfo(float).eps))) -> FTest:
    """F test of ``L beta = 0`` with Satterthwaite's denominator df (lmerTest's ``contestMD``).

    ``L V L' = P diag(d) P'``; the rank ``q`` counts the eigenvalues above ``eps`` times the largest; the rows
    of ``P_q'L`` give ``q`` independent t statistics, ``F = sum_m (P_m'L beta)^2 / d_m / q``, and their dfs
    ``nu_m = 2 d_m^2 / (g_m' A g_m)`` are pooled by :func:`pooled_ddf`.

    Args:
        L: ``(r, p)`` contrast matrix (``r >= 1``; rank-deficient rows allowed).
        deriv: :func:`varpar_derivatives` of the fit.
        eps: relative tolerance on the eigenvalues of ``L V L'`` (lmerTest's default).

    Returns:
        ``FTest(num_df, den_df, F, p)``.
    """
    L = np.atleast_2d(np.asarray(L, np.float64))
    if L.shape[0] == 1:
        r = satterthwaite_1d(L[0], deriv)
        return FTest(1, r.df, r.t**2, float(stats.f.sf(r.t**2, 1, r.df)))
    d, P = np.linalg.eigh(L @ deriv.vcov @ L.T)
    d, P = d[::-1], P[:, ::-1]  # decreasing, as R's eigen
    q = int(np.sum(d > max(eps * d[0], 0.0)))
    PtL = P[:, :q].T @ L
    if q == 1:
        r = satterthwaite_1d(PtL[0], deriv)
        return FTest(1, r.df, r.t**2, float(stats.f.sf(r.t**2, 1, r.df)))
    F = float(np.sum((PtL @ deriv.beta) ** 2 / d[:q]) / q)
    g = np.einsum("ma,kab,mb->mk", PtL, deriv.jac, PtL)
    nu = 2.0 * d[:q] ** 2 / np.einsum("mk,kl,ml->m", g, deriv.A, g)
    den = pooled_ddf(nu)
    return FTest(q, den, F, float(stats.f.sf(F, q, den)))
