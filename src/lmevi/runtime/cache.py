"""lmevi's cache folder: where compiled programs are kept between processes.

Compilation cache: XLA's compile of a fitting program takes seconds on CPU, much longer than a small fit.
lmevi keeps every program it compiles, as an executable, in ``<user cache folder>/lmevi/executables``
(platformdirs; e.g. ``~/.cache/lmevi/executables`` on Linux): a later process that fits a model of the same
shapes loads the executable and runs it without tracing, lowering or compiling (see "Executables kept on
disk" below; InstEval's default fit in a fresh process: 2.8 s -> 2.0 s). At the first fit, if JAX has not
started yet and you have not chosen a JAX cache folder yourself, lmevi also points JAX's persistent
compilation cache at ``<user cache folder>/lmevi/jax-cache-<version>``, where what lmevi does not keep
itself (a few small array operations, and the programs of fits that cannot be keyed, such as sharded ones)
is cached by JAX; JAX has one cache per process, so your own JAX programs compiled after that point are
cached there too.
``LMEVI_CACHE_DIR=/some/folder`` moves both, ``LMEVI_CACHE_DIR=off`` turns both off (or call
:func:`set_cache_dir` before the first fit). Deleting the folder clears it. If JAX has already run when lmevi
first fits, JAX has decided for the whole process that it has no cache, and lmevi leaves it so (its own
executables are still kept). lmevi creates these folders readable by you alone (mode 0700) and reads from
a folder or file only if you own it and no one else can write to it (:mod:`lmevi.runtime.trust`); otherwise it
warns once and compiles anew.
"""

from __future__ import annotations

import os
from pathlib import Path


CACHE_ENV = "LMEVI_CACHE_DIR"


_OFF = ("", "0", "off", "false", "none", "no")


_cache_choice: list = []  # what set_cache_dir chose, if called: [Path | None]


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Choose lmevi's compilation-cache folder (``None``: no cache) for this process; call it before the
    first fit. It overrides ``LMEVI_CACHE_DIR``."""
    _cache_choice[:] = [None if path is None else Path(path)]


def cache_dir() -> Path | None:
    """lmevi's cache folder (its executables and JAX's compilation cache live in it), or ``None`` when turned
    off."""
    if _cache_choice:
        return _cache_choice[0]
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmevi"))
