"""Checks of user-facing options: one rule per kind of option, each naming the option, what it got and what
is allowed. No truthiness: ``reml="no"`` is an error, not ``True``. Warnings about the user's input point at
the user's own line (:func:`user_stacklevel`)."""

from __future__ import annotations

import math
import numbers
import os
import sys

import numpy as np


def check_bool(name: str, value) -> bool:
    """``True``/``False`` (Python or NumPy booleans) only."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_optional_bool(name: str, value) -> bool | None:
    return None if value is None else check_bool(name, value)


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An integer (not a bool, not a float that happens to be whole), at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(
    name: str, value, *, minimum: float | None = None, positive: bool = False, finite: bool = True
) -> float:
    """A real number (not a bool or a string), finite, positive or at least ``minimum`` if asked."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if math.isnan(v) or (finite and not math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be a number >= {minimum:g}, got {value!r}")
    return v


def check_choice(name: str, value, allowed) -> str:
    """One of ``allowed`` (compared as values, so only hashable inputs are accepted)."""
    try:
        ok = value in allowed
    except TypeError:
        ok = False
    if not ok or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # src/lmevi/


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the first line
    outside lmevi (the user's call), however many of lmevi's own functions and decorators lie in between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
