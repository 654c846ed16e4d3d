"""InstEval against the saved lme4 fits (tier 3), and the reproduction script's smoke test.

The lme4 numbers come from ``experiments/lme4_reference.R`` (lme4 1.1-31, full data), saved under
``results/lme4/insteval``; nothing here needs R. Each fit runs once per session (module fixtures).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmevi
from lmevi.result import lme4ref

ROOT = Path(__file__).resolve().parents[1]
LME4 = ROOT / "results" / "lme4" / "insteval"
FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"


@pytest.fixture(scope="module")
def insteval():
    return lmevi.load_insteval()


@pytest.fixture(scope="module")
def recommended(insteval):
    """``lmevi.fit``'s defaults: structured q, REML-like, coordinate ascent."""
    return lmevi.fit(FORMULA, insteval, progress=False)


@pytest.fixture(scope="module")
def structured_ml(insteval):
    return lmevi.fit(FORMULA, insteval, reml=False, progress=False)


def _agreement(fit, kind):
    ref = lme4ref.load_fit(LME4, kind)
    joined = lme4ref.join_effects(fit.ranef(), ref["ranef"])
    return ref, lme4ref.effect_agreement(joined).set_index("grpvar")


def test_data_matches_the_tutorial_counts(insteval):
    train, test = lmevi.train_test_split(insteval, 0.2, seed=0)
    assert len(insteval) == 73421
    assert (insteval.s.nunique(), insteval.d.nunique(), insteval.dept.nunique()) == (2972, 1128, 14)
    assert len(train) == 58737 and len(test) == 73421 - 58737
    # codes come from the full data's levels, so both splits share one coding
    assert list(train.d.cat.categories) == list(insteval.d.cat.categories)


def test_recommended_reaches_the_reproduction_targets(recommended):
    """The reproduction's accuracy bar (against lme4 REML, full data)."""
    ref, agree = _agreement(recommended, "reml")
    assert agree.loc["s", "corr"] >= 0.999
    assert agree.loc["d", "corr"] >= 0.99
    fe = ref["fixef"].set_index("term")["estimate"]
    # within 0.01 of lme4: a tenth of the intercept's standard error (0.029)
    assert abs(recommended.fixef()["(Intercept)"] - fe["(Intercept)"]) <= 0.01
    assert abs(recommended.fixef()["service"] - fe["service"]) <= 0.01
    sd = lme4ref.lme4_sd(ref["varcorr"])
    assert recommended.sd()["Residual"] == pytest.approx(sd["Residual"], rel=0.01)


@pytest.mark.parametrize("kind", ["reml", "ml"])
def test_structured_family_targets(kind, recommended, structured_ml):
    """The structured family against lme4 of the same kind: every SD within 2% for REML, the recommended
    configuration (the remaining gap is the mean-field split between students and the instructor block;
    measured for dept: 1.58% low). The ML fit's department SD sits at 2.00% low (0.07695 against 0.07852,
    measured 1.997% to 2.004% depending on where the stop rule halts), so ML is held to 2.1%;
    effects correlating >= 0.9999 (s, d) and >= 0.999 (dept), fixed effects within 0.002, and posterior
    SDs within 5% of lme4's conditional SDs for at least 95% of levels."""
    fit = recommended if kind == "reml" else structured_ml
    ref, agree = _agreement(fit, kind)
    sd = lme4ref.lme4_sd(ref["varcorr"])
    ours = fit.sd()
    for comp in ("s", "d", "dept", "Residual"):
        assert ours[comp] == pytest.approx(sd[comp], rel=0.02 if kind == "reml" else 0.021), comp
    assert agree.loc["s", "corr"] >= 0.9999
    assert agree.loc["d", "corr"] >= 0.9999
    assert agree.loc["dept", "corr"] >= 0.999
    fe = ref["fixef"].set_index("term")["estimate"]
    for name in ("(Intercept)", "service"):
        assert abs(fit.fixef()[name] - fe[name]) <= 0.002, name
    for g in ("s", "d", "dept"):
        assert agree.loc[g, "condsd_within_5pct"] >= 0.95, g


def test_meanfield_drains_the_department_variance(insteval):
    """The failure the structured family fixes: under mean-field q the department SD collapses (the
    tutorial's mismatch), while students and instructors still agree with lme4 ML."""
    fit = lmevi.fit(FORMULA, insteval, q="meanfield", reml=False, num_steps=300, progress=False)
    ref, agree = _agreement(fit, "ml")
    assert fit.sd()["dept"] < 0.1 * lme4ref.lme4_sd(ref["varcorr"])["dept"]
    assert agree.loc["s", "corr"] >= 0.999
    assert agree.loc["dept", "condsd_median_ratio"] < 0.1


def test_experiment_quick_writes_every_output(tmp_path):
    """``python -m experiments.insteval --quick`` in a fresh process, from the repository's root."""
    out = subprocess.run([sys.executable, "-m", "experiments.insteval", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in [
        "residuals_during_training.png", "residuals_final.png", "effects_recommended.png",
        "effects_meanfield.png", "effects_tutorial.png", "departments_pairing.png", "elbo_traces.png",
        "variance_components.png", "posterior_sd.png", "params.csv", "params.md", "effects.csv",
        "fits.csv", "metrics.json", "report.md",
    ]:
        assert (tmp_path / name).stat().st_size > 0, name
    for config in ("tutorial", "meanfield", "recommended"):
        for which in ("train", "full"):
            assert (tmp_path / f"ranef_{config}_{which}.csv").exists()
            m = metrics[config][which]
            assert set(m["sd"]) == {"s", "d", "dept", "Residual"}
            assert set(m["vs_lme4"]) == {"s", "d", "dept"}
            assert np.isfinite(m["test_rmse"]) and m["steps"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["recommended"]["full"]["lme4_fit"] == "REML"
    assert metrics["tutorial"]["train"]["sd"]["Residual"] == 1.0  # the tutorial fixes the residual scale
