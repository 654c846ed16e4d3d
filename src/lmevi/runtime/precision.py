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


# In a float32 fit the sums over rows below are fused reductions accumulated in float64: XLA's CPU dot product
# would first copy its operands as float64 arrays (at 1e7 rows and p = 2: 250 MB of temporaries, 171 ms), where
# the fused reduction needs none (70 ms). In a float64 fit the dot product is the faster (17 ms against 57 ms)
# and needs no copy.


def row_dot(r: jax.Array, M: jax.Array, dtype=None) -> jax.Array:
    """``r @ M`` ``(p,)`` for ``r`` ``(n,)`` and ``M`` ``(n, p)``, accumulated in float64 and returned in
    ``dtype`` (default: ``r``'s).

    In float32 each product ``r_i M_ic`` is rounded to float32 before it is widened: widening ``M`` itself, a
    fit's loop-invariant design, made XLA hoist the widened copy out of the loop (an ``(n, p)`` float64 array
    for the whole fit: 168 MB at 1e7 rows), and the rounding adds an error of the order of the one ``r``, a
    float32 residual, carries already."""
    if r.dtype == jnp.float32 or M.dtype == jnp.float32:
        return jnp.sum(wide(r[:, None] * M), axis=0).astype(r.dtype if dtype is None else dtype)
    return r @ M if dtype is None else (r @ M).astype(dtype)


def row_gram(M: jax.Array) -> jax.Array:
    """``M^T M`` ``(p, p)`` for ``M`` ``(n, p)``, accumulated in float64 and returned in ``M``'s dtype."""
    if M.dtype == jnp.float32:
        W = wide(M)
        return jnp.sum(W[:, :, None] * W[:, None, :], axis=0).astype(M.dtype)
    return M.T @ M


def level_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[index]`` ``(n, ...)`` for ``table`` ``(J, ...)`` and level codes ``index`` ``(n,)`` in ``[0, J)``.

    One gather that takes the codes as they are: ``table[index]`` first maps negative codes to ``J + code`` with
    a select over the rows, which XLA hoists out of a fit's loop as a row-length array per term (three
    ``(n,)`` int32 temporaries at 1e7 rows in InstEval's loop, 126 MB)."""
    rest = table.shape[1:]
    dims = jax.lax.GatherDimensionNumbers(offset_dims=tuple(range(1, 1 + len(rest))), collapsed_slice_dims=(0,),
                                          start_index_map=(0,))
    return jax.lax.gather(table, index[:, None], dims, slice_sizes=(1, *rest),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def row_segment_sum(data: jax.Array, index: jax.Array, n: int, dtype=None) -> jax.Array:
    """``jax.ops.segment_sum(data, index, n)`` accumulated in float64, returned in ``dtype`` (default:
    ``data``'s)."""
    return jax.ops.segment_sum(wide(data), index, n).astype(data.dtype if dtype is None else dtype)


def to_host(tree):
    """A pytree of JAX arrays as NumPy arrays (``None`` leaves stay ``None``)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def host_array(a, dtype) -> np.ndarray:
    """``a`` as a C-ordered NumPy array of ``dtype`` (a NumPy or JAX dtype): reductions over a Fortran-ordered
    copy would sum in another order and differ in the last bits."""
    return np.ascontiguousarray(a, dtype=np.dtype(dtype))


# XLA's CPU client takes a host array as the device's buffer without copying it when the array is aligned to
# this many bytes and already has the device dtype; NumPy's large arrays start 16 bytes into a page, so
# ``jax.device_put`` copied every row array of a design (at 1e7 rows: 0.5 GB of fresh memory and 0.2-0.3 s).
DEVICE_ALIGNMENT = 64


def aligned_zeros(shape, dtype) -> np.ndarray:
    """``np.zeros(shape, dtype)`` whose data start on a :data:`DEVICE_ALIGNMENT`-byte boundary, so that
    ``jax.device_put`` on the CPU shares its memory instead of copying it (the device array then keeps the
    host array alive; neither may be written afterwards)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + DEVICE_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % DEVICE_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class RowBuffers:
    """The row arrays of one model, made once with their padding rows, so that standardising writes in place.

    The design stage (:func:`lmevi.frame.design.build_design`) asks for its fixed-effects matrix, covariates and
    level codes here: each is the first ``n`` rows of an :func:`aligned_zeros` array of ``n_rows`` rows.
    Standardising (:func:`lmevi.fitting.scaling.standardise`) then finds the whole array of such a head through
    :meth:`whole` and divides it in place instead of copying it into a fresh padded array (at 1e7 rows each
    copy is fresh memory, whose page faults were most of the design stage), and ``jax.device_put`` shares it.
    Only arrays made here are ever written in place: any other array (the user's, or one the design stage
    copied or sliced) is not found by :meth:`whole`. One instance serves one model and is then dropped.
    """

    def __init__(self, n_rows_of):
        """``n_rows_of(n) -> n_rows``: the padded row count for ``n`` rows (called once, by :meth:`n_rows`)."""
        self._n_rows_of = n_rows_of
        self._n_rows: int | None = None
        self._made: list[tuple[np.ndarray, np.ndarray]] = []  # (head, whole)
        self._taken: list[np.ndarray] = []  # wholes written in place (take)

    def n_rows(self, n: int) -> int:
        """The padded row count of ``n`` rows (the first call decides it: every array has the same rows)."""
        if self._n_rows is None:
            self._n_rows = int(self._n_rows_of(int(n)))
        return self._n_rows

    def zeros(self, n: int, tail: tuple[int, ...], dtype) -> np.ndarray:
        """``(n, *tail)`` zeros: the head of an aligned ``(n_rows, *tail)`` array of ``dtype``."""
        whole = aligned_zeros((self.n_rows(n),) + tuple(tail), dtype)
        head = whole[:n]
        self._made.append((head, whole))
        return head

    def whole(self, a) -> np.ndarray | None:
        """The whole padded array whose head ``a`` is (the very object :meth:`zeros` returned), else ``None``."""
        return next((whole for head, whole in self._made if head is a), None)

    def take(self, a) -> np.ndarray | None:
        """:meth:`whole`, to be written in place: each array can be taken once (a second take raises, since its
        head no longer holds the numbers it was made with)."""
        whole = self.whole(a)
        if whole is not None:
            if any(w is whole for w in self._taken):
                raise RuntimeError("a row buffer was standardised in place twice")
            self._taken.append(whole)
        return whole


def on_device(a, dtype) -> jax.Array:
    """``a`` as a JAX array of ``dtype``, converted on the host and copied with ``jax.device_put``:
    ``jnp.asarray`` and conversions on the device compile a small program for every new shape, which data of
    a new size would pay."""
    return jax.device_put(np.asarray(a, dtype=np.dtype(dtype)))
