"""Host-side reductions across the processes of a multi-process fit (``lmevi.fit(..., distributed=True)``).

In a multi-process fit every process holds its own rows (read, for example, from its own Parquet files) and
builds its part of the design. Whatever the design stage derives from the rows as a whole -- the levels of
each grouping factor and their counts, the number of rows, the cross-products that find aliased columns,
the scales of the standardised units, the nesting shares that choose q's blocks -- is computed from small
per-process summaries combined here, so that every process ends with the same model as one process
holding all rows would build. The rows themselves never move: the fit runs on a row-sharded global array
and XLA reduces per-level statistics across processes (segment sums, then all-reduces).

Two implementations of one small interface: :data:`LOCAL` (one process: every reduction is the identity)
and :class:`Processes` (JAX's multi-controller runtime, ``jax.distributed.initialize``; the summaries are
exchanged with ``jax.experimental.multihost_utils.process_allgather`` and combined in process order, so
that every process computes bitwise the same numbers).
"""

from __future__ import annotations

import pickle

import numpy as np


class Local:
    """One process: the rows here are all the rows."""

    distributed = False
    process_count = 1
    process_index = 0

    def sum(self, a) -> np.ndarray:
        """Elementwise sum over processes of ``a`` (same shape in every process)."""
        return np.asarray(a)

    def min(self, a) -> np.ndarray:
        return np.asarray(a)

    def max(self, a) -> np.ndarray:
        return np.asarray(a)

    def gather(self, obj) -> list:
        """Every process's ``obj`` (any picklable value), in process order."""
        return [obj]


LOCAL = Local()


class Processes(Local):
    """The processes of ``jax.distributed``: each call is a collective that every process must make, in the
    same order (as each process runs the same program on its own rows, it does)."""

    distributed = True

    def __init__(self):
        import jax

        self.process_count = jax.process_count()
        self.process_index = jax.process_index()

    def _stacked(self, a) -> np.ndarray:
        from jax.experimental import multihost_utils

        a = np.asarray(a)
        return np.asarray(multihost_utils.process_allgather(a, tiled=False)).reshape((self.process_count,) + a.shape)

    def sum(self, a) -> np.ndarray:
        out = np.zeros_like(np.asarray(a))
        for part in self._stacked(a):  # in process order: the same rounding everywhere
            out = out + part
        return out

    def min(self, a) -> np.ndarray:
        return self._stacked(a).min(axis=0)

    def max(self, a) -> np.ndarray:
        return self._stacked(a).max(axis=0)

    def gather(self, obj) -> list:
        payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        sizes = self._stacked(np.asarray([payload.size], dtype=np.int64))[:, 0]
        padded = np.zeros(int(sizes.max()), dtype=np.uint8)
        padded[: payload.size] = payload
        parts = self._stacked(padded)
        return [pickle.loads(part[: int(size)].tobytes()) for part, size in zip(parts, sizes)]


def processes() -> Processes:
    """The collective of this process's ``jax.distributed`` job.

    Raises:
        RuntimeError: when ``jax.distributed.initialize`` has not run (one process): nothing to combine.
    """
    import jax

    if jax.process_count() < 2:
        raise RuntimeError(
            "distributed=True fits rows held by several processes: call jax.distributed.initialize("
            "coordinator_address, num_processes, process_id) in every process first (this process sees "
            f"{jax.process_count()} process)"
        )
    return Processes()
