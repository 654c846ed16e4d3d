"""The registry of likelihoods under the names lme4's ``family=`` uses; a new family is one line here.

``get("binomial", link="probit")`` gives the family with another of the links it allows (``family.links``).
"""

from __future__ import annotations

import dataclasses

from lmevi.families import links as links_lib
from lmevi.families.base import Likelihood
from lmevi.families.binomial import BINOMIAL
from lmevi.families.gaussian import GAUSSIAN
from lmevi.families.poisson import POISSON

LIKELIHOODS: dict[str, Likelihood] = {"gaussian": GAUSSIAN, "poisson": POISSON, "binomial": BINOMIAL}


def register(likelihood: Likelihood, name: str | None = None) -> None:
    """Make ``likelihood`` available as ``lmevi.fit(..., family=name)`` (default: its own ``name``)."""
    LIKELIHOODS[name or likelihood.name] = likelihood


def get(name: str, link: str | None = None) -> Likelihood:
    """The likelihood registered under ``name`` (lme4's ``family=`` spelling), with ``link`` if given."""
    if not isinstance(name, str) or name not in LIKELIHOODS:
        raise ValueError(f"family must be one of {sorted(LIKELIHOODS)} (the likelihood), got {name!r}")
    like = LIKELIHOODS[name]
    if link is None or link == like.link.name:
        return like
    if link not in like.links:
        raise ValueError(f"family={name!r} takes link one of {list(like.links)}, got link={link!r}")
    return dataclasses.replace(like, link=links_lib.get(link))
