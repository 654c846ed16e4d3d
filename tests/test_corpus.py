"""The model corpus against its committed baseline (``results/corpus/corpus.csv``).

``python -m experiments.corpus`` fits every model of ``experiments/corpus_models.csv`` (linear mixed models
documented in R packages and books) with ``lmevi.fit`` and compares each fit with lme4's (saved under
``results/lme4/corpus/``; nothing here needs R). A full run takes a few minutes, so these tests

* check the committed baseline file itself: one row per model and kind, statuses consistent with the
  metrics they summarise (this is what covers the models not re-run here), and
* re-run a representative subset (:data:`RERUN`, marked ``slow``; the experiment in a fresh process, its
  ``corpus.csv`` read back) and assert that nothing regresses: every
  model that fitted in the baseline still fits, the number that fit does not drop, and every metric is no
  worse than its baseline value plus ``TOL_REL`` of it plus ``TOL_ABS``.

After a change that improves the corpus, refresh the baseline with ``python -m experiments.corpus``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lmevi.result.lme4ref import METRICS, STATUSES, status_of

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "results" / "corpus" / "corpus.csv"
MODELS = ROOT / "experiments" / "corpus_models.csv"
KINDS = ("reml", "ml")
# every metric within this of lme4 run to convergence: the bar for the corpus
TIGHT_TOL = 1e-4

# Models re-run here (REML fits, about 30 s on two cores): a singular fit, nested intercepts, missing values, a
# transformed response with I() and a correlated slope, sin/pi, dotted names and ordered() contrasts.
# ||, crossed factors, categorical slopes and the remaining models are covered by the baseline file
# checks here and by tests/test_lme4_small.py.
RERUN = (
    "dyestuff2",
    "pastes_nested",
    "gcsemv_course",
    "blackmore",
    "ovary",
    "bdf_slope",
    "sitka",
)

# lmevi's default kind only, to keep the suite short; the ML rows are covered by the baseline file checks,
# and ML against lme4 by tests/test_lme4_small.py and tests/test_exact_loglik.py.
RERUN_KINDS = ("reml",)

# A metric may grow by 10% of its baseline value plus 2e-3 (on scales where 1e-3 is an exact match and
# 5e-2 a close one) before it counts as a regression.
TOL_REL = 0.10
TOL_ABS = 2e-3


def _bool(v) -> bool:
    """A yes/no cell of a CSV read back: ``True``/``"True"`` count as yes, anything else (NaN included) as no."""
    if isinstance(v, str):
        return v.strip().lower() == "true"
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and bool(v)


def _names() -> list[str]:
    return pd.read_csv(MODELS, dtype=str)["name"].tolist()


def _run_corpus(names, out: Path, kinds=KINDS, lme4_dir: Path | None = None) -> pd.DataFrame:
    """``python -m experiments.corpus`` on ``names`` in a fresh process; its ``corpus.csv``."""
    cmd = [sys.executable, "-m", "experiments.corpus", "--out", str(out)]
    cmd += [a for n in names for a in ("--only", n)] + [a for k in kinds for a in ("--kind", k)]
    cmd += ["--lme4", str(lme4_dir)] if lme4_dir else []
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    df = pd.read_csv(out / "corpus.csv")
    df["fits"] = df["fits"].map(_bool)
    return df


@pytest.fixture(scope="module")
def baseline() -> pd.DataFrame:
    return pd.read_csv(BASELINE, keep_default_na=True)


def test_baseline_covers_the_corpus(baseline):
    names = _names()
    assert len(names) >= 40 and len(set(names)) == len(names)
    got = set(zip(baseline["name"], baseline["kind"]))
    assert got == {(n, k) for n in names for k in KINDS}
    assert set(baseline["status"]) <= set(STATUSES)


def test_baseline_statuses_follow_from_their_metrics(baseline):
    for r in baseline.to_dict("records"):
        row = dict(r)
        for key in ("fits", "lme4_fits", "data_ok"):
            row[key] = _bool(row[key])
        row["unmatched"] = "" if pd.isna(row["unmatched"]) else row["unmatched"]
        for m in METRICS:
            row[m] = None if pd.isna(row[m]) else float(row[m])
        assert status_of(row) == r["status"], (r["name"], r["kind"])


def test_rerun_subset_is_in_the_corpus():
    assert set(RERUN) <= set(_names())


@pytest.fixture(scope="module")
def rerun(tmp_path_factory) -> pd.DataFrame:
    return _run_corpus(RERUN, tmp_path_factory.mktemp("corpus"), kinds=RERUN_KINDS)


def _pairs(baseline, rerun):
    base = baseline.set_index(["name", "kind"])
    for r in rerun.to_dict("records"):
        yield r, base.loc[(r["name"], r["kind"])]


@pytest.mark.slow
def test_coverage_does_not_regress(baseline, rerun):
    base = baseline[baseline["name"].isin(RERUN) & baseline["kind"].isin(RERUN_KINDS)]
    assert int(rerun["fits"].astype(bool).sum()) >= int(base["fits"].map(_bool).sum())
    lost = [(r["name"], r["kind"], r["error"]) for r, b in _pairs(baseline, rerun)
            if _bool(b["fits"]) and not r["fits"]]
    assert not lost, f"models that fitted in the baseline fail now: {lost}"


@pytest.mark.slow
@pytest.mark.parametrize("metric", METRICS)
def test_accuracy_does_not_regress(baseline, rerun, metric):
    worse = []
    for r, b in _pairs(baseline, rerun):
        old = b[metric]
        if pd.isna(old) or not r["fits"]:
            continue  # nothing to compare in the baseline; a lost fit fails the coverage test
        new = r[metric]  # NaN where the run wrote none
        if new is None or not math.isfinite(new) or new > old * (1 + TOL_REL) + TOL_ABS:
            worse.append((r["name"], r["kind"], float(old), new))
    assert not worse, f"{metric} regressed (name, kind, baseline, now): {worse}"


@pytest.mark.slow
def test_singular_fit_agreement_does_not_regress(baseline, rerun):
    lost = [(r["name"], r["kind"]) for r, b in _pairs(baseline, rerun)
            if not pd.isna(b["singular_agree"]) and _bool(b["singular_agree"])
            and not pd.isna(r["singular_agree"]) and not _bool(r["singular_agree"])]
    assert not lost, f"singular-fit agreement lost for {lost}"


TIGHT = ROOT / "results" / "lme4" / "corpus_tight"


@pytest.mark.slow
def test_models_lme4_stops_short_on_match_lme4_run_to_convergence(tmp_path):
    """The models of the baseline that are not within 1e-4 of lme4's default fit on every metric, though lme4
    fits them without a warning and not singular, all have lmevi's log-likelihood above lme4's: lme4 stopped
    short. Against lme4 run to convergence (``Rscript experiments/lme4_corpus.R --tight``, saved under
    ``results/lme4/corpus_tight/``) each of them, both kinds, is within 1e-4 on every metric, as the issue asks
    of the corpus (about 3 s: small models, NumPy's exact path)."""
    names = sorted(p.name for p in TIGHT.iterdir() if p.is_dir())
    assert set(names) <= set(_names()) and len(names) >= 8
    df = _run_corpus(names, tmp_path, lme4_dir=TIGHT)
    assert len(df) == 2 * len(names) and df["fits"].all()
    worst = df[list(METRICS)].apply(pd.to_numeric, errors="coerce").fillna(0.0).max(axis=1)
    assert (worst <= TIGHT_TOL).all(), df.loc[worst > TIGHT_TOL, ["name", "kind"]].to_string()
