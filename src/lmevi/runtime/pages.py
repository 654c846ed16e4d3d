"""NumPy's huge-page requests, off while lmevi builds and fits.

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
