"""The criterion on one array backend (NumPy, JAX or the hybrid path) as plain functions of a NumPy theta,
what the optimisers of :mod:`lmevi.exact.optimise` call.
"""

from __future__ import annotations


import jax
import numpy as np

from lmevi.exact.criterion import NUMPY_OPS, profiled_deviance
from lmevi.exact.estimates import conditional_estimates
from lmevi.exact.hostlapack import _host_lapack, _hybrid_evaluator
from lmevi.exact.structure import Structure
from lmevi.exact.criterion import _value, _value_and_grad
from lmevi.exact.estimates import _Evaluator, _conditional





# Dense blocks up to this size are fitted in NumPy: an evaluation there takes well under a millisecond,
# where compiling the JAX criterion for a new shape takes 1-2 s (experiments/families.py measures both).
NUMPY_MAX = 128


BACKENDS = ("jax", "numpy", "hybrid")


# Central differences for the NumPy path's final gradient (the convergence check): a step of about
# eps^(1/3) (relative to theta, at least absolute) balances truncation (step^2) against rounding (eps / step),
# about 1e-10 relative to the criterion.
_FD_STEP = 6e-6





def _evaluator(s: Structure, reml: bool, backend: str) -> _Evaluator:
    if backend == "numpy":

        def value(th):
            return float(profiled_deviance(th, s, reml, NUMPY_OPS))

        def value_and_grad(th):
            steps = _FD_STEP * np.maximum(np.abs(th), 1.0)
            grad = [(value(th + h * e) - value(th - h * e)) / (2.0 * h) for h, e in zip(steps, np.eye(len(th)))]
            return value(th), np.asarray(grad)

        return _Evaluator(value, value_and_grad, lambda th: conditional_estimates(th, s, reml, ops=NUMPY_OPS))
    sj = jax.device_put(s)

    def put(th):  # a host copy to the device compiles nothing (jnp.asarray does)
        return jax.device_put(np.asarray(th, np.float64))

    if backend == "hybrid":
        lapack = _host_lapack()
        if lapack is None:
            raise ValueError("backend='hybrid' needs SciPy's LAPACK module (scipy.linalg._flapack)")
        return _hybrid_evaluator(s, sj, reml, put, lapack)

    def value_and_grad(th):
        value, grad = _value_and_grad(put(th), sj, reml=reml)
        return float(value), np.asarray(grad, np.float64)

    return _Evaluator(lambda th: float(_value(put(th), sj, reml=reml)), value_and_grad,
                      lambda th: jax.tree.map(np.asarray, _conditional(put(th), sj, reml=reml)))


def _large_backend() -> str:
    """The backend of a dense block above :data:`NUMPY_MAX`: ``"hybrid"`` where JAX runs on the CPU (the host's
    LAPACK is then the same machine's, and faster for the block), ``"jax"`` on an accelerator."""
    return "hybrid" if jax.default_backend() == "cpu" and _host_lapack() is not None else "jax"
