"""Inference after the fit, measured: lmevi against lme4 / lmerTest / pbkrtest / bootMer in one run.

* InstEval ``y ~ service + (1|s) + (1|d) + (1|dept)`` (exact REML): the fit's time, then the Satterthwaite
  coefficient table and the type III anova beyond the fit (target < 1 s; lmerTest's dfs from the committed
  reference), Kenward-Roger's table (target < 10 s; pbkrtest cannot run on InstEval).
* sleepstudy ``Reaction ~ Days + (Days | Subject)``: profile confidence intervals against lme4's recorded
  ``confint(m, method = "profile")`` time and ends, and the profile figure (lme4's ``xyplot(profile(m))``);
  1,000 parametric bootstrap replicates against bootMer's recorded time (target >= 30x faster) and standard
  errors.
* The corpus: every model of ``results/lme4/inference/index.csv`` fitted by exact REML, its Satterthwaite and
  Kenward-Roger tables, type III / I anova and emmeans against R's, the largest differences recorded.

Writes ``results/inference/``: ``inference.json``, ``inference.md``, ``profile.png``, ``corpus.csv``.

Usage (from the repository root): ``python -m experiments.inference [--quick] [--out DIR]``; ``--quick``:
sleepstudy only and 50 bootstrap replicates (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import pandas as pd

from experiments import inference_refs as refs
from lmevi.result import lmertest_ref

ROOT = Path(__file__).resolve().parents[1]
SLEEP = "Reaction ~ Days + (Days | Subject)"
INSTEVAL = "y ~ service + (1 | s) + (1 | d) + (1 | dept)"


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def insteval_part() -> dict:
    """Fit, Satterthwaite table + type III anova beyond the fit (first call: derivatives, then the cached
    second call), Kenward-Roger's table; each against the committed lmerTest numbers."""
    import lmevi

    data = lmevi.load_insteval()
    m, fit_s = _timed(lmevi.fit, INSTEVAL, data, q="exact", progress=False)
    (coef, anova), satt_s = _timed(lambda: (m.coef_table("satterthwaite"), m.anova(type=3)))
    _, again_s = _timed(lambda: (m.coef_table("satterthwaite"), m.anova(type=3)))
    ref = refs.read("insteval", "coef_satterthwaite")
    ref_anova = refs.read("insteval", "anova_type3_satterthwaite")
    ours = coef.rename(index={"service": "service1"})
    kr, kr_s, kr_error = None, None, None
    try:
        kr, kr_s = _timed(m.coef_table, "kenward_roger")
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        kr_error = f"{type(err).__name__}: {err}"
    r_info = refs.info("insteval")["steps"]
    return {
        "fit_s": fit_s, "lme4_fit_s": r_info["fit_lme4"]["seconds"], "lmerTest_fit_s": r_info["fit"]["seconds"],
        "satterthwaite_and_anova_s": satt_s, "satterthwaite_and_anova_cached_s": again_s,
        "lmerTest_coef_s": r_info["coef_satterthwaite"]["seconds"], "lmerTest_anova_s": r_info["anova_type3_satterthwaite"]["seconds"],
        "df": ours["df"].tolist(), "lmerTest_df": ref.loc[ours.index, "df"].tolist(),
        "df_rel": lmertest_ref.rel_diff(ours["df"], ref.loc[ours.index, "df"]),
        "anova_den_df": float(anova["den_df"].iloc[0]), "lmerTest_anova_den_df": float(ref_anova["den_df"].iloc[0]),
        "kenward_roger_s": kr_s, "kenward_roger_df": None if kr is None else kr["df"].tolist(),
        "kenward_roger_error": kr_error,
        "targets": {"satterthwaite_beyond_fit_lt_1s": satt_s < 1.0,
                    "kenward_roger_lt_10s": kr_s is not None and kr_s < 10.0},
    }


def profile_part(m, out: Path) -> dict:
    """Profile intervals of sleepstudy (first call, then the median of three) against lme4's, and the figure."""
    from experiments.profile_plot import plot_profile

    ci, first = _timed(m.confint, method="profile")
    warm = [_timed(m.confint, method="profile")[1] for _ in range(3)]
    traces = m.profile()
    plot_profile(traces, ci, path=out / "profile.png")
    ref = refs.read("sleepstudy", "confint_profile")
    timing = json.loads((refs.REFS / "sleepstudy_timing.json").read_text())["confint_profile"]
    ends = ci.copy()
    ends.columns = ["lower", "upper"]
    return {
        "first_call_s": first, "warm_median_s": statistics.median(warm), "lme4_median_s": timing["median"],
        "speedup_warm": timing["median"] / statistics.median(warm),
        "end_over_width": refs.compare_profile(m, "sleepstudy")["end_over_width"],
        "intervals": {k: [float(ends.loc[k, "lower"]), float(ends.loc[k, "upper"]), float(ref.loc[k, "lower"]),
                          float(ref.loc[k, "upper"])] for k in ref.index},
    }


def bootstrap_part(m, n: int) -> dict:
    """``n`` replicates (one call, compilation included, then again warm) against bootMer's recorded 1,000."""
    import lmevi

    boot, first = _timed(lmevi.bootstrap, m, n=n, seed=0, progress=False)
    _, warm = _timed(lmevi.bootstrap, m, n=n, seed=1, progress=False)
    ref = pd.read_csv(refs.REFS / "sleepstudy_bootmer.csv").set_index("parameter")
    meta = json.loads((refs.REFS / "sleepstudy_bootmer.json").read_text())
    se = boot.std_error()
    per_rep_r = meta["seconds_median"] / meta["nsim"]
    return {
        "n": n, "first_call_s": first, "warm_s": warm, "converged": int(boot.converged.sum()),
        "bootMer_nsim": meta["nsim"], "bootMer_s": meta["seconds_median"],
        "speedup_first_call": per_rep_r * n / first, "speedup_warm": per_rep_r * n / warm,
        "se": {k: [float(se[k]), float(ref.loc[k, "boot_sd"])] for k in ref.index},
        "se_mc_rel": math.sqrt(1.0 / (2 * (n - 1)) + 1.0 / (2 * (meta["nsim"] - 1))),
        "targets": {"bootstrap_ge_30x": per_rep_r * n / first >= 30.0},
    }


def corpus_part() -> pd.DataFrame:
    """Every model of the reference index (R fitted it): the largest differences per table."""
    rows = []
    for _, row in refs.index().iterrows():
        name = row["name"]
        if row["fit_error"] or name == "insteval":
            continue
        rec = {"name": name}
        try:
            m, rec["fit_s"] = _timed(refs.fit, name)
            for ddf in ("satterthwaite", "kenward_roger"):
                _record(rec, f"coef_{ddf}", lambda d=ddf: refs.compare_coef(m, name, d))
            for typ, ddf in ((3, "satterthwaite"), (1, "satterthwaite"), (3, "kenward_roger")):
                _record(rec, f"anova{typ}_{ddf}", lambda t=typ, d=ddf: refs.compare_anova(m, name, t, d))
            for spec in refs.emmeans_specs(name):
                _record(rec, "emmeans_kr", lambda s=spec: refs.compare_emmeans(m, name, s, "kr"))
        except Exception as err:  # noqa: BLE001 - a corpus run records every failure
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(rec)
    return pd.DataFrame(rows)


def _record(rec: dict, key: str, fn) -> None:
    try:
        d = fn()
    except Exception as err:  # noqa: BLE001
        rec[f"{key}_error"] = f"{type(err).__name__}: {err}"[:200]
        return
    for k, v in (d or {}).items():
        rec[f"{key}.{k}"] = v


def corpus_summary(table: pd.DataFrame) -> dict:
    """How many models meet each target, and which do not (with the size)."""
    targets = {"coef_satterthwaite.df_rel": 1e-4, "coef_satterthwaite.p_abs": 1e-6, "coef_kenward_roger.df_rel": 1e-3,
               "anova3_satterthwaite.F_rel": 1e-4, "anova3_satterthwaite.den_df_rel": 1e-4,
               "emmeans_kr.estimate_rel": 1e-6, "emmeans_kr.df_rel": 1e-3}
    out = {}
    for col, tol in targets.items():
        if col not in table:
            continue
        vals = table[["name", col]].dropna()
        bad = vals[vals[col] >= tol]
        out[col] = {"target": tol, "compared": len(vals), "met": int(len(vals) - len(bad)),
                    "not_met": {r["name"]: float(r[col]) for _, r in bad.iterrows()}}
    errors = [c for c in table.columns if c.endswith("error")]
    out["errors"] = {c: table.loc[table[c].notna(), ["name", c]].astype(str).values.tolist() for c in errors
                     if table[c].notna().any()}
    return out


def markdown(res: dict) -> str:
    lines = ["# Inference after the fit: lmevi against lme4 / lmerTest / pbkrtest / bootMer", "",
             f"Machine: {res['machine']}. R numbers: the committed references (results/lme4/inference/, "
             "lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2, emmeans 1.8.4.1), timed on the machine that wrote them.", ""]
    if "insteval" in res:
        i = res["insteval"]
        lines += ["## InstEval (exact REML)", "",
                  "| step | lmevi | R |", "|---|---|---|",
                  f"| fit | {i['fit_s']:.2f} s | lme4 {i['lme4_fit_s']:.1f} s (lmerTest::lmer {i['lmerTest_fit_s']:.1f} s) |",
                  f"| Satterthwaite table + type III anova beyond the fit | {i['satterthwaite_and_anova_s']:.2f} s "
                  f"(again, cached: {i['satterthwaite_and_anova_cached_s']:.3f} s) | "
                  f"{i['lmerTest_coef_s'] + i['lmerTest_anova_s']:.3f} s beyond lmerTest::lmer |",
                  f"| Kenward-Roger table | {_s(i['kenward_roger_s'])} | not run (pbkrtest cannot) |",
                  f"| Satterthwaite df (Intercept, service) | {i['df'][0]:.4f}, {i['df'][1]:.2f} | "
                  f"{i['lmerTest_df'][0]:.4f}, {i['lmerTest_df'][1]:.2f} |", ""]
    p = res["profile"]
    lines += ["## sleepstudy profile intervals", "",
              f"lmevi {p['first_call_s']:.2f} s first call, {p['warm_median_s']:.2f} s warm; lme4 "
              f"{p['lme4_median_s']:.2f} s. Largest end difference: {100 * p['end_over_width']:.3f} % of R's width.", "",
              "| parameter | lmevi | lme4 |", "|---|---|---|"]
    for k, (lo, hi, rlo, rhi) in p["intervals"].items():
        lines.append(f"| {k} | {lo:.4f}, {hi:.4f} | {rlo:.4f}, {rhi:.4f} |")
    b = res["bootstrap"]
    lines += ["", f"## sleepstudy parametric bootstrap ({b['n']} replicates)", "",
              f"lmevi {b['first_call_s']:.2f} s (first call, compilation included), {b['warm_s']:.2f} s warm; "
              f"bootMer {b['bootMer_s']:.1f} s for {b['bootMer_nsim']}: {b['speedup_first_call']:.0f}x "
              f"({b['speedup_warm']:.0f}x warm). Converged: {b['converged']} of {b['n']}.", "",
              f"| parameter | lmevi SE | bootMer SE | (Monte Carlo noise ~{100 * b['se_mc_rel']:.1f} % relative) |",
              "|---|---|---|---|"]
    for k, (ours, theirs) in b["se"].items():
        lines.append(f"| {k} | {ours:.4f} | {theirs:.4f} | {100 * (ours / theirs - 1):+.1f} % |")
    if "corpus" in res:
        lines += ["", "## Corpus against R (exact REML fits)", "", "| quantity | target | met / compared | not met |",
                  "|---|---|---|---|"]
        for k, v in res["corpus"].items():
            if k == "errors":
                continue
            bad = ", ".join(f"{n} {x:.1e}" for n, x in v["not_met"].items()) or "-"
            lines.append(f"| {k} | {v['target']:g} | {v['met']} / {v['compared']} | {bad} |")
        if res["corpus"].get("errors"):
            lines += ["", "Errors / skipped comparisons:", ""]
            for k, items in res["corpus"]["errors"].items():
                lines += [f"- {k}: " + "; ".join(f"{n}: {e}" for n, e in items)]
    lines += ["", "## Targets", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in res["targets"].items()]
    return "\n".join(lines) + "\n"


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f} s"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "inference")
    p.add_argument("--quick", action="store_true", help="sleepstudy only, 50 bootstrap replicates")
    p.add_argument("--boot", type=int, default=1000)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")  # singular fits in the corpus; recorded by the comparisons instead
    import os
    import platform

    import lmevi

    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)"}
    m = refs.fit("sleepstudy")
    res["profile"] = profile_part(m, args.out)
    res["bootstrap"] = bootstrap_part(m, 50 if args.quick else args.boot)
    targets = {"profile_ends_within_1pct": res["profile"]["end_over_width"] < 0.01}
    if not args.quick:
        targets["bootstrap_ge_30x"] = res["bootstrap"]["targets"]["bootstrap_ge_30x"]
        res["insteval"] = insteval_part()
        targets.update(res["insteval"]["targets"])
        table = corpus_part()
        table.to_csv(args.out / "corpus.csv", index=False)
        res["corpus"] = corpus_summary(table)
    res["targets"] = targets
    res["lmevi_version"] = lmevi.__version__
    (args.out / "inference.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (args.out / "inference.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
