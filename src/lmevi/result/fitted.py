"""Fitted values of a problem: the linear predictor at the estimates, on the device for variational fits and on the
host for exact ones (which compile nothing), restricted to this process's rows.
"""

from __future__ import annotations


import jax
import numpy as np

from lmevi.q.protocol import VIParams
from lmevi.runtime.jit import sized_jit


def local_rows(a) -> np.ndarray:
    """A row-indexed array as float64 NumPy: the whole of it, or in a multi-process fit the rows this process
    holds (its devices' shards, in row order)."""
    if a.is_fully_addressable:
        return np.asarray(a, dtype=np.float64)
    shards = sorted(a.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data, dtype=np.float64) for shard in shards])


def _exact_linear_predictor(design, spec, params: VIParams) -> np.ndarray:
    """``X beta + sum_k Z_k b_k`` in NumPy for an exact fit, whose q has the mean-field layout (one block per
    term holding its conditional modes, beta's block under REML); ``(n_rows,)``."""
    X = np.asarray(design.X, np.float64)
    out = X @ np.asarray(params.model.beta, np.float64) if params.model.beta is not None else np.zeros(len(X))
    for block, bp in zip(spec.blocks, params.blocks):
        if block.large is not None:
            term = design.terms[block.large]
            effects = np.asarray(bp.loc_large, np.float64)[np.asarray(term.index)]
            out = out + np.sum(np.asarray(term.covariates, np.float64) * effects, axis=1)
        if block.fixed:
            out = out + X @ np.asarray(bp.loc_small, np.float64)
    return out


@sized_jit
def _linear_predictor(problem, params) -> jax.Array:
    """``E_q`` of every row's linear predictor, ``(n_obs,)``: the random part, plus ``X beta`` when beta is a
    point estimate (under REML q holds beta and the random part includes it). One program: the sum outside
    it would be an operation compiled on its own in every new process."""
    mean = problem.q.row_mean(problem.design, problem.spec, params.blocks)
    mean = mean if problem.design.offset is None else mean + problem.design.offset
    return mean if params.model.beta is None else problem.design.X @ params.model.beta + mean
