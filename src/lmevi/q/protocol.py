"""q seam: what a variational family provides, so that a new family is one new module.

A family is a module with these functions, which ``Problem.q`` refers to by name (a :class:`Family`, see
:mod:`lmevi.fitting.build`). Shapes:
``n_obs`` rows, ``J_k`` levels and ``p_k`` coefficients of term ``k``, ``p`` fixed effects. ``spec`` is
the family's static description (for :mod:`lmevi.q.variational`, a :class:`~lmevi.q.layout.QSpec`),
``blocks`` its parameters (a pytree) and ``data`` its design-only arrays, computed once per fit.

The block-Gaussian family of :mod:`lmevi.q.variational` implements it; its two layouts ``"structured"`` and
``"meanfield"`` are registered in :data:`lmevi.q.registry.Q_FAMILIES`. A new family adds one module with these
functions and one line there (or a call of :func:`lmevi.q.registry.register`); the ELBO, the optax path,
SQUAREM, the results, the export and the map back to the data's units reach it only through this interface.
Coordinate ascent (:mod:`lmevi.q.cavi`) is the closed-form update of the block-Gaussian family under a
likelihood with ``moment_form`` and says so (``cavi.supports``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import jax

from lmevi.q.model import ModelParams


class VIParams(NamedTuple):
    """All that variational EM estimates: point estimates of the model and the blocks of q (a pytree whose
    layout is the family's own)."""

    model: ModelParams
    blocks: tuple


@dataclass(frozen=True)
class Family:
    """A family module by its import name, as ``Problem.q`` holds it: attribute access reaches the module's
    functions (``problem.q.init_params``), and unlike a module object it can be pickled, so that a compiled
    program whose static metadata holds it can be kept on disk (:mod:`lmevi.runtime.jit`)."""

    module: str

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(self.module), name)

    @property
    def implementation(self):
        """The module itself."""
        return importlib.import_module(self.module)


class QFamily(Protocol):
    """The functions a variational family module provides."""

    def block_data(self, design, spec) -> tuple:
        """Design-only arrays of q, computed once per fit."""

    def init_params(self, design, spec, likelihood, fixed_sigma, init_scale: float, n_obs=None):
        """Starting point estimates and q (a ``VIParams``-like pytree with ``.model`` and ``.blocks``)."""

    def row_moments(self, design, spec, blocks, data) -> tuple[jax.Array, jax.Array]:
        """Mean and variance under q of every row's random part of the predictor, ``(n_obs,)`` each."""

    def row_mean(self, design, spec, blocks) -> jax.Array:
        """The mean of :meth:`row_moments` alone, ``(n_obs,)``."""

    def row_var_sum(self, spec, blocks, data) -> jax.Array:
        """``sum_i Var_q(eta_i)``, ``()`` (may be computed without a pass over the rows)."""

    def term_moments(self, spec, blocks, k: int, given_beta: bool = False) -> tuple[jax.Array, jax.Array]:
        """Mean ``(J_k, p_k)`` and covariance ``(J_k, p_k, p_k)`` under q of term ``k``'s coefficients."""

    def fixed_moments(self, spec, blocks) -> tuple[jax.Array, jax.Array]:
        """Mean ``(p,)`` and covariance ``(p, p)`` of beta under q (REML-like fits)."""

    def expected_log_prior(self, spec, params, level_mask=None) -> jax.Array:
        """``E_q[log p(b | Sigma)]``, ``()``; padding levels (``level_mask`` 0) left out."""

    def entropy(self, spec, blocks, level_mask=None) -> jax.Array:
        """``H[q]``, ``()``; padding levels left out."""

    def sample(self, rng_key, spec, blocks) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
        """One draw: ``(J_k, p_k)`` per term and ``(p,)`` beta (``None`` when beta is a point estimate)."""

    def to_unconstrained(self, params):
        """Parameters in the unconstrained coordinates gradient steps move in."""

    def to_constrained(self, raw, fixed_sigma):
        """Inverse of :meth:`to_unconstrained`; ``fixed_sigma`` ``()`` or ``None`` overrides sigma."""

    def coordinate_mask(self, spec, params, level_mask):
        """0/1 arrays shaped as ``params``: 1 where a parameter belongs to the data, 0 to a padding level."""

    def unpad(self, params, padded_spec, spec):
        """``params`` of the padded layout restricted to the data's levels (``spec``'s counts)."""

    def blocks_to_data_units(self, spec, blocks, term_scales, fixed_scale, fixed_shift):
        """q's blocks from standardised units to the data's: term ``k``'s coefficients are multiplied by
        ``term_scales[k]`` ``(p_k,)``, beta's by ``fixed_scale`` ``(p,)`` and shifted by ``fixed_shift`` ``(p,)``
        (:func:`lmevi.fitting.scaling.to_data_units`)."""

    def from_moments(self, spec, model, effects, effects_cov, beta, beta_cov):
        """q holding given Gaussian moments: per term ``(J_k, p_k)`` means and ``(J_k, p_k, p_k)`` covariances,
        beta's ``(p,)`` mean and ``(p, p)`` covariance (used where ``spec.reml``); an exact fit's estimates are
        held so (:func:`lmevi.fitting.stage.fit_model`)."""
