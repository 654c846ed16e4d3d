"""Where lmevi's Satterthwaite dfs differ from lmerTest's by more than the 1e-4 target (igf, assay, bodyweight,
orthodont_agesex: 4e-4 to 6e-3 relative; petrol_slope: 2.1; ``results/inference/corpus.csv``), the difference is
the optimum's, not the method's: lme4's optimiser stops short of the REML optimum there (lmevi's REML criterion
is lower, by 5e-6 to 8e-5, and by 0.13 on petrol_slope, where lme4 warns that it failed to converge), and the
dfs follow theta. Evaluated at lme4's own theta and sigma (``results/lme4/corpus/<name>/
fit_reml.json``, 15 digits), lmevi's exact derivatives give lmerTest's dfs to 1e-6 relative (measured 3e-9 to
3e-8; lmerTest's finite differences and the references' 15 digits allow no tighter)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmevi
from lmevi.frame.rdata import load_rdataset
from lmevi.result import inference
from lmevi.result.satterthwaite import satterthwaite_table, varpar_derivatives

ROOT = Path(__file__).resolve().parents[2]
LME4 = ROOT / "results" / "lme4"


def _fit(name: str):
    row = pd.read_csv(LME4 / "inference" / "index.csv", keep_default_na=False).set_index("name").loc[name]
    models = pd.read_csv(ROOT / "experiments" / "corpus_models.csv", keep_default_na=False).set_index("name")
    factors = [c for c in models.loc[name, "factors"].split(";") if c]
    levels_path = LME4 / "corpus" / name / "levels.json"
    levels = (json.loads(levels_path.read_text()) or {}) if levels_path.exists() else {}
    data, _ = load_rdataset(row["r_package"], row["dataset"], row["subset"] or "", factors, levels)
    return lmevi.fit(row["formula"], data, q="exact", reml=True, missing="drop", progress=False)


@pytest.mark.parametrize("name", ["igf", "assay", "bodyweight", "orthodont_agesex", "petrol_slope"])
def test_dfs_at_lme4s_optimum_are_lmertests(name):
    ref = json.loads((LME4 / "corpus" / name / "fit_reml.json").read_text())
    lmertest = pd.read_csv(LME4 / "inference" / name / "coef_satterthwaite.csv").set_index("term")
    m = _fit(name)
    # lmevi's optimum is at least as good as lme4's (the REML criterion is minimised)
    assert m.reml_criterion <= ref["deviance_or_reml_criterion"] + 1e-9
    f = lmevi.devfun(m)  # lme4's theta order -> the design's
    theta = np.empty(len(f.names))
    theta[f.order] = [ref["theta"][n] for n in f.names]
    d = varpar_derivatives(None, theta, float(ref["sigma"]), True, structure=inference.structure_of(m))
    dfs = pd.Series([t.df for t in satterthwaite_table(d)], index=m.fixef().index)
    terms = [t for t in lmertest.index if t in dfs.index]
    assert len(terms) == len(lmertest)
    np.testing.assert_allclose(dfs[terms], lmertest.loc[terms, "df"], rtol=1e-6)
    # and at lmevi's own optimum they differ by more than that: the test above is not vacuous
    ours = m.coef_table().loc[terms, "df"]
    assert np.max(np.abs(ours - lmertest.loc[terms, "df"]) / lmertest.loc[terms, "df"]) > 1e-4
