"""Export stage: a fitted model as an ArviZ ``InferenceData``, so ArviZ's summaries and plots read it.

The posterior group holds ``num_samples`` draws from q as one chain:

* one variable per grouping factor with the random effects, dims ``(chain, draw, <name>_level, <name>_coef)``,
  coordinates the level labels and coefficient names as lme4 prints them;
* ``fixef``, dims ``(chain, draw, coef)``: draws of beta from q when it is in q (``reml=True``); with
  ``reml=False`` beta is a point estimate and its value is repeated in every draw;
* ``sd``, dims ``(chain, draw, component)``: the SD of every random coefficient and the residual SD, point
  estimates of variational EM repeated in every draw.

Naming rule of the random-effect variables: a variable is named after its grouping factor exactly as lme4
prints it (``"s"``, ``"Subject"``, ``"cask:batch"``). Terms that share a grouping factor, as
``(1 | g) + (0 + x | g)`` or ``(1 + x || g)``, share one variable whose ``coef`` axis lists the coefficients
of all of them, as lme4's ``ranef(m)$g`` does. A grouping factor whose name would clash with another
variable or dimension (``fixef``, ``sd``, ``chain``, ``draw``, ``coef``, ``component``, ``<other>_level``,
...) is prefixed with ``ranef_``.

The ``sd`` labels follow :meth:`lmevi.result.fitresult.FitResult.sd`: ``<group>`` when the grouping factor has one
coefficient, ``<group>:<coef>`` when it has several (``Subject:Days``), and ``Residual``.

Unlike a sampler's output, the draws are independent by construction, so the diagnostics of
``az.summary`` say little: ESS is about ``num_samples`` for the draws from q, R-hat is NaN (ArviZ needs two
chains and logs so), and the repeated point estimates have SD 0 and undefined MCSE. ``az.summary(idata,
kind="stats")`` gives the moments and intervals alone.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import TYPE_CHECKING

import arviz as az
import jax
import numpy as np

from lmevi.runtime.precision import x64

if TYPE_CHECKING:  # the result is passed in; importing its class here would close a circle
    from lmevi.result.fitresult import FitResult

FIXED_VAR, FIXED_DIM = "fixef", "coef"
SD_VAR, SD_DIM = "sd", "component"
_RESERVED = {"chain", "draw", FIXED_VAR, FIXED_DIM, SD_VAR, SD_DIM}


@x64
def to_inference_data(result: FitResult, num_samples: int = 1000, rng_key=None) -> az.InferenceData:
    """Draws from q (and the point estimates) of a fit as an ArviZ ``InferenceData`` with one chain.

    Args:
        result: a fitted model.
        num_samples: number of draws ``S`` from q.
        rng_key: a ``jax.random`` key; default ``jax.random.PRNGKey(0)``, so the export is reproducible.

    Returns:
        ``InferenceData`` whose ``posterior`` holds, per grouping factor ``g``, ``(1, S, J_g, p_g)`` random
        effects; ``fixef`` ``(1, S, p)``; ``sd`` ``(1, S, n_sd)`` (see the module docstring for names), and
        whose ``attrs`` (on the ``posterior`` group and on the whole object) record the formula, the options
        of the fit and its final ELBO.
    """
    if not isinstance(num_samples, (int, np.integer)) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if rng_key is None:
        rng_key = jax.random.PRNGKey(0)
    keys = jax.random.split(rng_key, int(num_samples))
    effects, beta = _draws(keys, result.spec, result.params.blocks, result.q)
    effects = [np.asarray(e) for e in effects]

    posterior: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, list[str]] = {}
    for name, ks in _random_variables(result).items():
        terms = [result.info.terms[k] for k in ks]
        level_dim, coef_dim = f"{name}_level", f"{name}_coef"
        # terms that share a grouping factor read the same columns of the same data, so share its levels
        posterior[name] = np.concatenate([effects[k] for k in ks], axis=-1)[None]
        dims[name] = [level_dim, coef_dim]
        coords[level_dim] = list(terms[0].levels)
        coords[coef_dim] = _dedupe([c for t in terms for c in t.coef_names])

    fixed_names = list(result.info.fixed_names)
    if beta is None:
        point = np.asarray(result.params.model.beta)
        beta = np.broadcast_to(point, (num_samples, len(point)))
    posterior[FIXED_VAR] = np.asarray(beta)[None]
    dims[FIXED_VAR] = [FIXED_DIM]
    coords[FIXED_DIM] = fixed_names

    sd = result.sd()  # the random coefficients' SDs, and the residual's where the family has one
    labels, values = list(sd.index), sd.to_numpy()
    posterior[SD_VAR] = np.broadcast_to(values, (1, num_samples, len(values)))
    dims[SD_VAR] = [SD_DIM]
    coords[SD_DIM] = labels

    o = result.options
    attrs = {
        "inference_library": "lmevi",
        "formula": result.info.formula.text,
        "family": o.family,
        "q": o.q,
        # netCDF attributes take no booleans
        "reml": int(bool(o.reml)),
        "method": o.method,
        "elbo_estimator": o.elbo,
        "elbo": result.elbo,
        "converged": int(result.converged),
        "steps": int(result.steps),
        "seed": int(o.seed),
        "dtype": o.dtype,
    }
    if o.residual_scale is not None:
        attrs["residual_scale"] = float(o.residual_scale)
    return az.from_dict(
        posterior=posterior, coords=coords, dims=dims, posterior_attrs=dict(attrs), attrs=dict(attrs)
    )


@partial(jax.jit, static_argnums=(1, 3))
def _draws(keys: jax.Array, spec, blocks, q) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
    """``S`` independent draws from q, one per key: ``(S, J_k, p_k)`` per term and ``(S, p)`` beta or None."""
    return jax.vmap(q.sample, in_axes=(0, None, None))(keys, spec, blocks)


def _random_variables(result: FitResult) -> dict[str, list[int]]:
    """Variable name -> indices of the random terms it holds, in formula order (see the module docstring)."""
    by_group: dict[str, list[int]] = {}
    for k, term in enumerate(result.info.terms):
        by_group.setdefault(term.group, []).append(k)
    taken = set(_RESERVED)
    for group in by_group:
        taken |= {f"{group}_level", f"{group}_coef"}
    out: dict[str, list[int]] = {}
    for group, ks in by_group.items():
        name = group
        if name in taken or name in out:
            name = f"ranef_{group}"
        out[name] = ks
    return out


def _dedupe(labels: list[str]) -> list[str]:
    """Make labels unique by suffixing repeats ``_2``, ``_3``, ... (coordinates must be unique)."""
    seen: Counter = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return out
