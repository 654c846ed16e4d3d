"""Estimates at a given theta (lme4's ``mkMerMod`` quantities): conditional modes, beta, sigma and their
covariances, from the blocked factorisation of :mod:`lmevi.exact.criterion`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from lmevi.exact.criterion import JAX_OPS, _Ops, _chol_inverse, _chol_logdet, _congruence, _criterion, _factor, _rest_times, _rest_weights, _small_spd_inverse
from lmevi.exact.structure import Structure
from lmevi.runtime.jit import sized_jit



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


_conditional = sized_jit(conditional_estimates, sized=False, static_argnames=("reml", "marginal"))


class _Evaluator(NamedTuple):
    """The criterion on one backend, as functions of a NumPy ``(n_theta,)`` theta."""

    value: object  # theta -> float
    value_and_grad: object  # theta -> (float, (n_theta,) gradient)
    conditional: object  # theta -> Conditional of NumPy arrays
