"""lme4's ``theta``: the relative covariance factors' lower triangles, column by column, term by term, and the
``Lambda_k`` they make.
"""

from __future__ import annotations

import itertools


import jax.numpy as jnp
import numpy as np



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


def _lambdas_numpy(theta: np.ndarray, n_coefs: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    out, pos = [], 0
    for q in n_coefs:
        rows, cols = _tril_columnwise(q)
        lam = np.zeros((q, q))
        lam[rows, cols] = theta[pos : pos + len(rows)]
        out.append(lam)
        pos += len(rows)
    return tuple(out)


def lme4_term_order(n_levels) -> tuple[int, ...]:
    """lme4's order of the random terms (``mkReTrms``): by decreasing number of levels when the formula's order
    is not already non-increasing (``rev(order(nl))``: ties in reverse formula order), else the formula's."""
    n_levels = list(n_levels)
    if not any(b > a for a, b in itertools.pairwise(n_levels)):
        return tuple(range(len(n_levels)))
    # reversed, not sorted(reverse=True): R's rev(order(nl)) puts ties in reverse formula order
    return tuple(reversed(sorted(range(len(n_levels)), key=lambda k: n_levels[k])))  # noqa: C413


def lme4_theta_order(n_levels, n_coefs) -> np.ndarray:
    """``(n_theta,)`` indices that put a theta in design order into lme4's order (``getME(m, "theta")``):
    ``theta_lme4 = theta[idx]``; each term's block keeps its column-by-column order."""
    offsets = np.cumsum([0] + [q * (q + 1) // 2 for q in n_coefs])
    return np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in lme4_term_order(n_levels)]
                          + [np.zeros(0, int)]).astype(int)
