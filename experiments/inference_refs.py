"""lmevi's inference after the fit against the committed R references (``results/lme4/inference/``, written by
``experiments/lme4_inference.R``: lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2, emmeans 1.8.4.1).

One function per kind of table; each returns the largest discrepancies of one model as a flat dict, so the
experiment can tabulate the whole corpus and the tests can assert on a few models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REFS = ROOT / "results" / "lme4" / "inference"


def index() -> pd.DataFrame:
    """``index.csv``: one row per model, which tables R produced (booleans) and R's timings."""
    return pd.read_csv(REFS / "index.csv", keep_default_na=False, na_values=["NA"])


def read(name: str, table: str) -> pd.DataFrame | None:
    """One committed table of model ``name`` (:func:`lmevi.result.lmertest_ref.read`)."""
    from lmevi.result.lmertest_ref import read as read_table

    return read_table(REFS / name, table)


def info(name: str) -> dict:
    return json.loads((REFS / name / "info.json").read_text())


def load_data(name: str) -> pd.DataFrame:
    """The model's data as the corpus loads it (R's factor coding), subset as R's script did."""
    from experiments.corpus import load_data as corpus_data  # R's factor coding of the corpus's data sets

    row = index().set_index("name").loc[name]
    spec = {"name": name, "r_package": row["r_package"], "dataset": row["dataset"], "subset": row["subset"] or "",
            "factors": ""}
    corpus = {r["name"]: r for r in _corpus_models()}
    if name in corpus:
        spec["factors"] = corpus[name].get("factors", "")
    if name == "insteval":
        import lmevi

        return lmevi.load_insteval()
    return corpus_data(spec)[0]


def _corpus_models() -> list[dict]:
    from experiments.corpus import read_models

    return read_models()


def fit(name: str, reml: bool = True):
    """lmevi's exact fit of the model R fitted (REML, as ``lmerTest::lmer``)."""
    import lmevi

    row = index().set_index("name").loc[name]
    # missing="drop": R's na.action = na.omit (gcsemv_course has missing coursework marks)
    return lmevi.fit(row["formula"], load_data(name), q="exact", reml=reml, missing="drop", progress=False)


from lmevi.result import lmertest_ref  # noqa: E402


def compare_coef(m, name: str, ddf: str) -> dict | None:
    return lmertest_ref.compare_coef(m, REFS / name, ddf)


def compare_anova(m, name: str, type: int, ddf: str) -> dict | None:
    return lmertest_ref.compare_anova(m, REFS / name, type, ddf)


def compare_profile(m, name: str, level: float = 0.95) -> dict | None:
    return lmertest_ref.compare_profile(m, REFS / name, level)


def compare_emmeans(m, name: str, spec: str, ddf: str = "kr", pairs: bool = False, adjust: str = "none") -> dict | None:
    return lmertest_ref.compare_emmeans(m, REFS / name, spec, ddf, pairs, adjust)

def emmeans_specs(name: str) -> list[str]:
    """The factors R's script computed emmeans for (``index.csv``'s ``emmeans``, ``;``-separated)."""
    row = index().set_index("name").loc[name]
    return [s for s in str(row["emmeans"] or "").split(";") if s]
