"""The JAX runtime as lmevi starts it: XLA's CPU flags and the backend, at the first fit and never at import.

XLA on CPU: with jaxlib 0.10's default concurrency-optimised CPU scheduler, fits of 1e7 rows deadlocked
inside XLA's CPU runtime on every try on a 2-core machine; with that scheduler off they never did, and the
InstEval and 1e6-row fits ran 10-20 % faster. XLA reads ``XLA_FLAGS`` once, when JAX starts its backend. So
at the first fit, and only if JAX has not started yet (lmevi is the first to run anything on JAX) and the
user has not set the flag, lmevi adds ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to
``XLA_FLAGS``. If JAX already runs (you imported JAX and computed something first), nothing is changed: set
the flag yourself before JAX starts if you fit very large data on CPU. Importing lmevi changes nothing.

Backend start: at the first fit, if JAX has not started, lmevi starts JAX's backend and the default device's
memory on a helper thread while the design stage builds the host arrays, and waits for it before the first
transfer (:func:`start_backend`). The fit would start both anyway, after the design; on a GPU, JAX's
reservation of most of the device's memory at the first allocation took 1.7-2.3 s on an H200.
"""

from __future__ import annotations

import os
import threading

from lmevi.runtime import trust
from lmevi.runtime.cache import cache_dir


XLA_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this query: assume started, change nothing
        return True


def prepare() -> dict[str, bool]:
    """At a fit: apply the CPU scheduler workaround and the compilation cache if JAX has not started (see
    the module docstring), then start JAX's backend on a helper thread (:func:`start_backend`). Returns what
    was set, ``{"xla_flag": ..., "cache": ..., "backend_thread": ...}``."""
    if _backends_started():
        return {"xla_flag": False, "cache": False, "backend_thread": False}
    done = {"xla_flag": _scheduler_flag(), "cache": _compilation_cache()}
    done["backend_thread"] = start_backend()
    return done


# The helper thread of start_backend (at most one per process), joined by backend_ready.
_starting: list = []


_starting_lock = threading.Lock()


def start_backend() -> bool:
    """Start JAX's backend and its default device's memory pool on a helper thread, once per process and only
    if JAX has not started, so that they are ready when the design stage (host NumPy work) has built the
    arrays: the fit would start both at its first transfer anyway (:func:`lmevi.fitting.build.place_rows`), but then
    after the design, not beside it. On a GPU, JAX reserves most of the device's memory at its first
    allocation: on an H200 (JAX 0.11) starting the backend took 0.4-0.5 s and that first allocation 1.7-2.3
    s, more than the 0.9 s the design stage of a 10^7-row fit takes. On a CPU both take milliseconds. Nothing
    else changes: the same backend, the same device, the same settings (:func:`prepare` has applied its own
    before). Returns whether the thread was started."""
    with _starting_lock:
        if _starting or _backends_started():
            return False
        thread = threading.Thread(target=_start_backend, name="lmevi-backend-start", daemon=True)
        _starting.append(thread)
    thread.start()
    return True


def _start_backend() -> None:
    try:
        import jax
        import numpy as np

        jax.device_put(np.zeros(1, np.float32)).block_until_ready()
    except Exception:  # noqa: BLE001 - the fit meets the same error, where it would have without this thread
        pass


def backend_ready() -> None:
    """Wait for :func:`start_backend`'s thread, if one was started (before the first transfer to a device)."""
    if _starting:
        _starting[0].join()


def _scheduler_flag() -> bool:
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_SCHEDULER_FLAG in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{XLA_SCHEDULER_FLAG}=false".strip()
    return True


def _compilation_cache() -> bool:
    import jax

    folder = cache_dir()
    if folder is None or jax.config.jax_compilation_cache_dir:  # turned off, or the user chose a cache
        return False
    folder = folder / f"jax-cache-{jax.__version__}"
    try:
        trust.private_dir(folder)
    except OSError:  # a read-only home: fit without a cache
        return False
    if not trust.check(folder):  # others could plant code in it: no JAX cache (warned once)
        return False
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return True
