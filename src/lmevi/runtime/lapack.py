"""LAPACK for loaded executables and the host path: jaxlib's kernels linked, SciPy's extensions loaded by file.
"""

from __future__ import annotations

import os


_lapack_linked: list = []


def _link_lapack() -> None:
    """Make jaxlib look up its LAPACK kernels, once per process. jaxlib does that when it first lowers a
    linear-algebra operation; a loaded executable skips lowering, and its LAPACK calls would jump to null
    pointers (a segmentation fault, seen on InstEval's starting point). JAX's lowering rules call
    ``initialize_lapack``; where a JAX lacks it, lowering one small Cholesky does the same."""
    if not _lapack_linked:
        try:  # JAX's own hook, as its lowering rules call it
            from jax._src.lax.linalg import initialize_lapack

            _preload_scipy_lapack()
            initialize_lapack()
        except (ImportError, AttributeError):  # a JAX without it: the public route (0.03 s more)
            import jax
            import numpy as np

            jax.jit(jax.numpy.linalg.cholesky).lower(np.eye(1, dtype=np.float32))
        _lapack_linked.append(True)


# The extension modules whose exported C functions (``__pyx_capi__``) jaxlib's CPU kernels call.
_SCIPY_LAPACK = ("scipy.linalg.cython_blas", "scipy.linalg.cython_lapack")


def _preload_scipy_lapack() -> None:
    """Load SciPy's ``cython_blas`` and ``cython_lapack`` extension modules from their files
    (:func:`scipy_linalg_extension`), so that jaxlib, which imports them by name, finds them loaded. Imported
    the usual way they first run ``scipy.linalg``'s package initialisation, which imports all of
    ``scipy.linalg`` (0.1-0.3 s of a fresh process's first fit, for two tables of function pointers). Where
    SciPy is laid out otherwise, nothing is preloaded and jaxlib imports them as usual."""
    for name in _SCIPY_LAPACK:
        if scipy_linalg_extension(name) is None:
            return


def scipy_linalg_extension(name: str):
    """The extension module ``name`` of ``scipy.linalg`` (``"scipy.linalg._flapack"``, ...), loaded from its
    file without running ``scipy.linalg``'s package initialisation, or ``None`` where it cannot be found.

    Nothing else changes: ``scipy.linalg`` itself is not loaded (unless it already was: then its module is
    returned), and when the user imports it, it finds the module already there."""
    import importlib
    import importlib.machinery
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    if "scipy.linalg" in sys.modules:
        return importlib.import_module(name)
    try:
        spec = importlib.util.find_spec("scipy")  # a top-level name: finding it imports nothing
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = os.path.join(list(spec.submodule_search_locations)[0], "linalg")
        finder = importlib.machinery.FileFinder(
            folder, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
        )
        found = finder.find_spec(name)
        if found is None:
            return None
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module
        try:
            found.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    except Exception:  # noqa: BLE001 - the callers have another route
        return None
