"""Gauss-Hermite quadrature for expectations under a Gaussian: ``E[f(eta)]``, ``eta ~ N(m, v)``.

``E f = sum_k w_k f(m + sqrt(2 v) x_k) / sqrt(pi)``. For the softplus the rule's error grows with v (against
300 nodes, at |m| <= 3): with 48 nodes under 1e-15 at v = 1, 4e-10 at v = 4, 3e-7 at v = 9; with 32 nodes
3e-8 at v = 4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

GH_NODES = 48


@functools.cache
def _hermgauss(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights (made at first use: ``numpy.polynomial`` is not needed to import lmevi)."""
    from numpy.polynomial.hermite import hermgauss

    return hermgauss(nodes)


def gauss_hermite(f, mean: jax.Array, var: jax.Array, nodes: int = GH_NODES) -> jax.Array:
    """``E[f(eta)]`` for ``eta ~ N(mean, var)`` elementwise; ``mean``, ``var`` ``(n,)`` -> ``(n,)``. ``f`` maps
    ``(n, nodes)`` points to ``(n, nodes)`` values (row ``i`` may use row ``i``'s data by broadcasting)."""
    x, w = _hermgauss(nodes)
    x = jnp.asarray(x, mean.dtype)
    w = jnp.asarray(w / np.sqrt(np.pi), mean.dtype)
    points = mean[:, None] + jnp.sqrt(2.0 * var)[:, None] * x[None, :]
    return f(points) @ w
