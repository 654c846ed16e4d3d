r"""Adaptive Gauss-Hermite quadrature of glmer's likelihood (``nAGQ > 1``) for one scalar random-effects term.

With one scalar term the levels' integrals factor: ``L = prod_j int p(y_j | u_j) phi(u_j) du_j``. Each is taken on
``n`` nodes ``u_j = u*_j + s_j z_k`` centred at the conditional mode ``u*_j`` and scaled by the conditional SD
``s_j = 1 / L_jj`` (lme4's ``glmerAGQ``; Pinheiro & Bates 1995):

    -2 log L_j ~= d_j(u*_j) - 2 log s_j - 2 log sum_k w_k exp(-(d_j(u_jk) - d_j(u*_j)) / 2 + z_k^2 / 2),

with ``d_j(u) = -2 sum_{i in j} log p(y_i | u) + u^2`` and ``(z_k, w_k)`` the Gauss-Hermite rule for the standard
normal (weights summing to 1). One node is the Laplace approximation.

Where we differ from lme4: lme4's ``nAGQ > 1`` criterion sums deviance residuals, i.e. leaves out the saturated
log-likelihood (its ``logLik`` is then on another scale than its Laplace fit's); ours keeps every constant of the
log-density, as the Laplace criterion does, so it is lme4's ``logLik`` plus the saturated log-likelihood.
"""

from __future__ import annotations

import numpy as np

from lmevi.exact.pirls import GlmmData, pirls, response, zlambda


def standard_normal_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(z (n,), w (n,))``: Gauss-Hermite nodes and weights for ``E f(Z)``, ``Z ~ N(0, 1)`` (weights sum to 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / np.sum(w)


def agq_objective(data: GlmmData, theta, beta, nagq: int, u0=None) -> tuple[float, object]:
    """``(-2 log L, mode)`` by adaptive Gauss-Hermite quadrature on ``nagq`` nodes, at ``(theta, beta)``.

    Raises:
        ValueError: unless the model has exactly one random term with one coefficient.
    """
    if len(data.n_levels) != 1 or data.n_coefs[0] != 1:
        raise ValueError("adaptive Gauss-Hermite quadrature (nagq > 1) needs a single scalar random-effects "
                         "term, as lme4's nAGQ > 1; use nagq=1 (Laplace)")
    mode = pirls(data, theta, beta, u0)
    zl = zlambda(data, theta)[0]
    g = data.index[0]
    J = data.n_levels[0]
    sd = 1.0 / mode.factor.l11[:, 0, 0]
    fixed = data.offset + data.X @ mode.beta

    def level_dev(u):
        logp = response(data, fixed + zl @ u)[0]
        return -2.0 * np.bincount(g, weights=logp, minlength=J) + u**2

    dev0 = level_dev(mode.u)
    z, w = standard_normal_rule(nagq)
    mult = np.zeros(J)
    for zk, wk in zip(z, w):
        if zk == 0.0:
            mult += wk
        else:
            mult += wk * np.exp(-(level_dev(mode.u + zk * sd) - dev0) / 2.0 + zk**2 / 2.0)
    return float(np.sum(dev0) - 2.0 * np.sum(np.log(sd)) - 2.0 * np.sum(np.log(mult))), mode
