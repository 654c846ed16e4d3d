"""Link functions, as R's ``make.link`` and statsmodels' ``genmod.families.links``: ``eta = g(mu)``.

A link is a small frozen object (hashable and picklable, so that it can sit in the static part of a compiled
problem) with three functions of JAX arrays, elementwise:

* ``link(mu)``: ``eta = g(mu)``;
* ``inverse(eta)``: ``mu = g^{-1}(eta)``;
* ``mu_eta(eta)``: ``d mu / d eta`` (R's ``mu.eta``).

A family is a variance function plus one of these (:mod:`lmevi.families.base`). A new link is one class here and
one entry in :data:`LINKS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Identity:
    """``eta = mu``."""

    name: str = "identity"

    def link(self, mu):
        return mu

    def inverse(self, eta):
        return eta

    def mu_eta(self, eta):
        return jnp.ones_like(eta)


@dataclass(frozen=True)
class Log:
    """``eta = log(mu)``."""

    name: str = "log"

    def link(self, mu):
        return jnp.log(mu)

    def inverse(self, eta):
        return jnp.exp(eta)

    def mu_eta(self, eta):
        return jnp.exp(eta)


@dataclass(frozen=True)
class Logit:
    """``eta = log(mu / (1 - mu))``."""

    name: str = "logit"

    def link(self, mu):
        return jnp.log(mu) - jnp.log1p(-mu)

    def inverse(self, eta):
        return jax.nn.sigmoid(eta)

    def mu_eta(self, eta):
        return jax.nn.sigmoid(eta) * jax.nn.sigmoid(-eta)


@dataclass(frozen=True)
class Probit:
    """``eta = Phi^{-1}(mu)``, the standard normal quantile."""

    name: str = "probit"

    def link(self, mu):
        return jax.scipy.special.ndtri(mu)

    def inverse(self, eta):
        return jax.scipy.special.ndtr(eta)

    def mu_eta(self, eta):
        return jnp.exp(-0.5 * eta**2) / jnp.sqrt(2.0 * jnp.pi)


@dataclass(frozen=True)
class Cloglog:
    """``eta = log(-log(1 - mu))``, the complementary log-log."""

    name: str = "cloglog"

    def link(self, mu):
        return jnp.log(-jnp.log1p(-mu))

    def inverse(self, eta):
        return -jnp.expm1(-jnp.exp(eta))

    def mu_eta(self, eta):
        return jnp.exp(eta - jnp.exp(eta))


@dataclass(frozen=True)
class Inverse:
    """``eta = 1 / mu`` (the Gamma family's canonical link)."""

    name: str = "inverse"

    def link(self, mu):
        return 1.0 / mu

    def inverse(self, eta):
        return 1.0 / eta

    def mu_eta(self, eta):
        return -1.0 / eta**2


@dataclass(frozen=True)
class Sqrt:
    """``eta = sqrt(mu)``."""

    name: str = "sqrt"

    def link(self, mu):
        return jnp.sqrt(mu)

    def inverse(self, eta):
        return eta**2

    def mu_eta(self, eta):
        return 2.0 * eta


IDENTITY, LOG, LOGIT, PROBIT, CLOGLOG, INVERSE, SQRT = Identity(), Log(), Logit(), Probit(), Cloglog(), Inverse(), Sqrt()

# R's link names -> link objects.
LINKS = {lk.name: lk for lk in (IDENTITY, LOG, LOGIT, PROBIT, CLOGLOG, INVERSE, SQRT)}


def get(name: str):
    """The link registered under ``name`` (R's spelling)."""
    if not isinstance(name, str) or name not in LINKS:
        raise ValueError(f"link must be one of {sorted(LINKS)}, got {name!r}")
    return LINKS[name]
