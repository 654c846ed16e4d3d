"""Model stage, as lme4's ``lFormula``: formula and data in, everything a fit needs out.

:func:`build_model` parses the formula, builds the design arrays, standardises them (:mod:`lmevi.fitting.scaling`),
chooses the blocks of q and computes their design-only cross-products. It returns a :class:`Model`: the host
side (labels, scales, the response in the data's units) and the :class:`Problem` the compiled kernels take
as their first argument.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmevi.runtime import collective as collective_lib
from lmevi.families import registry as likelihood_lib
from lmevi.fitting import scaling, weighting
from lmevi.frame.design import Design, DesignInfo, TermData, build_design, design_frame
from lmevi.frame.formula import parse_formula
from lmevi.families.base import Likelihood
from lmevi.families.gaussian import GAUSSIAN
from lmevi.fitting.control import variational_only
from lmevi.runtime.options import check_bool, check_choice, check_int, check_real
from lmevi.runtime.precision import RowBuffers, on_device, x64
from lmevi.runtime.xla import backend_ready
from lmevi.runtime.jit import sized_jit
from lmevi.runtime.pages import small_pages
from lmevi.fitting.scaling import Scales
from lmevi.q import registry as q_registry
from lmevi.q.layout import BlockData, QSpec

DTYPES = {"float64": jnp.float64, "float32": jnp.float32}

# The q's a user can ask for: the variational layouts of lmevi.q.variational, "exact" (lme4's profiled
# criterion, lmevi.exact.criterion) and "auto" (exact when its dense block is at most AUTO_EXACT_MAX coefficients).
Q_CHOICES = ("structured", "meanfield", "exact", "auto")
AUTO_EXACT_MAX = 2048


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["design", "block_data", "fixed_sigma", "n_rows", "level_mask"],
    meta_fields=["spec", "likelihood", "q", "estimate_sigma"],
)
@dataclass(frozen=True)
class Problem:
    """What the compiled kernels see: arrays as pytree leaves, structure as static metadata.

    Attributes:
        design: the standardised arrays (``y`` ``(n_obs,)``, ``X`` ``(n_obs, p)``, one term per random term).
        block_data: one :class:`~lmevi.q.layout.BlockData` per block of q.
        fixed_sigma: ``()`` the residual SD in standardised units when it is fixed (ignored otherwise).
        n_rows: ``()`` the number of rows of the data (the arrays may hold zero padding rows after them).
        level_mask: ``None``, or per term a ``(J_k,)`` 0/1 array: 1 for the data's levels, 0 for padding.
        spec: the blocks of q (static).
        likelihood: the response distribution (static, :mod:`lmevi.families.base`).
        q: the module implementing the variational family (static; a :class:`~lmevi.q.protocol.Family` naming
            :mod:`lmevi.q.variational`).
        estimate_sigma: whether sigma is estimated (static).

    Compiled code depends on the static fields and on the arrays' shapes only, so a fixed sigma of another
    value runs the same program, and so does data of another size padded to the same bucket
    (:func:`bucket`).
    """

    design: Design
    block_data: tuple[BlockData, ...]
    fixed_sigma: jax.Array
    n_rows: jax.Array
    level_mask: tuple[jax.Array, ...] | None
    spec: QSpec
    likelihood: Likelihood
    q: Any
    estimate_sigma: bool

    @property
    def n_obs(self) -> jax.Array:
        """``()`` the number of rows of the data (not of the padded arrays)."""
        return self.n_rows

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
        spec: q's blocks with the data's level counts (``problem.spec`` has the padded ones).
        data: the data frame as given (a reference, as lme4 keeps its model frame: refits use it).
        missing: the missing-value rule the design was built with.
        folded: how a Gaussian model's prior weights and offset were folded into its rows
            (:mod:`lmevi.fitting.weighting`), or ``None``.
        nagq: glmer's ``nAGQ`` for an exact generalized model (0, 1: Laplace, or more: adaptive
            Gauss-Hermite quadrature); unused otherwise.
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
    spec: QSpec
    data: pd.DataFrame
    missing: str
    folded: weighting.Folded | None = None
    nagq: int = 1

    @property
    def padded(self) -> bool:
        return self.problem.level_mask is not None


@x64
@small_pages
def build_model(
    formula: str,
    data: pd.DataFrame,
    *,
    family: str = "gaussian",
    link: str | None = None,
    q: str = "auto",
    reml: bool | None = None,
    residual_scale: float | None = None,
    blocks=None,
    small_threshold: int = 50,
    dtype: str = "float64",
    missing: str = "raise",
    pad: bool | None = None,
    devices=None,
    distributed: bool = False,
    fit_settings=None,
    weights=None,
    offset=None,
    nagq: int = 1,
) -> Model:
    """Parse, build and standardise the design, choose q's blocks; no fitting.

    Args: as :func:`lmevi.fit` (``family`` names the likelihood, ``q`` the variational family), and
        pad: pad rows and levels up to size buckets (:func:`bucket`) so that data of another size compiles
            nothing new; the fit is the same (padding rows and levels drop out of every sum). Coordinate
            ascent only: the optax path needs ``pad=False``. Default: pad unless ``fit_settings`` take the
            optax path.
        fit_settings: the :class:`~lmevi.fitting.control.FitSettings` the model will be fitted with, if known:
            ``q="auto"`` then takes a variational q where they ask for variational EM, and ``q="exact"``
            refuses them (:func:`resolve_q`).
        devices: shard the rows over these JAX devices (a number: the first that many of ``jax.devices()``;
            or a sequence of devices); ``None`` (default) keeps every array on the default device. Padding rows
            make the row count a multiple of the number of devices; per-level arrays are replicated and XLA
            reduces each device's per-level sums across devices (GSPMD), so the fit equals the one-device fit
            to rounding. Variational q with coordinate ascent only (``pad=True``).
        distributed: ``data`` is this process's share of the rows of a multi-process job
            (``jax.distributed.initialize`` has run in every process, and every process calls this with its
            own rows): the model is the one all the rows make (levels, counts, scales and q's blocks from
            every process, :mod:`lmevi.runtime.collective`), its rows sharded over the devices of all processes.
            Numeric fixed effects and covariates only; variational q (``q="auto"`` takes the structured one).
        weights, offset: R's prior weights and offset (a column name or one number per row; :mod:`lmevi.frame.prior`).
            A Gaussian model folds them into its rows (:mod:`lmevi.fitting.weighting`); the generalized ones
            keep them in the design.

    Returns:
        A :class:`Model` (in a multi-process job: ``y`` and the data are this process's rows).
    """
    like = likelihood_lib.get(family, link)
    q = check_choice("q", q, tuple(q_registry.Q_FAMILIES) + ("exact", "auto"))
    pad = (fit_settings is None or fit_settings.method == "cavi") if pad is None else pad
    # lmer's default is REML, glmer's ML: REML is defined where the likelihood is the Gaussian's (moment form)
    reml = check_bool("reml", like.moment_form if reml is None else reml)
    residual_scale, small_threshold, dtype, missing = _checked(q, blocks, residual_scale, small_threshold, dtype,
                                                               missing, like, distributed or devices is not None)
    pad = check_bool("pad", pad)
    distributed = check_bool("distributed", distributed)
    collective = collective_lib.LOCAL
    if distributed:
        if devices is not None:
            raise ValueError("distributed=True shards the rows over every process's devices: leave devices=None")
        collective = collective_lib.processes()
        devices = len(jax.devices())  # every device of every process
    sharding = row_sharding(devices)
    if sharding is not None and (q == "exact" or not pad):
        raise ValueError("devices= shards the rows of a variational fit by coordinate ascent: it needs a "
                         "variational q (not q='exact') and pad=True (method='cavi')")
    jdtype = DTYPES[dtype]

    # the row arrays are made with their padding rows (each process pads its rows to the same count, a
    # multiple of its devices), so that standardising and padding them copies nothing
    local_devices, pad_rows = (1 if sharding is None else len(sharding.addressable_devices)), pad
    buffers = RowBuffers(lambda n: padded_rows(int(collective.max(n)), local_devices) if pad_rows else n)
    parsed = parse_formula(formula)
    # a polars or Arrow frame: its formula's columns (and weights' and offset's) only, kept for the result
    data = design_frame(parsed, data, extra=(weights, offset))
    raw_design, info = build_design(parsed, data, jdtype, missing, collective, buffers, encode_response=like.encode,
                                     dispersion=like.has_dispersion, weights=weights, offset=offset)
    raw_design, folded = _checked_response(like, raw_design, parsed.response)
    q = resolve_q(q, raw_design, like, residual_scale, blocks, dtype, sharded=sharding is not None,
                  fit_settings=fit_settings)
    if q == "exact" and not like.moment_form:
        nagq = _check_glmer(info, reml, nagq)
    if q == "exact":
        # lme4's criterion (lmevi.exact.criterion); results use the mean-field layout, one block per term, holding the
        # per-level conditional modes and covariances (lme4's ranef and condVar) and beta's vcov
        pad = False
    spec = q_registry.get(q).layout(raw_design, info, reml, small_threshold, blocks, collective=collective)
    n_obs = info.n_obs
    # fit in standardised units and map back: estimates and warnings do not depend on the data's units;
    # raw_design's arrays are standardised in place where they were made in buffers (nothing reads them after)
    n_rows = buffers.n_rows(raw_design.y.shape[0]) if pad else raw_design.y.shape[0]  # exact: no padding
    design, scales = scaling.standardise(raw_design, n_rows=n_rows, collective=collective, buffers=buffers,
                                         scale_y=like.standardise_y)
    fixed = None if residual_scale is None else residual_scale / scales.y_scale
    if not like.has_dispersion:
        fixed = 1.0  # the ELBO reads no sigma; held at 1 (lme4's dispersion of a Poisson or binomial glmer)
    problem = make_problem(design, spec, likelihood=like, fixed_sigma=fixed, pad=pad, with_block_data=q != "exact",
                           sharding=sharding, n_obs=n_obs, q_family=q_registry.family(q))
    return Model(
        formula=formula, info=info, scales=scales, y=np.asarray(raw_design.y), problem=problem, q_name=q,
        reml=reml, residual_scale=residual_scale, dtype=dtype, spec=spec, data=data, missing=missing, nagq=nagq,
        folded=folded,
    )


def _checked_response(like: Likelihood, design: Design, name: str):
    """``(design, folded)``: the response checked by the likelihood (under prior weights where there are some);
    a Gaussian's weights and offset folded into its rows (:mod:`lmevi.fitting.weighting`), else ``None``."""
    if design.weights is None:
        like.check(np.asarray(design.y), name)
    else:
        like.check_weighted(np.asarray(design.y), np.asarray(design.weights), name)
    if like.moment_form:
        return weighting.fold(design)
    return design, None


def _checked(q, blocks, residual_scale, small_threshold, dtype, missing, like, sharded):
    """The plain options of :func:`build_model`, checked: ``(residual_scale, small_threshold, dtype, missing)``."""
    if residual_scale is not None and not like.has_dispersion:
        raise ValueError(f"residual_scale fixes the Gaussian's residual SD; family={like.name!r} has none")
    if not like.moment_form and sharded:
        raise ValueError(f"family={like.name!r} fits run in one process on one device: leave devices=None and "
                         "distributed=False")
    if blocks is not None and q not in ("structured", "auto"):
        raise ValueError("blocks= applies to q='structured' only")
    if blocks is not None and (isinstance(blocks, str) or not isinstance(blocks, (list, tuple))):
        raise TypeError(f"blocks must be a list of tuples of grouping-factor names, got {blocks!r}")
    if residual_scale is not None:
        residual_scale = check_real("residual_scale", residual_scale, positive=True)
    small_threshold = check_int("small_threshold", small_threshold, minimum=0)
    dtype = check_choice("dtype", dtype, tuple(DTYPES))
    missing = check_choice("missing", missing, ("raise", "drop"))
    return residual_scale, small_threshold, dtype, missing


def _check_glmer(info: DesignInfo, reml: bool, nagq: int) -> int:
    """What glmer's criterion allows: maximum likelihood only, and quadrature (``nagq > 1``) for one scalar
    random-effects term only, as lme4's ``glmer``; returns ``nagq``, checked."""
    nagq = check_int("nagq", nagq, minimum=0)
    if reml:
        raise ValueError("glmer's criterion is a likelihood (no REML): fit a generalized model with reml=False")
    if nagq > 1 and (len(info.terms) != 1 or len(info.terms[0].coef_names) != 1):
        raise ValueError(f"nagq={nagq} (adaptive Gauss-Hermite quadrature) needs a single scalar random-effects "
                         "term, as lme4's glmer; use nagq=1 (Laplace) or nagq=0")
    return nagq


def resolve_q(q: str, design: Design, like: Likelihood, residual_scale, blocks, dtype: str, sharded: bool = False,
              fit_settings=None) -> str:
    """The one rule for ``q="auto"``, and the refusals of ``q="exact"``: exact when lme4's criterion applies (a
    likelihood in moment form, the Gaussian's, with sigma estimated; no user blocks; float64; rows not sharded;
    settings that do not ask for variational EM, :func:`lmevi.fitting.control.variational_only`) and its dense
    block has at most ``AUTO_EXACT_MAX`` coefficients; else structured."""
    exact_ok = like.moment_form and residual_scale is None
    # glmer's criterion (Laplace, nAGQ): a family without a dispersion, and no prior weights yet
    laplace_ok = not like.moment_form and not like.has_dispersion and getattr(design, "weights", None) is None
    asked = None if fit_settings is None else variational_only(fit_settings)
    if q == "exact" and not (exact_ok or laplace_ok):
        raise ValueError("q='exact' fits lme4's criteria: lmer's (a Gaussian likelihood with sigma estimated, no "
                         "residual_scale) or glmer's Laplace and quadrature (Poisson or binomial, without prior "
                         "weights or cbind trials so far)")
    if q == "exact" and asked is not None:
        raise ValueError(f"q='exact' optimises lme4's profiled criterion: {asked} applies to variational EM only")
    if q != "auto":
        return q
    from lmevi.exact.structure import dense_block_size

    if (exact_ok and asked is None and blocks is None and not sharded and dtype == "float64"
            and dense_block_size(design) <= AUTO_EXACT_MAX):
        return "exact"
    return "structured"


# Row buckets start here and level buckets at ``LEVEL_MIN``: a smaller model pays a few zero rows or
# levels, far cheaper than a compilation.
ROW_MIN, LEVEL_MIN = 256, 8


def bucket(n: int, minimum: int) -> int:
    """The size ``n`` is padded to: powers of two up to 1024, then ``2^k`` times 1, 1.25, 1.5 or 1.75, so at
    most 25 % is padding beyond 1024 (at most 100 % below it, where padding costs little)."""
    n = max(int(n), minimum)
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    k = (n - 1).bit_length() - 3  # n lies in (2^(k+2), 2^(k+3)]
    return next(m << k for m in (5, 6, 7, 8) if (m << k) >= n)


def padded_rows(n: int, n_devices: int = 1) -> int:
    """The row count ``n`` rows are padded to: its :func:`bucket`, rounded up to a multiple of ``n_devices``."""
    return -(-bucket(n, ROW_MIN) // n_devices) * n_devices


def pad_design(design: Design, n_rows: int, n_levels: tuple[int, ...]) -> Design:
    """``design`` with zero rows appended up to ``n_rows`` and ``n_levels`` levels per term, as host (NumPy)
    arrays: a device concatenate would compile once per data size. A zero row (y, x and every covariate 0,
    level code 0) adds exactly nothing to any sum over rows; a padding level has no rows."""
    extra = n_rows - design.y.shape[0]

    def rows(a):
        a = np.asarray(a)
        return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)]) if extra else a

    return Design(
        y=rows(design.y),
        X=rows(design.X),
        terms=tuple(
            TermData(index=rows(t.index), covariates=rows(t.covariates), n_levels=J, unit=t.unit)
            for t, J in zip(design.terms, n_levels)
        ),
        weights=None if design.weights is None else rows(design.weights),
        offset=None if design.offset is None else rows(design.offset),
    )


def row_sharding(devices):
    """A ``NamedSharding`` that splits the leading (row) axis over ``devices`` (see :func:`build_model`), or
    ``None`` for ``devices=None``."""
    if devices is None:
        return None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if isinstance(devices, bool) or not isinstance(devices, (int, list, tuple)):
        raise TypeError(f"devices must be a number of devices or a sequence of JAX devices, got {devices!r}")
    available = jax.devices()
    if isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices={devices}: this process has {len(available)} JAX device(s) "
                             "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)")
        devices = available[:devices]
    if not devices:
        raise ValueError("devices= needs at least one device")
    return NamedSharding(Mesh(np.asarray(list(devices)), ("rows",)), PartitionSpec("rows"))


def place_rows(design: Design, sharding=None) -> Design:
    """Every per-row array of ``design`` copied to the device once: with ``sharding`` (rows split over its
    devices), or on the default device. An array that several fields share (the row weight of every
    intercept-only term, :func:`lmevi.fitting.scaling.standardise`) is copied once and shared on the device too."""
    placed: dict[int, Any] = {}  # id of a host array (alive in ``design`` meanwhile) -> its device copy

    def put(a):
        if id(a) in placed:
            return placed[id(a)]
        if sharding is not None and not sharding.is_fully_addressable:
            # a multi-process job: these are this process's rows of the global array
            out = jax.make_array_from_process_local_data(sharding, a)
        else:
            out = jax.device_put(a, sharding)
        placed[id(a)] = out
        return out

    return Design(
        y=put(design.y),
        X=put(design.X),
        terms=tuple(TermData(index=put(t.index), covariates=put(t.covariates), n_levels=t.n_levels, unit=t.unit)
                    for t in design.terms),
        weights=None if design.weights is None else put(design.weights),
        offset=None if design.offset is None else put(design.offset),
    )


def make_problem(
    design: Design,
    spec: QSpec,
    *,
    likelihood: Likelihood = GAUSSIAN,
    fixed_sigma: float | None = None,
    pad: bool = False,
    with_block_data: bool = True,
    sharding=None,
    n_obs: int | None = None,
    q_family=None,
) -> Problem:
    """The kernels' :class:`Problem` for arrays and a layout of a q family, computing the q's design-only data
    (one compiled call).

    Args:
        design: the arrays (standardised by :func:`build_model`; any units work for the kernels).
        spec: q's layout (:data:`lmevi.q.registry.Q_FAMILIES`) with the data's level counts.
        likelihood: the response distribution.
        fixed_sigma: the fixed residual SD in the arrays' units, or ``None`` to estimate it.
        pad: pad rows and levels to their buckets (:func:`bucket`, :func:`pad_design`).
        with_block_data: compute the block data; ``False`` leaves ``block_data`` empty, for a model that no
            variational kernel runs on (``q="exact"``), so that building it compiles nothing.
        sharding: a ``jax.sharding.Sharding`` of the rows (:func:`row_sharding`) to place every per-row array
            with, after padding the rows to a multiple of its device count; needs ``pad=True``.
        n_obs: the number of observations (over every process, in a multi-process fit) when the arrays are
            already padded (as :func:`lmevi.fitting.scaling.standardise` makes them; each process's own rows then);
            ``None``: every row is an observation, and padding (``pad=True``) appends the rows.
    """
    backend_ready()  # JAX's backend, started beside the design stage (lmevi.runtime.xla.start_backend)
    n = design.y.shape[0] if n_obs is None else int(n_obs)
    level_mask = None
    if pad:
        levels = tuple(bucket(J, LEVEL_MIN) for J in spec.n_levels)
        level_mask = tuple(on_device(np.arange(P) < J, design.y.dtype) for P, J in zip(levels, spec.n_levels))
        n_devices = 1 if sharding is None else len(sharding.device_set)
        rows = padded_rows(n, n_devices) if n_obs is None else design.y.shape[0]
        design = pad_design(design, rows, levels)
        spec = dataclasses.replace(spec, n_levels=levels)
    elif sharding is not None:
        raise ValueError("sharding the rows needs pad=True (rows padded to a multiple of the devices)")
    q_family = q_registry.family("structured") if q_family is None else q_family
    design = place_rows(design, sharding)
    return Problem(
        design=design,
        block_data=_block_data(design, spec, q_family) if with_block_data else (),
        fixed_sigma=on_device(1.0 if fixed_sigma is None else fixed_sigma, design.y.dtype),
        n_rows=on_device(n, design.y.dtype),
        level_mask=level_mask,
        spec=spec,
        likelihood=likelihood,
        q=q_family,
        estimate_sigma=fixed_sigma is None,
    )


def _q_block_data(design: Design, spec, q_family):
    return q_family.block_data(design, spec)


_block_data = sized_jit(_q_block_data, static_argnums=(1, 2))
