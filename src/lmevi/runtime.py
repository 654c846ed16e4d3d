"""What lmevi needs of the JAX runtime, set up at the first fit and never at import.

XLA on CPU: with jaxlib 0.10's default concurrency-optimised CPU scheduler, fits of 1e7 rows deadlocked
inside XLA's CPU runtime on every try on a 2-core machine; with that scheduler off they never did, and the
InstEval and 1e6-row fits ran 10-20 % faster. XLA reads ``XLA_FLAGS`` once, when JAX starts its backend. So
at the first fit, and only if JAX has not started yet (lmevi is the first to run anything on JAX) and the
user has not set the flag, lmevi adds ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to
``XLA_FLAGS``. If JAX already runs (you imported JAX and computed something first), nothing is changed: set
the flag yourself before JAX starts if you fit very large data on CPU. Importing lmevi changes nothing.

Compilation cache: XLA's compile of a fitting program takes seconds on CPU, much longer than a small fit.
At the first fit, under the same condition (JAX has not started) and only if you have not chosen a JAX cache
folder yourself, lmevi points JAX's persistent compilation cache at ``<user cache folder>/lmevi/jax-<version>``
(platformdirs; e.g. ``~/.cache/lmevi/jax-0.10.2`` on Linux) and caches every program however quick its
compile (each entry is tens of kilobytes; a model shape takes a few hundred). A later process that fits the same
model shapes loads the programs instead of compiling them (sleepstudy's first fit: 3.2 s -> 0.75 s here).
JAX has one cache per process, so your own JAX programs compiled after that point are cached there too.
``LMEVI_CACHE_DIR=/some/folder`` moves it, ``LMEVI_CACHE_DIR=off`` turns it off (or call
:func:`set_cache_dir` before the first fit). Deleting the folder clears it. If JAX has already run when
lmevi first fits, JAX has decided for the whole process that there is no cache, and lmevi leaves it so.

Huge pages: NumPy asks the kernel for transparent huge pages on every large new array. Where the kernel's
``defrag`` setting is ``madvise`` (common), a page fault in such an array may first compact memory, and once
earlier arrays have fragmented it, fresh memory for a 10^7-row design cost 0.1-0.3 s per 80 MB here. While
``fit`` and ``build_model`` run, lmevi turns NumPy's request off and restores it when they return
(:func:`small_pages`): at 10^7 rows ``build_model`` took 2.9 s instead of 3.7-4.0 s and a repeated fit 8.3 s
instead of 9.0 s, side by side. If you set ``NUMPY_MADVISE_HUGEPAGE`` yourself, lmevi leaves NumPy's setting
as you chose it.
"""

from __future__ import annotations

import os
from pathlib import Path

XLA_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this query: assume started, change nothing
        return True


def _madvise_setter():
    """NumPy's switch for its huge-page requests (``_set_madvise_hugepage(bool) -> previous``), or ``None``."""
    import numpy as np

    for module in ("_core", "core"):
        setter = getattr(getattr(getattr(np, module, None), "multiarray", None), "_set_madvise_hugepage", None)
        if setter is not None:
            return setter
    return None


def small_pages(fn):
    """Run ``fn`` with NumPy's huge-page requests off (see the module docstring), restoring NumPy's setting
    afterwards; unchanged where the user set ``NUMPY_MADVISE_HUGEPAGE`` or NumPy lacks the switch."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setter = None if "NUMPY_MADVISE_HUGEPAGE" in os.environ else _madvise_setter()
        if setter is None:
            return fn(*args, **kwargs)
        previous = setter(False)
        try:
            return fn(*args, **kwargs)
        finally:
            setter(previous)

    return wrapper


CACHE_ENV = "LMEVI_CACHE_DIR"
_OFF = ("", "0", "off", "false", "none", "no")
_cache_choice: list = []  # what set_cache_dir chose, if called: [Path | None]


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Choose lmevi's compilation-cache folder (``None``: no cache) for this process; call it before the
    first fit. It overrides ``LMEVI_CACHE_DIR``."""
    _cache_choice[:] = [None if path is None else Path(path)]


def cache_dir() -> Path | None:
    """The folder lmevi would use for JAX's compilation cache, or ``None`` when turned off."""
    if _cache_choice:
        return _cache_choice[0]
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env)
    import jax
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmevi")) / f"jax-{jax.__version__}"


def prepare() -> dict[str, bool]:
    """At a fit: apply the CPU scheduler workaround and the compilation cache if JAX has not started (see
    the module docstring). Returns what was set, ``{"xla_flag": ..., "cache": ...}``."""
    if _backends_started():
        return {"xla_flag": False, "cache": False}
    return {"xla_flag": _scheduler_flag(), "cache": _compilation_cache()}


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
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: fit without a cache
        return False
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return True


# Programs for models up to this many (padded) rows are compiled at XLA's lowest backend optimisation level:
# on this 2-core CPU that cut compile time by 35-45 % (the coordinate-ascent loop of a sleepstudy-sized model:
# 2.0 s -> 1.3 s) while the programs ran within noise of the optimised ones, since at that size a fit is
# dominated by per-call overheads, not by arithmetic. Larger models keep the default level.
SMALL_ROWS = 1 << 14
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _rows(first) -> int:
    design = getattr(first, "design", first)
    return int(design.y.shape[0])


def sized_jit(fn=None, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)``, compiled with :data:`FAST_COMPILE` when the first argument (a
    :class:`~lmevi.build.Problem` or a :class:`~lmevi.design.Design`) has at most :data:`SMALL_ROWS` rows."""
    if fn is None:
        return lambda f: sized_jit(f, **jit_kwargs)
    import functools

    import jax

    full = jax.jit(fn, **jit_kwargs)
    fast = jax.jit(fn, compiler_options=FAST_COMPILE, **jit_kwargs)

    @functools.wraps(fn)
    def call(first, *args, **kwargs):
        return (fast if _rows(first) <= SMALL_ROWS else full)(first, *args, **kwargs)

    call.full, call.fast = full, fast
    call._cache_size = lambda: full._cache_size() + fast._cache_size()
    return call
