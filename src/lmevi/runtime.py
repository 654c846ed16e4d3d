"""What lmevi needs of the JAX runtime, set up at the first fit and never at import.

XLA on CPU: with jaxlib 0.10's default concurrency-optimised CPU scheduler, fits of 1e7 rows deadlocked
inside XLA's CPU runtime on every try on a 2-core machine; with that scheduler off they never did, and the
InstEval and 1e6-row fits ran 10-20 % faster. XLA reads ``XLA_FLAGS`` once, when JAX starts its backend. So
at the first fit, and only if JAX has not started yet (lmevi is the first to run anything on JAX) and the
user has not set the flag, lmevi adds ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to
``XLA_FLAGS``. If JAX already runs (you imported JAX and computed something first), nothing is changed: set
the flag yourself before JAX starts if you fit very large data on CPU. Importing lmevi changes nothing.
"""

from __future__ import annotations

import os

XLA_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this query: assume started, change nothing
        return True


def prepare() -> bool:
    """Apply the CPU scheduler workaround if JAX has not started; returns whether the flag was added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_SCHEDULER_FLAG in flags or _backends_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{XLA_SCHEDULER_FLAG}=false".strip()
    return True
