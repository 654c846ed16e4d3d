r"""Coordinate ascent: closed-form block updates of q and the M-step of variational EM.

Each step maximises the closed-form ELBO exactly in one group of variables with the rest held fixed, so
the ELBO never decreases (Bishop 2006, sec. 10.1; Blei, Kucukelbir & McAuliffe 2017, CAVI).

Block update (one large term L plus small part w; see :mod:`lmevi.q.variational`). With ``r`` the response minus
everything outside the block, the optimal q_B is Gaussian with precision ``Lambda = [[D, C], [C^T, A]]``::

    D_j = sum_{i in j} z_i z_i^T / sigma^2 + Sigma_L^{-1}        (p_L x p_L per level)
    C_j = sum_{i in j} z_i w_i^T / sigma^2                        (p_L x p_w per level)
    A   = W^T W / sigma^2 + blockdiag(Sigma_s^{-1} per small level; 0 for beta's flat prior)
    h_L = segment_sum(z_i r_i) / sigma^2,   h_w = W^T r / sigma^2

``W`` is never formed: ``W^T r`` is one segment sum per small term plus ``X^T r``, and the cross-products
``C_j`` and ``W^T W`` come once per fit from :func:`lmevi.q.moments.block_data`.

and, through the Schur complement ``S = A - sum_j C_j^T D_j^{-1} C_j``,
``m_w = S^{-1}(h_w - sum_j C_j^T D_j^{-1} h_Lj)``, ``m_Lj = D_j^{-1}(h_Lj - C_j m_w)``,
``K_j = -D_j^{-1} C_j``, ``T_j T_j^T = D_j^{-1}``, ``U U^T = S^{-1}``.

M-step given q: ``beta = (X^T X)^{-1} X^T (y - E eta)`` when beta is a point estimate,
``Sigma_k = (1/J_k) sum_j E_q[b_kj b_kj^T]``, ``sigma^2 = (1/n) sum_i E_q[(y_i - x_i beta - eta_i)^2]``
(skipped when sigma is fixed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmevi.q import elbo as elbo_lib
from lmevi.q import variational
from lmevi.q import moments
from lmevi.frame.design import Design
from lmevi.q.layout import Block, BlockData, BlockParams, QSpec
from lmevi.q.variational import VIParams
from lmevi.q.model import ModelParams
from lmevi.runtime.precision import row_dot, row_gram


def _prior_precision(L: jax.Array) -> jax.Array:
    """``Sigma^{-1}`` from its lower Cholesky factor ``L``; ``(p, p)``."""
    eye = jnp.eye(L.shape[0], dtype=L.dtype)
    return jax.scipy.linalg.cho_solve((L, True), eye)


def small_prior_precision(spec: QSpec, block: Block, chol: tuple[jax.Array, ...], dtype) -> jax.Array:
    """Block-diagonal prior precision of the small part ``w``; zeros for beta. ``(p_w, p_w)``."""
    parts = []
    for k in block.small:
        parts.append(jnp.kron(jnp.eye(spec.n_levels[k], dtype=dtype), _prior_precision(chol[k])))
    if block.fixed:
        parts.append(jnp.zeros((spec.n_fixed, spec.n_fixed), dtype))
    return jax.scipy.linalg.block_diag(*parts)


# Per-level p_L x p_L systems of a large term: XLA's CPU Cholesky and triangular solves call LAPACK once per
# matrix (~0.5 us each: 20 ms for InstEval's 40,000 students), so for small p_L the textbook recursions are
# written out as elementwise operations over all levels at once.
_UNROLL_MAX = 4


def _batched_cholesky(D: jax.Array) -> jax.Array:
    """Lower Cholesky factors of ``(J, p, p)`` symmetric positive-definite matrices (symmetrised first)."""
    p = D.shape[-1]
    D = 0.5 * (D + jnp.swapaxes(D, 1, 2))
    if p > _UNROLL_MAX:
        return jnp.linalg.cholesky(D)
    L = [[None] * p for _ in range(p)]
    for i in range(p):
        for r in range(i, p):
            acc = D[:, r, i]
            for k in range(i):
                acc = acc - L[r][k] * L[i][k]
            L[r][i] = jnp.sqrt(acc) if r == i else acc / L[i][i]
    zero = jnp.zeros_like(D[:, 0, 0])
    return jnp.stack([jnp.stack([L[r][c] if c <= r else zero for c in range(p)], -1) for r in range(p)], -2)


def _batched_cho_solve(L: jax.Array, B: jax.Array) -> jax.Array:
    """``(L_j L_j^T)^{-1} B_j`` for ``L`` ``(J, p, p)`` and ``B`` ``(J, p)`` or ``(J, p, m)``."""
    p = L.shape[-1]
    if p > _UNROLL_MAX:
        return jax.vmap(lambda c, b: jax.scipy.linalg.cho_solve((c, True), b))(L, B)
    vec = B.ndim == 2
    if vec:
        B = B[:, :, None]
    y = []
    for i in range(p):
        acc = B[:, i]
        for k in range(i):
            acc = acc - L[:, i, k, None] * y[k]
        y.append(acc / L[:, i, i, None])
    x = [None] * p
    for i in reversed(range(p)):
        acc = y[i]
        for k in range(i + 1, p):
            acc = acc - L[:, k, i, None] * x[k]
        x[i] = acc / L[:, i, i, None]
    out = jnp.stack(x, axis=1)
    return out[:, :, 0] if vec else out


def update_block(
    design: Design, spec: QSpec, block: Block, bd: BlockData, model: ModelParams, resid: jax.Array
) -> BlockParams:
    """The optimal q for one block given everything else.

    Args:
        design: the model's arrays.
        spec: the family.
        block: which block.
        bd: its design-only arrays.
        model: current point estimates.
        resid: ``(n_obs,)`` response minus the fixed part and the other blocks' means.

    Returns:
        The block's new :class:`BlockParams`.
    """
    dtype = design.y.dtype
    # A block with a small part is solved in float64 also in a float32 fit, inputs widened and results rounded
    # back: its Schur complement S is a difference of sums over the large term's levels that nearly cancel where
    # the small terms' columns add up to the intercept (departments within instructors). At 1e8 rows a float32
    # S was indefinite at the first sweep. With only S's algebra in float64 (per-level solves and sums over rows
    # in float32) the small part was 0.07-0.1 posterior SDs off in tests/test_cavi.py's heaviest case, against
    # 0.024 solved wholly in float64, at no measurable cost (1.5 million levels). Blocks without a small part
    # keep the fit's dtype.
    work = jnp.float64 if bd.WtW is not None else dtype
    s2 = (model.sigma**2).astype(work)
    loc_l = chol_l = coup = loc_s = chol_s = None
    if block.large is not None:
        term = design.terms[block.large]
        D = bd.ZtZ.astype(work) / s2 + _prior_precision(model.chol[block.large].astype(work))
        h_l = moments.weighted_level_sums(term.covariates, resid, term.index, term.n_levels, term.unit, work)
        cD = _batched_cholesky(D)
        d_h = _batched_cho_solve(cD, h_l / s2)
    if bd.WtW is not None:
        chol = tuple(L.astype(work) for L in model.chol)
        A = bd.WtW.astype(work) / s2 + small_prior_precision(spec, block, chol, work)
        rhs = moments.small_crossprod(design, spec, block, resid, work) / s2
        if block.large is not None:
            C = bd.ZtW.astype(work) / s2
            d_c = _batched_cho_solve(cD, C)
            A = A - jnp.einsum("jpw,jpv->wv", C, d_c)
            rhs = rhs - jnp.einsum("jpw,jp->w", C, d_h)
        S = 0.5 * (A + A.T)
        cS = jnp.linalg.cholesky(S)
        loc_s = jax.scipy.linalg.cho_solve((cS, True), rhs)
        V = jax.scipy.linalg.cho_solve((cS, True), jnp.eye(S.shape[0], dtype=work))
        chol_s = jnp.linalg.cholesky(0.5 * (V + V.T)).astype(dtype)
    if block.large is not None:
        p = D.shape[-1]
        eye = jnp.broadcast_to(jnp.eye(p, dtype=work), D.shape)
        d_inv = _batched_cho_solve(cD, eye)
        chol_l = _batched_cholesky(d_inv).astype(dtype)
        loc_l = d_h
        if bd.WtW is not None:
            coup = (-d_c).astype(dtype)
            loc_l = d_h - jnp.einsum("jpw,w->jp", d_c, loc_s)
        loc_l = loc_l.astype(dtype)
    loc_s = None if loc_s is None else loc_s.astype(dtype)
    return BlockParams(loc_l, chol_l, coup, loc_s, chol_s)


def supports(problem) -> bool:
    """Whether coordinate ascent's closed-form updates hold: the block-Gaussian q of :mod:`lmevi.q.variational`
    under a likelihood whose expected log-density is a function of the rows' mean and variance sums (the
    Gaussian one; :mod:`lmevi.families.base`)."""
    return problem.q.implementation is variational and problem.likelihood.moment_form


def update_blocks(problem, params: VIParams) -> VIParams:
    """One pass of block updates, in order, each against the latest means of the others."""
    return _update_blocks(problem, params)[0]


def _update_blocks(problem, params: VIParams) -> tuple[VIParams, jax.Array]:
    """:func:`update_blocks`, also returning the new ``E_q`` of every row's random part ``(n_obs,)``.

    Block i is updated against the new means of the blocks before it plus the old means of those after it,
    summed directly (not as a total minus its own mean): the first block's old mean is then never needed.
    """
    design, spec, data = problem.design, problem.spec, problem.block_data
    base = design.y - elbo_lib.fixed_part(design, params)
    blocks = list(params.blocks)
    n_blocks = len(spec.blocks)
    after: list = [None] * n_blocks  # after[i]: sum of the old means of blocks i+1, ...
    acc = None
    for i in range(n_blocks - 1, 0, -1):
        after[i] = acc
        mean = moments.block_mean(design, spec.blocks[i], blocks[i], data[i])
        acc = mean if acc is None else acc + mean
    after[0] = acc
    before = None  # sum of the new means of blocks 0, ..., i-1
    for i, block in enumerate(spec.blocks):
        others = after[i] if before is None else (before if after[i] is None else before + after[i])
        resid = base if others is None else base - others
        blocks[i] = update_block(design, spec, block, data[i], params.model, resid)
        mean = moments.block_mean(design, block, blocks[i], data[i])
        before = mean if before is None else before + mean
    return VIParams(model=params.model, blocks=tuple(blocks)), before


def m_step(problem, params: VIParams) -> tuple[VIParams, jax.Array]:
    """Closed-form point estimates given q, and the ELBO at the result.

    Returns:
        ``(params, elbo)`` with ``elbo`` ``()`` the closed-form ELBO after the update.
    """
    return _m_step(problem, params, moments.row_mean(problem.design, problem.spec, params.blocks))


def _m_step(problem, params: VIParams, mean: jax.Array):
    """:func:`m_step` given the rows' ``E_q`` of the random part, ``mean`` ``(n_obs,)``.

    The rows' variances enter only through their sum, which :func:`lmevi.q.moments.row_var_sum` takes from the
    per-level cross-products: the M-step's one pass over the rows is the residual sum of squares.
    """
    design, spec, data = problem.design, problem.spec, problem.block_data
    model = params.model
    beta = model.beta
    if beta is not None:
        beta = jnp.linalg.solve(row_gram(design.X), row_dot(design.y - mean, design.X))
        resid = design.y - design.X @ beta - mean
    else:
        resid = design.y - mean
    n = problem.n_obs
    sq, vs = elbo_lib.sum_of_squares(resid), moments.row_var_sum(spec, params.blocks, data)
    sigma = jnp.sqrt((sq + vs) / n) if problem.estimate_sigma else model.sigma
    chol = []
    masks = problem.level_mask
    for k in range(len(spec.n_levels)):
        mask = None if masks is None else masks[k]
        J = spec.n_levels[k] if mask is None else jnp.sum(mask)
        cov = moments.second_moment_sum(spec, params.blocks, k, mask) / J
        chol.append(jnp.linalg.cholesky(0.5 * (cov + cov.T)))
    new = VIParams(model=ModelParams(beta=beta, chol=tuple(chol), sigma=sigma), blocks=params.blocks)
    value = problem.likelihood.expected_log_lik_from_sums(sq, vs, n, sigma) + elbo_lib.kl_part(problem, new)
    return new, value


def sweep(problem, params: VIParams):
    """Block updates then the M-step; returns ``(params, elbo)``. The M-step reuses the rows' means that
    the block updates end with, so a sweep makes one pass over the rows per block and one more."""
    params, mean = _update_blocks(problem, params)
    return _m_step(problem, params, mean)
