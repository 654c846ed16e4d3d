r"""Family stage: Gaussian variational families over the random effects (and, REML-like, beta).

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
Everything the ELBO needs costs ``O(n_obs p_w + J_L p_L p_w^2 + p_w^3)`` and no ``J_L x J_L`` matrix::

    Cov(b_Lj, w)  = K_j U U^T
    Var(b_Lj)     = T_j T_j^T + (K_j U)(K_j U)^T
    log|Cov q|    = 2 sum_j log|T_j| + 2 log|U|
    Var(eta_i)    = |T_g^T z_iL|^2 + |U^T (K_g^T z_iL + w_i)|^2         (g = g_L(i))

where ``w_i`` is row i of the small-part design ``W`` ``(n_obs, p_w)``: the one-hot level slots of the small
terms times their covariates, and ``x_i`` when beta is in the block.

* ``family="meanfield"``: every term is its own block with no small part (the Edward tutorial's fully
  factorised normal when every term is a random intercept; with slopes, a full ``p_k x p_k`` covariance
  per level), and beta, if in q, a block of its own.
* ``family="structured"``: each small term (``J_k p_k <= small_threshold``) joins the block of the large
  term it is most nested in (share of its rows explained by the large term's levels, 1.0 for exact
  nesting); beta joins the block with the most entangled small terms. Without large terms everything is
  one dense block, and q is then the exact conditional posterior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmevi.design import Design, DesignInfo
from lmevi.model import LOG_2PI, ModelParams


@dataclass(frozen=True)
class Block:
    """Which coefficients share one Gaussian factor of q.

    Attributes:
        large: index of the large term, or ``None``.
        small: indices of the small terms, in order.
        fixed: whether beta is in this block (REML-like fits).
    """

    large: int | None
    small: tuple[int, ...] = ()
    fixed: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """Static description of q: the blocks plus the shapes they need (hashable, used as a jit key).

    Attributes:
        name: ``"meanfield"`` or ``"structured"``.
        blocks: the blocks; every term is in exactly one, beta in at most one.
        n_levels: ``(K,)`` levels per term.
        n_coefs: ``(K,)`` coefficients per term.
        n_fixed: number of fixed effects.
        reml: whether beta is in q (flat prior) rather than a point estimate.
    """

    name: str
    blocks: tuple[Block, ...]
    n_levels: tuple[int, ...]
    n_coefs: tuple[int, ...]
    n_fixed: int
    reml: bool

    def small_offsets(self, block: Block) -> tuple[dict[int, int], int, int]:
        """Offsets in ``w`` of each small term and of beta, and ``p_w``."""
        offsets, pos = {}, 0
        for k in block.small:
            offsets[k] = pos
            pos += self.n_levels[k] * self.n_coefs[k]
        fixed_at = pos
        if block.fixed:
            pos += self.n_fixed
        return offsets, fixed_at, pos

    def small_size(self, block: Block) -> int:
        return self.small_offsets(block)[2]

    def block_of(self, term: int) -> int:
        for i, b in enumerate(self.blocks):
            if b.large == term or term in b.small:
                return i
        raise KeyError(term)

    def fixed_block(self) -> int | None:
        for i, b in enumerate(self.blocks):
            if b.fixed:
                return i
        return None


class BlockParams(NamedTuple):
    """Parameters of one block of q (see the module docstring); absent parts are ``None``.

    Attributes:
        loc_large: ``(J_L, p_L)`` conditional means ``m_L``.
        chol_large: ``(J_L, p_L, p_L)`` lower-triangular ``T_j``.
        coupling: ``(J_L, p_L, p_w)`` regression of ``b_L`` on ``w``, ``K_j``.
        loc_small: ``(p_w,)`` mean ``m_w``.
        chol_small: ``(p_w, p_w)`` lower-triangular ``U``.
    """

    loc_large: jax.Array | None
    chol_large: jax.Array | None
    coupling: jax.Array | None
    loc_small: jax.Array | None
    chol_small: jax.Array | None


class VIParams(NamedTuple):
    """All that variational EM estimates: point estimates of the model and the blocks of q."""

    model: ModelParams
    blocks: tuple[BlockParams, ...]


class BlockData(NamedTuple):
    """Design-only arrays of one block, computed once per fit.

    Attributes:
        W: ``(n_obs, p_w)`` small-part design, or ``None`` when ``p_w = 0``.
        ZtZ: ``(J_L, p_L, p_L)`` per-level ``sum_i z_i z_i^T`` of the large term, or ``None``.
        ZtW: ``(J_L, p_L, p_w)`` per-level ``sum_i z_i w_i^T``, or ``None``.
        WtW: ``(p_w, p_w)``, or ``None``.
    """

    W: jax.Array | None
    ZtZ: jax.Array | None
    ZtW: jax.Array | None
    WtW: jax.Array | None


# ----------------------------------------------------------------------------------------------------
# Choosing the blocks


def meanfield_spec(info: DesignInfo, reml: bool) -> FamilySpec:
    """Every term its own block, beta (if in q) a block of its own."""
    n_terms = len(info.terms)
    blocks = [Block(large=k) for k in range(n_terms)]
    if reml:
        blocks.append(Block(large=None, fixed=True))
    return _spec("meanfield", info, blocks, reml)


def entanglement(design: Design, small: int, large: int) -> float:
    """Share of the rows of term ``small`` explained by the levels of term ``large``.

    For each level of ``large``, count its rows at its most common level of ``small``; divide the sum by
    ``n_obs``. It is 1.0 when ``large`` is nested in ``small`` (every instructor in one department).
    """
    gs = np.asarray(design.terms[small].index, dtype=np.int64)
    gl = np.asarray(design.terms[large].index, dtype=np.int64)
    js = design.terms[small].n_levels
    counts = np.bincount(gl * js + gs, minlength=design.terms[large].n_levels * js)
    return float(counts.reshape(-1, js).max(axis=1).sum() / len(gs))


def structured_spec(
    design: Design, info: DesignInfo, reml: bool, small_threshold: int = 50, blocks=None
) -> FamilySpec:
    """Blocks of the structured family, chosen from the data unless ``blocks`` names them.

    Args:
        design: the arrays (for the nesting shares).
        info: labels of the terms.
        reml: whether beta joins q.
        small_threshold: a term with ``J_k p_k <= small_threshold`` is small.
        blocks: optional override, a sequence of tuples of grouping-factor names (as lme4 prints them);
            a tuple may also contain ``"fixed"`` to put beta there when ``reml=True``.

    Returns:
        The :class:`FamilySpec`.
    """
    size = [t.n_levels * t.n_coefs for t in info.terms]
    if blocks is not None:
        return _spec("structured", info, _user_blocks(info, size, reml, small_threshold, blocks), reml)
    large = [k for k, s in enumerate(size) if s > small_threshold]
    small = [k for k, s in enumerate(size) if s <= small_threshold]
    if not large:
        return _spec("structured", info, [Block(large=None, small=tuple(small), fixed=reml)], reml)
    members: dict[int, list[int]] = {k: [] for k in large}
    best_share: dict[int, float] = {k: -1.0 for k in large}
    for s in small:
        shares = {k: entanglement(design, s, k) for k in large}
        host = max(large, key=lambda k: (shares[k], -size[k]))
        members[host].append(s)
        best_share[host] = max(best_share[host], shares[host])
    fixed_host = None
    if reml:
        with_small = [k for k in large if members[k]]
        pool = with_small or large
        fixed_host = max(pool, key=lambda k: (best_share[k], -size[k]))
    out = [Block(large=k, small=tuple(members[k]), fixed=(k == fixed_host)) for k in large]
    return _spec("structured", info, out, reml)


def _user_blocks(info, size, reml, small_threshold, blocks):
    names = {t.group: k for k, t in enumerate(info.terms)}
    if len(names) != len(info.terms):
        raise ValueError("blocks= needs distinct grouping-factor names; two terms share one here")
    seen: set[int] = set()
    fixed_seen = False
    out = []
    for group in blocks:
        group = (group,) if isinstance(group, str) else tuple(group)
        ks = []
        has_fixed = False
        for name in group:
            if name == "fixed":
                if not reml:
                    raise ValueError("'fixed' can join a block only with reml=True (beta is then in q)")
                has_fixed = True
                continue
            if name not in names:
                raise ValueError(f"blocks= names {name!r}, which is not a grouping factor of the formula")
            k = names[name]
            if k in seen:
                raise ValueError(f"blocks= lists {name!r} twice")
            seen.add(k)
            ks.append(k)
        large = [k for k in ks if size[k] > small_threshold]
        if len(large) > 1:
            raise ValueError(
                f"a block can hold one large factor (more than {small_threshold} coefficients); "
                f"{[info.terms[k].group for k in large]} are all large"
            )
        big = large[0] if large else None
        out.append(Block(large=big, small=tuple(k for k in ks if k != big), fixed=has_fixed))
        fixed_seen |= has_fixed
    out.extend(Block(large=k) for k in range(len(info.terms)) if k not in seen)  # unnamed terms: own block
    if reml and not fixed_seen:
        out.append(Block(large=None, fixed=True))
    return out


def _spec(name, info: DesignInfo, blocks, reml) -> FamilySpec:
    return FamilySpec(
        name=name,
        blocks=tuple(blocks),
        n_levels=tuple(t.n_levels for t in info.terms),
        n_coefs=tuple(t.n_coefs for t in info.terms),
        n_fixed=len(info.fixed_names),
        reml=reml,
    )


# ----------------------------------------------------------------------------------------------------
# Design-only arrays


def small_design(design: Design, spec: FamilySpec, block: Block) -> jax.Array | None:
    """``(n_obs, p_w)`` rows ``w_i`` of the block's small part, or ``None`` when it is empty."""
    cols = []
    for k in block.small:
        term = design.terms[k]
        onehot = jax.nn.one_hot(term.index, term.n_levels, dtype=term.covariates.dtype)
        cols.append((onehot[:, :, None] * term.covariates[:, None, :]).reshape(design.y.shape[0], -1))
    if block.fixed:
        cols.append(design.X)
    return jnp.concatenate(cols, axis=1) if cols else None


def block_data(design: Design, spec: FamilySpec) -> tuple[BlockData, ...]:
    """The per-block design arrays and cross-products (one pass over the rows per block)."""
    out = []
    for block in spec.blocks:
        W = small_design(design, spec, block)
        ZtZ = ZtW = None
        if block.large is not None:
            term = design.terms[block.large]
            z = term.covariates
            ZtZ = jax.ops.segment_sum(z[:, :, None] * z[:, None, :], term.index, term.n_levels)
            if W is not None:
                ZtW = jax.ops.segment_sum(z[:, :, None] * W[:, None, :], term.index, term.n_levels)
        out.append(BlockData(W=W, ZtZ=ZtZ, ZtW=ZtW, WtW=None if W is None else W.T @ W))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Moments of q


def row_moments(design: Design, spec: FamilySpec, blocks, data) -> tuple[jax.Array, jax.Array]:
    """Mean and variance under q of the random part of every row's predictor.

    The random part is ``sum_k z_ik . b_k,g_k(i)`` plus ``x_i beta`` when beta is in q.

    Returns:
        ``(mean (n_obs,), var (n_obs,))``.
    """
    mean = jnp.zeros_like(design.y)
    var = jnp.zeros_like(design.y)
    for i, block in enumerate(spec.blocks):
        m, v = block_row_moments(design, block, blocks[i], data[i])
        mean, var = mean + m, var + v
    return mean, var


def block_row_moments(design: Design, block: Block, bp: BlockParams, bd: BlockData):
    """Mean and variance of one block's share of each row's predictor; ``(n_obs,)`` each."""
    mean = jnp.zeros_like(design.y)
    var = jnp.zeros_like(design.y)
    a = None
    if block.large is not None:
        term = design.terms[block.large]
        z, g = term.covariates, term.index
        mean = mean + jnp.sum(z * bp.loc_large[g], axis=-1)
        tz = jnp.einsum("np,npq->nq", z, bp.chol_large[g])
        var = var + jnp.sum(tz**2, axis=-1)
        if bd.W is not None:
            ku = jnp.einsum("jpw,wv->jpv", bp.coupling, bp.chol_small)
            a = jnp.einsum("np,npv->nv", z, ku[g])
    if bd.W is not None:
        mean = mean + bd.W @ bp.loc_small
        wu = bd.W @ bp.chol_small
        a = wu if a is None else a + wu
        var = var + jnp.sum(a**2, axis=-1)
    return mean, var


def block_mean(design: Design, block: Block, bp: BlockParams, bd: BlockData) -> jax.Array:
    """Mean only of one block's share of each row's predictor, ``(n_obs,)``."""
    mean = jnp.zeros_like(design.y)
    if block.large is not None:
        term = design.terms[block.large]
        mean = mean + jnp.sum(term.covariates * bp.loc_large[term.index], axis=-1)
    if bd.W is not None:
        mean = mean + bd.W @ bp.loc_small
    return mean


def term_moments(spec: FamilySpec, blocks, k: int, given_beta: bool = False) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and covariance of every level of term ``k`` under q.

    Args:
        spec: the family.
        blocks: q's block parameters.
        k: the term.
        given_beta: when beta is in q, return the covariance conditional on beta (what lme4's
            ``condVar`` reports: it conditions on the estimated fixed effects) instead of the marginal one.

    Returns:
        ``(mean (J_k, p_k), cov (J_k, p_k, p_k))``.
    """
    bi = spec.block_of(k)
    block, bp = spec.blocks[bi], blocks[bi]
    V = None
    if bp.chol_small is not None:
        V = bp.chol_small @ bp.chol_small.T
        if given_beta and block.fixed:
            V = _condition_on_fixed(spec, block, V)
    if block.large == k:
        cov = jnp.einsum("jpq,jrq->jpr", bp.chol_large, bp.chol_large)
        if V is not None:
            cov = cov + jnp.einsum("jpw,wv,jrv->jpr", bp.coupling, V, bp.coupling)
        return bp.loc_large, cov
    offsets, _, _ = spec.small_offsets(block)
    J, p = spec.n_levels[k], spec.n_coefs[k]
    start = offsets[k]
    mean = bp.loc_small[start : start + J * p].reshape(J, p)
    sub = V[start : start + J * p, start : start + J * p].reshape(J, p, J, p)
    return mean, jnp.einsum("jpjr->jpr", sub)


def _condition_on_fixed(spec: FamilySpec, block: Block, V: jax.Array) -> jax.Array:
    """``Cov(w | beta)``: the Schur complement of beta's slots in ``V``, zero in beta's rows and columns."""
    _, at, pw = spec.small_offsets(block)
    idx = jnp.arange(pw)
    is_fixed = (idx >= at) & (idx < at + spec.n_fixed)
    Vbb = V[at : at + spec.n_fixed, at : at + spec.n_fixed]
    Vwb = V[:, at : at + spec.n_fixed]
    cond = V - Vwb @ jnp.linalg.solve(Vbb, Vwb.T)
    mask = (~is_fixed)[:, None] & (~is_fixed)[None, :]
    return jnp.where(mask, cond, 0.0)


def fixed_moments(spec: FamilySpec, blocks) -> tuple[jax.Array, jax.Array]:
    """Mean ``(p,)`` and covariance ``(p, p)`` of beta under q (only when ``spec.reml``)."""
    bi = spec.fixed_block()
    block, bp = spec.blocks[bi], blocks[bi]
    _, at, _ = spec.small_offsets(block)
    mean = bp.loc_small[at : at + spec.n_fixed]
    rows = bp.chol_small[at : at + spec.n_fixed]
    return mean, rows @ rows.T


def second_moment_sum(spec: FamilySpec, blocks, k: int) -> jax.Array:
    """``sum_j E_q[b_kj b_kj^T]``, ``(p_k, p_k)``: what both the prior term and the M-step need."""
    mean, cov = term_moments(spec, blocks, k)
    return jnp.einsum("jp,jq->pq", mean, mean) + jnp.sum(cov, axis=0)


def expected_log_prior(spec: FamilySpec, params: VIParams) -> jax.Array:
    """``sum_k sum_j E_q[log N(b_kj | 0, Sigma_k)]`` (beta's flat prior adds nothing); returns ``()``."""
    total = 0.0
    for k, L in enumerate(params.model.chol):
        J, p = spec.n_levels[k], spec.n_coefs[k]
        M = second_moment_sum(spec, params.blocks, k)
        white = jax.scipy.linalg.solve_triangular(L, M, lower=True)
        trace = jnp.trace(jax.scipy.linalg.solve_triangular(L, white.T, lower=True))
        logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(L))))
        total = total - 0.5 * J * p * LOG_2PI - J * logdet - 0.5 * trace
    return total


def entropy(spec: FamilySpec, blocks) -> jax.Array:
    """``sum_B H[q_B]``, with ``H[N(m, V)] = 1/2 log|2 pi e V|``; returns ``()``."""
    total = 0.0
    for block, bp in zip(spec.blocks, blocks):
        dim = 0
        if bp.chol_large is not None:
            total = total + jnp.sum(jnp.log(jnp.abs(jnp.diagonal(bp.chol_large, axis1=1, axis2=2))))
            dim += bp.chol_large.shape[0] * bp.chol_large.shape[1]
        if bp.chol_small is not None:
            total = total + jnp.sum(jnp.log(jnp.abs(jnp.diagonal(bp.chol_small))))
            dim += bp.chol_small.shape[0]
        total = total + 0.5 * dim * (1.0 + LOG_2PI)
    return total


def sample(rng_key, spec: FamilySpec, blocks) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
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


def init_params(design: Design, spec: FamilySpec, residual_scale: float | None, init_scale: float = 0.1) -> VIParams:
    """Starting point: beta by least squares, every SD at half the least-squares residual SD, q at its prior
    mean with scale ``init_scale`` (numpyro's ``AutoNormal`` default), no coupling.

    ``residual_scale`` fixes sigma (the tutorial's 1.0); ``None`` starts it at the least-squares value.
    """
    X, y = design.X, design.y
    beta, *_ = jnp.linalg.lstsq(X, y)
    resid_sd = jnp.sqrt(jnp.mean((y - X @ beta) ** 2))
    chol = []
    for term in design.terms:
        spread = jnp.maximum(jnp.std(term.covariates, axis=0), 1.0)
        chol.append(jnp.diag(0.5 * resid_sd / spread))
    sigma = resid_sd if residual_scale is None else jnp.asarray(residual_scale, y.dtype)
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


def rescale_fixed(params: VIParams, spec: FamilySpec, factor: jax.Array) -> VIParams:
    """The same q and estimates in coordinates where ``beta_new = factor * beta`` (``(p,)`` factors).

    Used to fit with standardised columns of ``X`` (``X_new = X / factor``) and map the result back: point
    beta is multiplied, and where beta is in q its mean and Cholesky rows are multiplied and the coupling
    columns of the large term (``b_L`` regressed on beta) divided.
    """
    model = params.model
    if model.beta is not None:
        model = model._replace(beta=model.beta * factor)
    bi = spec.fixed_block()
    blocks = list(params.blocks)
    if bi is not None:
        _, at, pw = spec.small_offsets(spec.blocks[bi])
        f = jnp.ones((pw,), factor.dtype).at[at : at + spec.n_fixed].set(factor)
        bp = blocks[bi]
        blocks[bi] = bp._replace(
            loc_small=bp.loc_small * f,
            chol_small=bp.chol_small * f[:, None],
            coupling=None if bp.coupling is None else bp.coupling / f,
        )
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


def to_constrained(raw: VIParams, residual_scale: float | None) -> VIParams:
    """Inverse of :func:`to_unconstrained`; a fixed ``residual_scale`` overrides sigma."""
    m = raw.model
    sigma = jnp.exp(m.sigma) if residual_scale is None else jnp.asarray(residual_scale, m.sigma.dtype)
    model = ModelParams(beta=m.beta, chol=tuple(_tril_map(L, jnp.exp) for L in m.chol), sigma=sigma)
    blocks = tuple(
        bp._replace(
            chol_large=None if bp.chol_large is None else _tril_map(bp.chol_large, jax.nn.softplus),
            chol_small=None if bp.chol_small is None else _tril_map(bp.chol_small, jax.nn.softplus),
        )
        for bp in raw.blocks
    )
    return VIParams(model=model, blocks=blocks)
