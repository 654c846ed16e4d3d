"""64-bit arithmetic scoped to lmevi's own computations.

lmevi fits in float64 by default, as lme4 does, but never switches JAX's 64-bit mode on for the rest of
the process: each public entry point (``fit``, the accessors of a fitted model, the exports) runs inside
``jax.enable_x64(True)``, and what a fit hands back holds NumPy arrays, which keep their precision
whatever JAX's mode outside. ``dtype="float32"`` fits create float32 arrays inside the same scope.

Sums over rows accumulate in float64 also in a float32 fit (:func:`wide`, :func:`row_dot`, :func:`row_gram`):
XLA's CPU dot product and segment sum add float32 terms one after another, and over 10^7 rows of residuals,
whose terms cancel, ``X^T r`` came out 0.5 % off and the fit diverged at its first sweep. Sums over levels and
``jnp.sum`` (a tree reduction) keep the fit's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def x64(fn):
    """Run ``fn`` with JAX's 64-bit types available, restoring the caller's setting afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapper


def wide(x: jax.Array) -> jax.Array:
    """``x`` as float64 if it is float32 (the accumulation type of sums over rows), else ``x`` itself."""
    return x.astype(jnp.float64) if x.dtype == jnp.float32 else x


def row_dot(r: jax.Array, M: jax.Array) -> jax.Array:
    """``r @ M`` ``(p,)`` for ``r`` ``(n,)`` and ``M`` ``(n, p)``, accumulated in float64 and returned in
    ``r``'s dtype."""
    return (wide(r) @ wide(M)).astype(r.dtype)


def row_gram(M: jax.Array) -> jax.Array:
    """``M^T M`` ``(p, p)`` for ``M`` ``(n, p)``, accumulated in float64 and returned in ``M``'s dtype."""
    W = wide(M)
    return (W.T @ W).astype(M.dtype)


def row_segment_sum(data: jax.Array, index: jax.Array, n: int) -> jax.Array:
    """``jax.ops.segment_sum(data, index, n)`` accumulated in float64, returned in ``data``'s dtype."""
    return jax.ops.segment_sum(wide(data), index, n).astype(data.dtype)


def to_host(tree):
    """A pytree of JAX arrays as NumPy arrays (``None`` leaves stay ``None``)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def host_array(a, dtype) -> np.ndarray:
    """``a`` as a C-ordered NumPy array of ``dtype`` (a NumPy or JAX dtype): reductions over a Fortran-ordered
    copy would sum in another order and differ in the last bits."""
    return np.ascontiguousarray(a, dtype=np.dtype(dtype))


def on_device(a, dtype) -> jax.Array:
    """``a`` as a JAX array of ``dtype``, converted on the host and copied with ``jax.device_put``:
    ``jnp.asarray`` and conversions on the device compile a small program for every new shape, which data of
    a new size would pay."""
    return jax.device_put(np.asarray(a, dtype=np.dtype(dtype)))
