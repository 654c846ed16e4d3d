r"""The block-Gaussian variational family over the random effects over the random effects (and, REML-like, beta).

q factorises across *blocks*. A block holds

* at most one *large* term ``L`` (``J_L`` levels, ``p_L`` coefficients each), whose levels are
  independent of each other given the rest of the block, and
* a *small* part ``w`` (``p_w`` numbers): the coefficients of a few small terms (all their levels) and,
  when ``reml=True``, the fixed effects beta; ``w`` is jointly Gaussian with a dense covariance.

Conditional parameterisation of one block (Goplerud, Papaspiliopoulos & Zanella 2024 call this family
partially factorised)::

    w          ~ N(m_w, U U^T)                                  U: (p_w, p_w) lower triangular
    b_Lj | w   ~ N(m_Lj + K_j (w - m_w), T_j T_j^T)             T_j: (p_L, p_L), K_j: (p_L, p_w)

It is the arrowhead-precision Gaussian of the notes in other coordinates: with
``Lambda = [[D, C], [C^T, A]]`` (``D`` block diagonal per level), ``T_j T_j^T = D_j^{-1}``,
``K_j = -D_j^{-1} C_j`` and ``U U^T = S^{-1}`` with the Schur complement ``S = A - sum_j C_j^T D_j^{-1} C_j``.
Everything the ELBO needs costs one pass over the rows (for the means) plus ``O(J_L p_L p_w^2 + p_w^3)``,
and no ``J_L x J_L`` matrix::

    Cov(b_Lj, w)  = K_j U U^T
    Var(b_Lj)     = T_j T_j^T + (K_j U)(K_j U)^T
    log|Cov q|    = 2 sum_j log|T_j| + 2 log|U|
    Var(eta_i)    = z^T (T_g T_g^T + G_g K_g^T) z + 2 z^T G_g w_i + w_i^T V w_i     (g = g_L(i), z = z_iL)

with ``V = U U^T`` and ``G_j = K_j V`` ``(p_L, p_w)``. Here ``w_i`` is row i of the small-part design ``W``
``(n_obs, p_w)`` (the level slots of the small terms times their covariates, and ``x_i`` when beta is in the
block), which is never formed: row i has non-zeros only in the slots of its own levels, so ``W m_w``,
``W^T r`` and the quadratic forms above are gathers and ``jax.ops.segment_sum`` over the level codes, as for
a large term. In particular ``w_i^T V w_i = sum_{k,l} z_ik^T V[slot_k(i), slot_l(i)] z_il`` over the small
terms and beta (beta's "level" is the same for every row), and the cross terms gather ``G`` at the pair of
levels ``(g_L(i), g_k(i))``; every table gathered has at most ``J_L J_k p_L p_k`` entries. Summed over the
rows, as the ELBO and the M-step need them, the variances are traces against the cross-products of
:class:`BlockData` (:func:`row_var_sum`) and take no pass over the rows at all.

The layouts (``q="meanfield"``, ``q="structured"``) are chosen in :mod:`lmevi.q.layout`; the moments are
computed in :mod:`lmevi.q.moments`. This module is the family's protocol module (:mod:`lmevi.q.protocol`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lmevi.frame.design import Design
from lmevi.q.model import LOG_2PI, ModelParams, log_abs_diag
from lmevi.q.protocol import VIParams
from lmevi.runtime.precision import wide
from lmevi.q.layout import Block, BlockParams, QSpec
from lmevi.q.moments import second_moment_sum
# the protocol's moment functions (lmevi.q.protocol), computed in lmevi.q.moments
from lmevi.q.moments import (  # noqa: F401
    block_data, fixed_moments, row_mean, row_moments, row_var_sum, term_moments,
)


# ----------------------------------------------------------------------------------------------------
# Choosing the blocks


# ----------------------------------------------------------------------------------------------------
# Design-only arrays


# ----------------------------------------------------------------------------------------------------
# Moments of q


def expected_log_prior(spec: QSpec, params: VIParams, level_mask=None) -> jax.Array:
    """``sum_k sum_j E_q[log N(b_kj | 0, Sigma_k)]`` (beta's flat prior adds nothing); returns ``()``.

    ``level_mask``: ``None``, or one ``(J_k,)`` 0/1 array per term; padding levels (0) add nothing."""
    total = 0.0
    for k, L in enumerate(params.model.chol):
        p = spec.n_coefs[k]
        mask = None if level_mask is None else level_mask[k]
        J = spec.n_levels[k] if mask is None else jnp.sum(mask)
        M = second_moment_sum(spec, params.blocks, k, mask)
        white = jax.scipy.linalg.solve_triangular(L, M, lower=True)
        trace = jnp.trace(jax.scipy.linalg.solve_triangular(L, white.T, lower=True))
        logdet = jnp.sum(log_abs_diag(L))
        total = total - 0.5 * J * p * LOG_2PI - J * logdet - 0.5 * trace
    return total


def small_coordinate_mask(spec: QSpec, block: Block, level_mask, dtype) -> jax.Array:
    """``(p_w,)`` 0/1: which coordinates of a block's small part belong to levels of the data (beta's do)."""
    parts = [jnp.repeat(level_mask[k].astype(dtype), spec.n_coefs[k]) for k in block.small]
    if block.fixed:
        parts.append(jnp.ones((spec.n_fixed,), dtype))
    return jnp.concatenate(parts)


def entropy(spec: QSpec, blocks, level_mask=None) -> jax.Array:
    """``sum_B H[q_B]``, with ``H[N(m, V)] = 1/2 log|2 pi e V|``; returns ``()``.

    With ``level_mask`` (see :func:`expected_log_prior`), padding levels add nothing. That is exact when they
    are independent of the rest under q, as block updates leave them (their rows of the design are zero):
    then each diagonal entry of a Cholesky factor belongs to one side, and ``log|V|`` splits."""
    total = 0.0
    for block, bp in zip(spec.blocks, blocks):
        dim = 0
        if bp.chol_large is not None:
            logs = log_abs_diag(bp.chol_large)
            if level_mask is None:
                total = total + jnp.sum(logs)
                dim += bp.chol_large.shape[0] * bp.chol_large.shape[1]
            else:
                mask = level_mask[block.large]
                total = total + jnp.sum(logs * mask[:, None])
                dim += jnp.sum(mask) * bp.chol_large.shape[1]
        if bp.chol_small is not None:
            logs = log_abs_diag(bp.chol_small)
            if level_mask is None:
                total = total + jnp.sum(logs)
                dim += bp.chol_small.shape[0]
            else:
                mask = small_coordinate_mask(spec, block, level_mask, logs.dtype)
                total = total + jnp.sum(logs * mask)
                dim += jnp.sum(mask)
        total = total + 0.5 * dim * (1.0 + LOG_2PI)
    return total


def sample(rng_key, spec: QSpec, blocks) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
    """One reparameterised draw from q.

    Returns:
        ``(effects, beta)``: one ``(J_k, p_k)`` array per term, and ``(p,)`` beta when it is in q (else None).
    """
    effects: list = [None] * len(spec.n_levels)
    beta = None
    keys = jax.random.split(rng_key, len(spec.blocks))
    for key, block, bp in zip(keys, spec.blocks, blocks):
        k_small, k_large = jax.random.split(key)
        w = None
        if bp.chol_small is not None:
            eps = jax.random.normal(k_small, bp.loc_small.shape, bp.loc_small.dtype)
            w = bp.loc_small + bp.chol_small @ eps
            offsets, at, _ = spec.small_offsets(block)
            for k in block.small:
                J, p = spec.n_levels[k], spec.n_coefs[k]
                effects[k] = w[offsets[k] : offsets[k] + J * p].reshape(J, p)
            if block.fixed:
                beta = w[at : at + spec.n_fixed]
        if block.large is not None:
            eps = jax.random.normal(k_large, bp.loc_large.shape, bp.loc_large.dtype)
            b = bp.loc_large + jnp.einsum("jpq,jq->jp", bp.chol_large, eps)
            if w is not None:
                b = b + jnp.einsum("jpw,w->jp", bp.coupling, w - bp.loc_small)
            effects[block.large] = b
    return tuple(effects), beta


# ----------------------------------------------------------------------------------------------------
# Initial values and the unconstrained coordinates the optax path moves in


def init_params(
    design: Design, spec: QSpec, likelihood, fixed_sigma, init_scale: float = 0.1, n_obs=None
) -> VIParams:
    """Starting point: beta and the residual SD from the likelihood's starting values (least squares for the
    Gaussian), every SD at half that residual SD, q at its prior mean with scale ``init_scale`` (numpyro's
    ``AutoNormal`` default), no coupling.

    ``fixed_sigma`` ``()`` fixes sigma (the tutorial's 1.0); ``None`` starts it at the likelihood's value.
    ``n_obs`` ``()``: the number of rows of the data when ``design`` carries zero padding rows after them.
    """
    y = design.y
    n = y.shape[0] if n_obs is None else n_obs
    prior = {k: v for k, v in (("weights", design.weights), ("offset", design.offset)) if v is not None}
    beta, resid_sd = likelihood.start(design.X, y, n, **prior)
    chol = []
    for term in design.terms:
        # padding rows are zero: the sums are the data's
        mean = jnp.sum(wide(term.covariates), axis=0).astype(y.dtype) / n
        sd = jnp.sqrt(jnp.maximum(jnp.sum(wide(term.covariates) ** 2, axis=0).astype(y.dtype) / n - mean**2, 0.0))
        spread = jnp.maximum(sd, 1.0)
        chol.append(jnp.diag(0.5 * resid_sd / spread))
    sigma = resid_sd if fixed_sigma is None else jnp.asarray(fixed_sigma, y.dtype)
    model = ModelParams(beta=None if spec.reml else beta, chol=tuple(chol), sigma=sigma)
    blocks = []
    for block in spec.blocks:
        loc_l = chol_l = coup = loc_s = chol_s = None
        pw = spec.small_size(block)
        if block.large is not None:
            J, p = spec.n_levels[block.large], spec.n_coefs[block.large]
            loc_l = jnp.zeros((J, p), y.dtype)
            chol_l = jnp.broadcast_to(init_scale * jnp.eye(p, dtype=y.dtype), (J, p, p))
            if pw:
                coup = jnp.zeros((J, p, pw), y.dtype)
        if pw:
            loc_s = jnp.zeros((pw,), y.dtype)
            if block.fixed:
                _, at, _ = spec.small_offsets(block)
                loc_s = loc_s.at[at : at + spec.n_fixed].set(beta)
            chol_s = init_scale * jnp.eye(pw, dtype=y.dtype)
        blocks.append(BlockParams(loc_l, chol_l, coup, loc_s, chol_s))
    return VIParams(model=model, blocks=tuple(blocks))


def _softplus_inv(x):
    return x + jnp.log(-jnp.expm1(-x))


def _tril_map(a, diag_fn):
    """Lower triangle of ``a`` (batched over leading axes) with ``diag_fn`` applied to the diagonal."""
    p = a.shape[-1]
    eye = jnp.eye(p, dtype=bool)
    low = jnp.tril(a, -1)
    d = diag_fn(jnp.diagonal(a, axis1=-2, axis2=-1))
    return low + jnp.where(eye, d[..., None, :] * jnp.ones_like(a), 0.0)


def to_unconstrained(params: VIParams) -> VIParams:
    """Map to the coordinates the optax path moves in: log of the model's SDs and of the Cholesky
    diagonals of Sigma_k, inverse softplus of q's Cholesky diagonals (the tutorial's ``softplus`` scales).
    """
    m = params.model
    model = ModelParams(
        beta=m.beta,
        chol=tuple(_tril_map(L, jnp.log) for L in m.chol),
        sigma=jnp.log(m.sigma),
    )
    blocks = tuple(
        bp._replace(
            chol_large=None if bp.chol_large is None else _tril_map(bp.chol_large, _softplus_inv),
            chol_small=None if bp.chol_small is None else _tril_map(bp.chol_small, _softplus_inv),
        )
        for bp in params.blocks
    )
    return VIParams(model=model, blocks=blocks)


def to_constrained(raw: VIParams, fixed_sigma) -> VIParams:
    """Inverse of :func:`to_unconstrained`; a fixed sigma ``fixed_sigma`` ``()`` (``None``: estimated)
    overrides sigma."""
    m = raw.model
    sigma = jnp.exp(m.sigma) if fixed_sigma is None else jnp.asarray(fixed_sigma, m.sigma.dtype)
    model = ModelParams(beta=m.beta, chol=tuple(_tril_map(L, jnp.exp) for L in m.chol), sigma=sigma)
    blocks = tuple(
        bp._replace(
            chol_large=None if bp.chol_large is None else _tril_map(bp.chol_large, jax.nn.softplus),
            chol_small=None if bp.chol_small is None else _tril_map(bp.chol_small, jax.nn.softplus),
        )
        for bp in raw.blocks
    )
    return VIParams(model=model, blocks=blocks)


# ----------------------------------------------------------------------------------------------------
# Padding levels (shape buckets, :mod:`lmevi.fitting.build`): masks and the map back to the data's levels


def coordinate_mask(spec: QSpec, params: VIParams, level_mask) -> VIParams:
    """0/1 arrays shaped as ``params``: 1 where a parameter belongs to the data, 0 where it belongs to a
    padding level (the model's point estimates are all 1)."""
    blocks = []
    for block, bp in zip(spec.blocks, params.blocks):
        ml = None if block.large is None else level_mask[block.large]
        mw = None if bp.loc_small is None else small_coordinate_mask(spec, block, level_mask, bp.loc_small.dtype)
        new = {}
        if ml is not None:
            new["loc_large"] = jnp.broadcast_to(ml[:, None], bp.loc_large.shape).astype(bp.loc_large.dtype)
            new["chol_large"] = jnp.broadcast_to(ml[:, None, None], bp.chol_large.shape).astype(bp.loc_large.dtype)
        if mw is not None:
            new["loc_small"] = mw
            new["chol_small"] = mw[:, None] * mw[None, :]
            if bp.coupling is not None:
                new["coupling"] = ml[:, None, None] * mw[None, None, :] * jnp.ones_like(bp.coupling)
        blocks.append(BlockParams(**{f: new.get(f) for f in BlockParams._fields}))
    model = jax.tree_util.tree_map(jnp.ones_like, params.model)
    return VIParams(model=model, blocks=tuple(blocks))


def unpad(params: VIParams, padded: QSpec, spec: QSpec) -> VIParams:
    """``params`` of the padded layout restricted to the data's levels (``spec``'s counts). Exact: padding
    levels are independent of the rest under q, so the Cholesky factors' rows and columns of the data's
    coordinates are those of the restricted covariance."""
    blocks = []
    for block, bp in zip(padded.blocks, params.blocks):
        keep = None
        if bp.loc_small is not None:
            offsets, at, _ = padded.small_offsets(block)
            parts = [np.arange(offsets[k], offsets[k] + spec.n_levels[k] * spec.n_coefs[k]) for k in block.small]
            if block.fixed:
                parts.append(np.arange(at, at + padded.n_fixed))
            keep = np.concatenate(parts)
        J = None if block.large is None else spec.n_levels[block.large]
        blocks.append(
            BlockParams(
                loc_large=None if J is None else bp.loc_large[:J],
                chol_large=None if J is None else bp.chol_large[:J],
                coupling=None if bp.coupling is None else bp.coupling[:J][:, :, keep],
                loc_small=None if keep is None else bp.loc_small[keep],
                chol_small=None if keep is None else bp.chol_small[np.ix_(keep, keep)],
            )
        )
    return VIParams(model=params.model, blocks=tuple(blocks))


# ----------------------------------------------------------------------------------------------------
# Units and given moments: what the stages outside q ask of it through the protocol


def blocks_to_data_units(spec: QSpec, blocks, term_scales, fixed_scale, fixed_shift) -> tuple:
    """q's blocks from standardised units to the data's (NumPy in, NumPy out). Block by block, with
    ``b_L = s_L b'_L`` and ``w = s_w w' + shift``: ``m_L = s_L m'_L``, ``T = diag(s_L) T'``,
    ``K = diag(s_L) K' diag(1 / s_w)``, ``m_w = s_w m'_w + shift``, ``U = diag(s_w) U'``.

    Args:
        spec: the layout.
        blocks: one :class:`BlockParams` per block (host arrays).
        term_scales: per term ``(p_k,)`` data units per standardised unit.
        fixed_scale, fixed_shift: ``(p,)`` each, beta's.
    """
    out = []
    for block, bp in zip(spec.blocks, blocks):
        dtype = next(a.dtype for a in bp if a is not None)
        s_large = None if block.large is None else np.asarray(term_scales[block.large], dtype)
        parts = [np.tile(term_scales[k], spec.n_levels[k]) for k in block.small]
        shift = [np.zeros(spec.n_levels[k] * spec.n_coefs[k]) for k in block.small]
        if block.fixed:
            parts.append(fixed_scale)
            shift.append(fixed_shift)
        new = bp
        if s_large is not None:
            new = new._replace(loc_large=bp.loc_large * s_large, chol_large=bp.chol_large * s_large[:, None])
        if parts:
            fw = np.asarray(np.concatenate(parts), dtype)
            new = new._replace(loc_small=bp.loc_small * fw + np.asarray(np.concatenate(shift), dtype),
                               chol_small=bp.chol_small * fw[:, None])
            if bp.coupling is not None:
                new = new._replace(coupling=bp.coupling * s_large[:, None] / fw)
        out.append(new)
    return tuple(out)


def psd_factor(cov) -> np.ndarray:
    """A lower-triangular ``L`` with ``L L^T = cov`` for (batched) positive semi-definite ``cov`` ``(..., p, p)``,
    also where Cholesky fails (a variance at zero makes ``condVar`` singular): ``L = R^T`` from the QR
    factorisation of ``(V sqrt(Lambda))^T``, ``cov = V Lambda V^T``."""
    cov = np.asarray(cov, np.float64)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        lam, V = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        B = V * np.sqrt(np.maximum(lam, 0.0))[..., None, :]
        return np.swapaxes(np.linalg.qr(np.swapaxes(B, -1, -2), mode="r"), -1, -2)


def from_moments(spec: QSpec, model: ModelParams, effects, effects_cov, beta, beta_cov) -> VIParams:
    """q holding given Gaussian moments, in a layout of one block per term (and beta's block under REML):
    per term ``(J_k, p_k)`` means and ``(J_k, p_k, p_k)`` covariances, beta's ``(p,)`` and ``(p, p)``."""
    blocks = []
    for block in spec.blocks:
        if block.small:
            raise ValueError("from_moments needs a layout of one block per term (meanfield_spec)")
        if block.large is not None:
            k = block.large
            blocks.append(BlockParams(effects[k], psd_factor(effects_cov[k]), None, None, None))
        else:  # beta's block (REML)
            blocks.append(BlockParams(None, None, None, beta, psd_factor(beta_cov)))
    return VIParams(model, tuple(blocks))
