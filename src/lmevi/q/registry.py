"""The registry of variational families: q's name (``lmevi.fit(q=...)``) -> the module implementing the q
protocol (:class:`lmevi.q.protocol.QFamily`) and its layout function ``(design, info, reml, small_threshold,
blocks, collective) -> spec``. A new q is one module and one line here (or a call of :func:`register`).

``"exact"`` is not a variational family: lme4's criterion (:mod:`lmevi.exact`) holds its estimates in the
layout named by :data:`EXACT_LAYOUT` (the conditional modes and covariances per term, beta's under REML).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from lmevi.q import variational
from lmevi.q import layout
from lmevi.q.protocol import Family


class QEntry(NamedTuple):
    """A registered q: the import name of its protocol module, and its layout function."""

    module: str
    layout: Callable


Q_FAMILIES: dict[str, QEntry] = {
    "structured": QEntry(variational.__name__, layout.structured_spec),
    "meanfield": QEntry(variational.__name__, layout.meanfield_layout),
}

# the layout an exact fit's estimates are held in
EXACT_LAYOUT = "meanfield"


def register(name: str, module: str, layout: Callable) -> None:
    """Make the q implemented by the module ``module`` (its import name) with ``layout`` available as
    ``lmevi.fit(..., q=name)``."""
    Q_FAMILIES[name] = QEntry(module, layout)


def get(name: str) -> QEntry:
    """The q registered under ``name`` (``"exact"``: the layout of :data:`EXACT_LAYOUT`)."""
    name = EXACT_LAYOUT if name == "exact" else name
    if name not in Q_FAMILIES:
        raise ValueError(f"q must be one of {sorted(Q_FAMILIES) + ['exact', 'auto']}, got {name!r}")
    return Q_FAMILIES[name]


def family(name: str) -> Family:
    """The protocol module of the q registered under ``name``, as ``Problem.q`` holds it."""
    return Family(get(name).module)
