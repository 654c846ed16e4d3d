r"""Scale-free fitting: fit on standardised columns, report in the data's units.

A linear mixed model is equivariant under a change of units: with

    y = c + s_y y',   X_j = s_xj X'_j,   z_ka = s_ka z'_ka     (c only when 1 is a column of X)

the model for ``y'`` has ``beta'_j = (beta_j - c a_j) s_xj / s_y``, ``b'_ka = b_ka s_ka / s_y``,
``Sigma'_k = D_k Sigma_k D_k / s_y^2`` (``D_k = diag(s_k) / s_y``) and ``sigma' = sigma / s_y``, where
``X a = 1``. Coordinate ascent is equivariant in exact arithmetic, but its starting point, step-size-free
thresholds and floating point are not: a slope covariate in units a million times too small left the slope
variance at its starting value. So every fit runs on the standardised design (``s_y`` the SD of ``y``, ``c``
its mean; ``s_x`` and ``s_k`` the columns' SDs, or their absolute value for a constant column such as the
intercept) and the result is mapped back here. The convergence and singular-fit checks then read
standardised numbers and mean the same whatever the units.

The ELBO maps back with the Jacobian of ``y``, and under REML-like fits (beta in q with a flat prior) with
the Jacobian of beta too, as lme4's REML criterion depends on the units of ``X``::

    ELBO = ELBO' - n log s_y  [+ sum_j log(s_y / s_xj) when beta is in q]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lmevi.runtime.precision import RowBuffers, aligned_zeros, to_host
from lmevi.runtime.collective import LOCAL, Local
from lmevi.frame.design import Design, TermData
from lmevi.frame.matrix import column_sd
from lmevi.q.protocol import VIParams
from lmevi.q.model import ModelParams


class Scales(NamedTuple):
    """The change of units between the data and the standardised design (host-side NumPy).

    Attributes:
        y_shift: ``c``, subtracted from ``y`` (0 when no column of ``X`` is constant).
        y_scale: ``s_y``.
        shift_coef: ``(p,)`` the ``a`` with ``X a = 1`` (zeros when ``c = 0``).
        x_scale: ``(p,)`` ``s_x``.
        z_scale: one ``(p_k,)`` ``s_k`` per random term.
    """

    y_shift: float
    y_scale: float
    shift_coef: np.ndarray
    x_scale: np.ndarray
    z_scale: tuple[np.ndarray, ...]


def _ranges(M: np.ndarray, collective: Local = LOCAL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(min, max, first row)`` of the columns of ``M`` ``(n, p)``, over every process's rows in a
    multi-process fit (the first row is then process 0's). Column by column, as :func:`column_sd`: NumPy's
    ``min(axis=0)`` of an ``(n, p)`` array with few columns is over ten times slower than of each column."""
    cols = [M[:, j] for j in range(M.shape[1])]
    lo = collective.min(np.array([c.min() for c in cols], dtype=M.dtype))
    hi = collective.max(np.array([c.max() for c in cols], dtype=M.dtype))
    return lo, hi, collective.gather(M[0])[0]


def _column_scale(M: np.ndarray, ranges, collective: Local = LOCAL) -> np.ndarray:
    """SD of each column, or its absolute value where the column is constant (an intercept); ``ranges`` is
    :func:`_ranges` of ``M``."""
    lo, hi, first = ranges
    const = np.abs(first)
    if np.all(lo == hi):  # every column constant (an intercept-only term): no variance to compute
        return np.where(const > 0, const, 1.0)
    sd, big = np.zeros(M.shape[1]), np.maximum(np.abs(lo), np.abs(hi))
    varying = np.flatnonzero(lo != hi)  # a constant column's SD is 0: no pass over its rows
    sd[varying] = column_sd(M, collective, varying)
    scale = np.where(sd > 1e-12 * np.maximum(big, 1e-300), sd, const)
    return np.where(scale > 0, scale, 1.0)


def _padded(a: np.ndarray, n_rows: int, dtype, scale=None, buffers: RowBuffers | None = None) -> np.ndarray:
    """``a`` (divided column by column by ``scale``, when given) as a C-ordered array of ``dtype`` with zero
    rows appended up to ``n_rows``: one allocation of the final array. At 10^7 rows fresh memory is the cost
    of this stage (page faults), so no intermediate copy is made; and none at all where ``a`` is the head of a
    padded array of ``buffers`` (:class:`lmevi.runtime.precision.RowBuffers`): that array is divided in place (only its
    columns whose scale is not 1; ``x / s`` elementwise either way, so the same numbers) and returned."""
    whole = None if buffers is None else buffers.whole(a)
    # a buffer padded otherwise (q="exact" takes no padding rows) is copied below
    if whole is not None and whole.shape[0] == n_rows and whole.dtype == np.dtype(dtype):
        buffers.take(a)
        if scale is not None:
            head = whole[: a.shape[0]]
            for j in np.flatnonzero(np.asarray(scale) != 1.0):
                head[:, j] /= scale[j]
        return whole
    a = np.asarray(a)
    n = a.shape[0]
    out = aligned_zeros((n_rows,) + a.shape[1:], dtype)
    head = out[:n]
    if scale is None or not np.any(scale != 1.0):
        head[...] = a
    elif out.dtype == np.float64:
        np.divide(a, scale, out=head)
    else:  # divide in float64, then round once
        head[...] = np.asarray(a, np.float64) / scale
    return out


def standardise(
    design: Design, n_rows: int | None = None, collective: Local = LOCAL, buffers: RowBuffers | None = None,
    scale_y: bool = True,
) -> tuple[Design, Scales]:
    """The design in standardised units, and the scales that map back.

    Args:
        design: arrays in the data's units, ``n`` rows.
        n_rows: the row count of the result: ``n_rows - n`` zero rows (y, X, covariates 0, level code 0) are
            appended, as :func:`lmevi.fitting.build.pad_design` would, but without a second copy. ``None``: ``n``.
        collective: in a multi-process fit, the processes whose rows together set the scales (each
            process standardises its own rows with them).
        buffers: the :class:`lmevi.runtime.precision.RowBuffers` that the design's arrays were made in, if any: those
            arrays are standardised in place (``design`` then holds standardised numbers afterwards; pass it
            only for a design nothing else reads).
        scale_y: centre and scale the response (``False``: ``c = 0``, ``s_y = 1``, for a likelihood whose
            response has units of its own, :mod:`lmevi.fitting.glmm`).

    Returns:
        ``(scaled, scales)``: ``scaled`` has ``y' = (y - c) / s_y``, ``X' = X / s_x``, ``z'_k = z_k / s_k``;
        the scales are computed from the ``n`` rows of ``design`` only.
    """
    y = np.asarray(design.y, dtype=np.float64)
    X = np.asarray(design.X, dtype=np.float64)
    n = y.shape[0]
    n_rows = n if n_rows is None else int(n_rows)
    if n_rows < n:
        raise ValueError(f"n_rows={n_rows} is below the design's {n} rows")
    x_ranges = _ranges(X, collective)
    x_scale = _column_scale(X, x_ranges, collective)
    lo, hi, first = x_ranges
    const = [j for j in range(X.shape[1]) if lo[j] == hi[j] and first[j] != 0]
    shift_coef = np.zeros(X.shape[1])
    y_shift = 0.0
    if const:
        j = const[0]
        shift_coef[j] = 1.0 / first[j]
        if scale_y:
            y_shift = float(collective.sum(y.sum()) / collective.sum(n))
    y_scale = float(column_sd(y[:, None], collective)[0]) if scale_y else 1.0  # the SD of y - c
    if not y_scale > 0:
        y_scale = 1.0
    z_ranges, z_scale, seen = [], [], {}
    for t in design.terms:  # one float64 view (a copy for float32 designs) of each term's covariates at a time
        if id(t.covariates) not in seen:  # terms that share one array (intercepts: build_design) share its scale
            if t.unit:  # the row weight, all ones on these rows: nothing to scan
                one = np.ones(1)
                seen[id(t.covariates)] = ((one, one, one), one)
            else:
                z = np.asarray(t.covariates, dtype=np.float64)
                ranges = _ranges(z, collective)
                seen[id(t.covariates)] = (ranges, _column_scale(z, ranges, collective))
        z_ranges.append(seen[id(t.covariates)][0])
        z_scale.append(seen[id(t.covariates)][1])
    z_scale = tuple(z_scale)
    # one constant column, scaled to exactly 1 (padding rows 0): the row weight (TermData.unit)
    unit = [bool(lo.shape == (1,) and lo[0] == hi[0] != 0 and lo[0] / s[0] == 1.0)
            for (lo, hi, _), s in zip(z_ranges, z_scale)]
    dtype = design.y.dtype
    # every such term's covariates are the same row weight (a constant column over its own scale is exactly 1,
    # then 0 on padding rows): one array for all of them (and one device copy, build.place_rows), made without
    # reading theirs
    weight = None
    if any(unit):
        weight = aligned_zeros((n_rows, 1), dtype)
        weight[:n] = 1.0
    y_out = aligned_zeros(n_rows, dtype)
    if y_out.dtype == np.float64:
        np.subtract(y, y_shift, out=y_out[:n])
        y_out[:n] /= y_scale
    else:  # in float64, then rounded once
        y_out[:n] = (y - y_shift) / y_scale
    # (array, dtype, scale) -> its standardised array: fields that share an array and its scale share the result
    done: dict = {}

    def padded(a, dtype, scale=None):
        key = (id(a), np.dtype(dtype).str, None if scale is None else tuple(np.asarray(scale, np.float64).tolist()))
        if key not in done:
            done[key] = (a, _padded(a, n_rows, dtype, scale, buffers))
        return done[key][1]

    scaled = Design(
        y=y_out,
        X=padded(design.X, dtype, x_scale),
        terms=tuple(
            TermData(index=padded(t.index, np.asarray(t.index).dtype),
                     covariates=weight if u else padded(t.covariates, dtype, s), n_levels=t.n_levels, unit=u)
            for t, s, u in zip(design.terms, z_scale, unit)
        ),
        weights=None if design.weights is None else _padded(design.weights, n_rows, dtype),
        # an offset is in the response's units: y - c = offset + X beta + ... (c a multiple of the intercept)
        offset=None if design.offset is None else _padded(np.asarray(design.offset, np.float64) / y_scale, n_rows,
                                                          dtype),
    )
    return scaled, Scales(y_shift, y_scale, shift_coef, x_scale, z_scale)


def to_data_units(params: VIParams, spec, scales: Scales, q) -> VIParams:
    """Map point estimates and q from standardised units back to the data's (see the module docstring): the
    model's here, q's blocks by the q family (``q.blocks_to_data_units``) with each term's coefficient scales
    ``s_y / s_k`` and beta's scale ``s_y / s_x`` and shift. On the host: returns NumPy arrays (new shapes
    compile nothing)."""
    params = to_host(params)
    m = params.model
    dtype = m.sigma.dtype
    sy = scales.y_scale
    fixed_scale = sy / scales.x_scale
    fixed_shift = scales.y_shift * scales.shift_coef
    beta = None
    if m.beta is not None:
        beta = m.beta * np.asarray(fixed_scale, dtype) + np.asarray(fixed_shift, dtype)
    term_scales = [sy / s for s in scales.z_scale]
    chol = tuple(L * np.asarray(f, dtype)[:, None] for L, f in zip(m.chol, term_scales))
    model = ModelParams(beta=beta, chol=chol, sigma=m.sigma * sy)
    blocks = q.blocks_to_data_units(spec, params.blocks, term_scales, fixed_scale, fixed_shift)
    return VIParams(model=model, blocks=tuple(blocks))


def beta_cov_to_data_units(cov: np.ndarray, scales: Scales) -> np.ndarray:
    """A ``(p, p)`` covariance of beta from standardised units to the data's: ``beta = d beta' + shift`` with
    ``d = s_y / s_x``, so ``cov = diag(d) cov' diag(d)``."""
    d = np.asarray(scales.y_scale / scales.x_scale, np.float64)
    return np.asarray(cov, np.float64) * np.outer(d, d)


def elbo_offset(scales: Scales, n_obs: int, reml: bool) -> float:
    """What to add to a standardised ELBO to get the data's: ``-n log s_y`` (plus beta's Jacobian under
    REML-like fits)."""
    out = -n_obs * np.log(scales.y_scale)
    if reml:
        out += float(np.sum(np.log(scales.y_scale / scales.x_scale)))
    return float(out)


def relative_chol(chol: tuple, sigma: float, scales: Scales) -> tuple[np.ndarray, ...]:
    """lme4's relative covariance factors in standardised units, ``diag(s_k) L_k / sigma``: unit-free, what the
    singular-fit rules read."""
    return tuple(np.asarray(L, np.float64) * s[:, None] / sigma for L, s in zip(chol, scales.z_scale))
