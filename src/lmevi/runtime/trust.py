"""Whether a compilation-cache folder or file may be read: only one that no one but the user can write.

lmevi reads its kept executables back with :func:`pickle.loads`, and JAX's persistent compilation cache loads
native code, so whoever can write a file into the cache folder runs code in the user's process at the next
fit. A folder or file is therefore trusted only if the current user owns it and neither its group nor others
may write to it; a file also needs a trusted folder, as OpenSSH's ``StrictModes`` asks of ``authorized_keys``
and its folders. A symbolic link is judged by what it points to, and a link into an untrusted place is
refused. Where the platform has no user ids (:func:`os.getuid` is missing, as on Windows) everything is
trusted, as before these checks.

An untrusted cache is not used: fits still run and their programs are compiled anew. :func:`check` warns
once per folder per process with :class:`UntrustedCacheWarning`, naming the folder and the reason.

Importing this module changes nothing; :func:`private_dir` is the only function that writes (it creates
folders).
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

__all__ = ["UntrustedCacheWarning", "private_dir", "is_trusted", "warn_untrusted", "check"]


class UntrustedCacheWarning(UserWarning):
    """A cache folder or file others could write to, so lmevi does not read from it."""


def private_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` and its missing parents with mode 0700 (only the user may read, write or
    enter them); folders that exist are left as they are.

    Args:
        path: the folder.

    Returns:
        ``Path(path)``.

    Raises:
        OSError: a folder cannot be created (a read-only file system, a file in the way).
    """
    folder = Path(path)
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    # Top down, each with its own mode: ``Path.mkdir(parents=True)`` gives the parents the umask's default.
    for candidate in reversed(missing):
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile; judged later like any folder
            pass
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    return folder


def _judge(path: Path) -> tuple[bool, str]:
    """``(trusted, reason)`` of one resolved path on its own: owner and write bits."""
    try:
        info = os.stat(path)
    except OSError as error:
        return False, f"{path} cannot be examined ({error.strerror or error})"
    uid = os.getuid()
    if info.st_uid != uid:
        return False, f"{path} is owned by user id {info.st_uid}, not by you (user id {uid})"
    mode = stat.S_IMODE(info.st_mode)
    for bit, who in ((stat.S_IWOTH, "anyone"), (stat.S_IWGRP, "its group")):
        if mode & bit:
            return False, f"{path} can be written by {who} (mode {mode:04o})"
    return True, f"{path} is yours and only you can write to it"


def is_trusted(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether a cache folder or file may be read: ``(trusted, reason)``, ``reason`` a sentence naming the
    path that decided.

    A folder is trusted if the current user owns it and neither its group nor others may write to it. A file
    must pass the same test, and so must the folder it is in (the folder named in ``path`` and, if ``path``
    is or passes through a link, the folder its target lies in). Links are followed to their target, which
    is what is judged.

    Args:
        path: a folder or a file (which must exist).

    Returns:
        ``(True, why)`` or ``(False, why not)``. Always ``(True, ...)`` where :func:`os.getuid` does not exist.
    """
    if not hasattr(os, "getuid"):
        return True, "this platform has no user ids to check"
    given = Path(path)
    target = Path(os.path.realpath(given))
    if not target.exists():
        return False, f"{given} does not exist" + (f" (it points to {target})" if target != given else "")
    if target.is_dir():
        candidates = [target]
    else:
        candidates = [Path(os.path.realpath(given.parent)), target.parent, target]
    for candidate in dict.fromkeys(candidates):  # in order, each once
        trusted, reason = _judge(candidate)
        if not trusted:
            if candidate != given and given.is_symlink():
                reason = f"{given} is a link into an untrusted place: {reason}"
            return False, reason
    return True, f"{given} is yours and only you can write to it and its folder"


# Folders already warned about in this process (as text): one warning each.
_warned: set[str] = set()


def warn_untrusted(folder: str | os.PathLike, reason: str, *, stacklevel: int = 3) -> bool:
    """Warn with :class:`UntrustedCacheWarning` that the cache in ``folder`` is not used, once per folder
    per process.

    Args:
        folder: the cache folder concerned (for a refused file: the folder it is in).
        reason: why it is refused (from :func:`is_trusted`).
        stacklevel: passed to :func:`warnings.warn`.

    Returns:
        Whether a warning was issued now (``False``: this folder was warned about before).
    """
    name = os.path.abspath(folder)
    if name in _warned:
        return False
    _warned.add(name)
    warnings.warn(
        f"lmevi does not use the compilation cache in {name}: {reason}. Fits still run, and their programs "
        "are compiled anew. To use a cache, give lmevi a folder that only you own and can write to "
        "(LMEVI_CACHE_DIR, or remove the group's and others' write permission: chmod go-w).",
        UntrustedCacheWarning, stacklevel=stacklevel)
    return True


def check(path: str | os.PathLike) -> bool:
    """:func:`is_trusted`, warning once per folder (:func:`warn_untrusted`) when not: whether ``path`` may be
    read.

    Args:
        path: a cache folder or a file in one.

    Returns:
        Whether the cache at ``path`` may be read.
    """
    trusted, reason = is_trusted(path)
    if not trusted:
        given = Path(path)
        warn_untrusted(given if given.is_dir() else given.parent, reason, stacklevel=4)
    return trusted
