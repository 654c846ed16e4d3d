"""Model stage, as lme4's ``lFormula``: formula and data in, everything a fit needs out.

:func:`build_model` parses the formula, builds the design arrays, standardises them (:mod:`lmevi.scaling`),
chooses the blocks of q and computes their design-only cross-products. It returns a :class:`Model`: the host
side (labels, scales, the response in the data's units) and the :class:`Problem` the compiled kernels take
as their first argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmevi import likelihood as likelihood_lib
from lmevi import scaling, variational
from lmevi.design import Design, DesignInfo, build_design
from lmevi.formula import parse_formula
from lmevi.likelihood import Likelihood
from lmevi.options import check_bool, check_choice, check_int, check_real
from lmevi.precision import x64
from lmevi.scaling import Scales
from lmevi.variational import BlockData, QSpec

DTYPES = {"float64": jnp.float64, "float32": jnp.float32}


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["design", "block_data", "fixed_sigma"],
    meta_fields=["spec", "likelihood", "q", "estimate_sigma"],
)
@dataclass(frozen=True)
class Problem:
    """What the compiled kernels see: arrays as pytree leaves, structure as static metadata.

    Attributes:
        design: the standardised arrays (``y`` ``(n_obs,)``, ``X`` ``(n_obs, p)``, one term per random term).
        block_data: one :class:`~lmevi.variational.BlockData` per block of q.
        fixed_sigma: ``()`` the residual SD in standardised units when it is fixed (ignored otherwise).
        spec: the blocks of q (static).
        likelihood: the response distribution (static, :mod:`lmevi.likelihood`).
        q: the module implementing the variational family (static; :mod:`lmevi.variational`).
        estimate_sigma: whether sigma is estimated (static).

    Compiled code depends on the static fields and on the arrays' shapes only, so a fixed sigma of another
    value runs the same program.
    """

    design: Design
    block_data: tuple[BlockData, ...]
    fixed_sigma: jax.Array
    spec: QSpec
    likelihood: Likelihood
    q: Any
    estimate_sigma: bool

    @property
    def n_obs(self) -> int:
        return self.design.y.shape[0]

    @property
    def sigma_if_fixed(self) -> jax.Array | None:
        """``fixed_sigma`` when sigma is fixed, else ``None`` (what the q's constrain map takes)."""
        return None if self.estimate_sigma else self.fixed_sigma


class Model(NamedTuple):
    """A model ready to fit.

    Attributes:
        formula: the formula as given.
        info: names and level labels of the design.
        scales: the standardisation (``problem`` is in standardised units; results map back).
        y: ``(n_obs,)`` the response in the data's units.
        problem: the arrays and structure the kernels take.
        q_name: ``"structured"`` or ``"meanfield"``.
        reml: whether beta is in q (REML-like).
        residual_scale: the fixed residual SD in the data's units, or ``None`` (estimated).
        dtype: ``"float64"`` or ``"float32"``.
    """

    formula: str
    info: DesignInfo
    scales: Scales
    y: np.ndarray
    problem: Problem
    q_name: str
    reml: bool
    residual_scale: float | None
    dtype: str


@x64
def build_model(
    formula: str,
    data: pd.DataFrame,
    *,
    family: str = "gaussian",
    q: str = "structured",
    reml: bool = True,
    residual_scale: float | None = None,
    blocks=None,
    small_threshold: int = 50,
    dtype: str = "float64",
    missing: str = "raise",
) -> Model:
    """Parse, build and standardise the design, choose q's blocks; no fitting.

    Args: as :func:`lmevi.fit` (``family`` names the likelihood, ``q`` the variational family).

    Returns:
        A :class:`Model`.
    """
    like = likelihood_lib.get(family)
    q = check_choice("q", q, tuple(variational.Q_FAMILIES))
    reml = check_bool("reml", reml)
    if blocks is not None and q != "structured":
        raise ValueError("blocks= applies to q='structured' only")
    if blocks is not None and (isinstance(blocks, str) or not isinstance(blocks, (list, tuple))):
        raise TypeError(f"blocks must be a list of tuples of grouping-factor names, got {blocks!r}")
    if residual_scale is not None:
        residual_scale = check_real("residual_scale", residual_scale, positive=True)
    small_threshold = check_int("small_threshold", small_threshold, minimum=0)
    dtype = check_choice("dtype", dtype, tuple(DTYPES))
    missing = check_choice("missing", missing, ("raise", "drop"))
    jdtype = DTYPES[dtype]

    raw_design, info = build_design(parse_formula(formula), data, jdtype, missing)
    # fit in standardised units and map back: estimates and warnings do not depend on the data's units
    design, scales = scaling.standardise(raw_design)
    spec = variational.Q_FAMILIES[q](design, info, reml, small_threshold, blocks)
    fixed = None if residual_scale is None else residual_scale / scales.y_scale
    problem = make_problem(design, spec, likelihood=like, fixed_sigma=fixed)
    return Model(
        formula=formula, info=info, scales=scales, y=np.asarray(raw_design.y), problem=problem, q_name=q,
        reml=reml, residual_scale=residual_scale, dtype=dtype,
    )


def make_problem(
    design: Design, spec: QSpec, *, likelihood: Likelihood = likelihood_lib.GAUSSIAN, fixed_sigma: float | None = None
) -> Problem:
    """The kernels' :class:`Problem` for arrays and a block layout of the block-Gaussian q, computing the
    block data (one compiled call).

    Args:
        design: the arrays (standardised by :func:`build_model`; any units work for the kernels).
        spec: q's blocks (``lmevi.variational.Q_FAMILIES``).
        likelihood: the response distribution.
        fixed_sigma: the fixed residual SD in the arrays' units, or ``None`` to estimate it.
    """
    return Problem(
        design=design,
        block_data=_block_data(design, spec),
        fixed_sigma=jnp.asarray(1.0 if fixed_sigma is None else fixed_sigma, design.y.dtype),
        spec=spec,
        likelihood=likelihood,
        q=variational,
        estimate_sigma=fixed_sigma is None,
    )


_block_data = jax.jit(variational.block_data, static_argnums=1)
