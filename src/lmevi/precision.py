"""64-bit arithmetic scoped to lmevi's own computations.

lmevi fits in float64 by default, as lme4 does, but never switches JAX's 64-bit mode on for the rest of
the process: each public entry point (``fit``, the accessors of a fitted model, the exports) runs inside
``jax.enable_x64(True)``, and what a fit hands back holds NumPy arrays, which keep their precision
whatever JAX's mode outside. ``dtype="float32"`` fits create float32 arrays inside the same scope.
"""

from __future__ import annotations

import functools

import jax
import numpy as np


def x64(fn):
    """Run ``fn`` with JAX's 64-bit types available, restoring the caller's setting afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapper


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
