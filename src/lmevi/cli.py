"""Command line: ``lmevi fit data.csv "y ~ x + (1 + x | g)" --out dir/``.

``fit`` reads a CSV, fits the formula with :func:`lmevi.fit`, prints the lme4-style summary and, with
``--out``, writes into that folder (created if missing):

* ``fixef.csv``: ``term, estimate`` and, when beta is in q (REML-like, the default), ``std_error``;
* ``ranef.csv``: ``grpvar, term, grp, condval, condsd`` (lme4's ``as.data.frame(ranef(m, condVar = TRUE))``);
* ``varcorr.csv``: ``grp, var1, var2, vcov, sdcor`` (lme4's ``as.data.frame(VarCorr(m))``);
* ``residuals.png``: residuals against fitted values, and their histogram.

Bad input (a file that cannot be read, a column the formula needs and the data lacks, a formula lmevi
cannot parse, a non-numeric response, missing values) ends with exit status 2 and one line
``lmevi: error: <message>`` on stderr, as argparse reports bad options. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from lmevi.api import fit
from lmevi.result.checks import ConvergenceWarning
from lmevi.fitting.control import ELBOS, METHODS
from lmevi.families.registry import LIKELIHOODS
from lmevi.fitting.build import Q_CHOICES
from lmevi.q.registry import Q_FAMILIES
from lmevi.result.fitresult import FitResult

PROG = "lmevi"
EXIT_BAD_INPUT = 2
OUTPUT_FILES = ("fixef.csv", "ranef.csv", "varcorr.csv", "residuals.png")


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 on bad options or bad input.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad option argparse has already reported
        return int(stop.code or 0)
    return args.run(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``lmevi`` parser with its ``fit`` subcommand."""
    # Long: one add_argument per option of lmevi.fit, in its order; split up, the options would be harder to
    # check against the function they mirror.
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fit linear mixed-effects models written in lme4 formula syntax by variational EM.",
    )
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "fit",
        help="fit a formula to a CSV file",
        description=(
            "Fit FORMULA to the rows of DATA, print an lme4-style summary and, with --out,\n"
            f"write {', '.join(OUTPUT_FILES)} into that folder.\n"
            "Bad input ends with exit status 2 and one line 'lmevi: error: ...' on stderr."
        ),
        epilog='example:\n  lmevi fit sleepstudy.csv "Reaction ~ Days + (Days | Subject)" --out fit/',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", help="CSV file with a header row, one row per observation")
    p.add_argument(
        "formula", metavar="FORMULA", help='lme4 formula, e.g. "y ~ x + (1 + x | g)"; quote it for the shell'
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="folder to write the tables and the residual plot into (created if missing); "
        "without it only the summary is printed",
    )
    p.add_argument(
        "--q",
        choices=Q_CHOICES,
        default="auto",
        help="q: 'structured' couples small grouping factors with the large factor they are nested in; "
        "'meanfield' factorises across terms; 'exact' fits lme4's criterion; 'auto' is exact when its dense "
        "block is small (default: %(default)s)",
    )
    p.add_argument(
        "--family",
        choices=tuple(LIKELIHOODS) + tuple(Q_FAMILIES),
        default="gaussian",
        help="likelihood of the response, as lme4's glmer family (default: %(default)s); 'structured' and "
        "'meanfield' are the older spelling of --q and still work",
    )
    p.add_argument(
        "--ml",
        action="store_true",
        help="make the fixed effects a point estimate (ML-like); by default (Gaussian family) they are in q "
        "with a flat prior, which targets REML estimates as lme4's default REML = TRUE; the poisson and "
        "binomial families are fitted by ML, as glmer",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        help="'cavi' (closed-form coordinate ascent) or 'optax' (gradient steps); default: 'optax' with "
        "--elbo mc, else 'cavi'",
    )
    p.add_argument(
        "--elbo",
        choices=ELBOS,
        default="closed_form",
        help="'closed_form' (exact ELBO) or 'mc' (Monte Carlo estimate; optax only) (default: %(default)s)",
    )
    p.add_argument(
        "--num-samples",
        type=_positive_int,
        default=1,
        metavar="N",
        help="draws per Monte Carlo ELBO estimate with --elbo mc (default: %(default)s)",
    )
    p.add_argument(
        "--residual-scale",
        type=_positive_float,
        metavar="SIGMA",
        help="fix the residual SD at SIGMA instead of estimating it",
    )
    p.add_argument(
        "--num-steps",
        type=_positive_int,
        metavar="N",
        help="step budget of the fit (default: lmevi.fit's for the chosen --method and --elbo)",
    )
    p.add_argument(
        "--tol",
        type=_nonnegative_float,
        help="stop once the relative change of the ELBO is at most TOL (with --elbo mc, of its mean over "
        "a window of steps) (default: lmevi.fit's for the chosen --method and --elbo)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.add_argument("--float32", action="store_true", help="fit in single precision (default: float64)")
    p.set_defaults(run=run_fit)

    w = sub.add_parser(
        "warmup",
        help="compile the common model shapes into the compilation cache",
        description=(
            "Fit the common model structures on simulated data of common sizes, REML and ML, so that their\n"
            "compiled programs are in lmevi's compilation cache (LMEVI_CACHE_DIR, or the user cache folder)\n"
            "and a later process's first fit of such a model loads them instead of compiling."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument(
        "--sizes",
        default="small,medium",
        help="comma-separated sizes among small (200 rows), medium (900), large (3,500) (default: %(default)s)",
    )
    w.add_argument(
        "--formula",
        action="append",
        metavar="FORMULA",
        help="a structure to warm up, in the simulated columns y, x, g, h (repeatable; default: the four of "
        "lmevi.warmup.STRUCTURES)",
    )
    w.set_defaults(run=run_warmup)
    return parser


def run_warmup(args: argparse.Namespace) -> int:
    """The ``warmup`` command: fit the workload, one line per fit."""
    from lmevi import warmup

    from lmevi.runtime import cache
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in warmup.SIZES]
    if unknown or not sizes:
        _error(f"--sizes takes {', '.join(warmup.SIZES)}, got {args.sizes!r}")
        return EXIT_BAD_INPUT
    folder = cache.cache_dir()
    if folder is None:
        print(f"{PROG}: warning: the compilation cache is off (LMEVI_CACHE_DIR), so warm-up lasts only for "
              "this process", file=sys.stderr)
    else:
        print(f"compiling into {folder}")
    show = lambda r: print(f"  {r['size']:<6} {'REML' if r['reml'] else 'ML  '} {r['formula']:<28} {r['seconds']:.2f} s")  # noqa: E731
    try:
        records = warmup.warmup(tuple(args.formula) if args.formula else warmup.STRUCTURES, sizes, progress=show)
    except (ValueError, TypeError) as err:
        _error(err)
        return EXIT_BAD_INPUT
    print(f"{len(records)} fits in {sum(r['seconds'] for r in records):.1f} s")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    """The ``fit`` command: read, fit, print, write; bad input returns 2 with one line on stderr."""
    try:
        if args.out is not None:
            make_folder(args.out)  # fail before fitting, not after
        data = read_data(args.data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            result = fit(
                args.formula,
                data,
                family=args.family,
                q=None if args.family in Q_FAMILIES else args.q,
                reml=False if args.ml else None,
                method=args.method,
                elbo=args.elbo,
                num_samples=args.num_samples,
                residual_scale=args.residual_scale,
                num_steps=args.num_steps,
                tol=args.tol,
                seed=args.seed,
                progress=not args.no_progress,
                dtype="float32" if args.float32 else "float64",
            )
    except (ValueError, TypeError, OSError) as err:  # FormulaError and pandas' parser errors are ValueErrors
        _error(err)
        return EXIT_BAD_INPUT
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            print(f"{PROG}: warning: {_one_line(w.message)}", file=sys.stderr)
        else:  # anything else goes back through the warning filters the user has
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(result.summary())
    if args.out is not None:
        try:
            paths = write_outputs(result, args.out)
        except OSError as err:
            _error(f"cannot write into {str(args.out)!r}: {err}")
            return EXIT_BAD_INPUT
        print(f"\nWrote {', '.join(p.name for p in paths)} to {args.out}")
    return 0


def read_data(path: str) -> pd.DataFrame:
    """Read a CSV; errors name the file."""
    try:
        return pd.read_csv(path)
    except OSError as err:
        raise OSError(f"cannot read data file {path!r}: {err.strerror or err}") from None
    except (ValueError, pd.errors.ParserError) as err:  # includes UnicodeDecodeError and EmptyDataError
        raise ValueError(f"cannot read data file {path!r} as CSV: {_one_line(err)}") from None


def make_folder(path: Path) -> None:
    """Create the output folder and its parents if missing; errors name the folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create output folder {str(path)!r}: {err.strerror or err}") from None


def write_outputs(result: FitResult, out: Path) -> list[Path]:
    """Write the tables and the residual plot of a fit into ``out``; returns the paths written."""
    make_folder(out)
    paths = [out / name for name in OUTPUT_FILES]
    fixef_table(result).to_csv(paths[0], index=False)
    result.ranef().to_csv(paths[1], index=False)
    result.varcorr().to_csv(paths[2], index=False)
    residual_figure(result).savefig(paths[3], dpi=120)
    return paths


def fixef_table(result: FitResult) -> pd.DataFrame:
    """``term, estimate`` and, when beta is in q, ``std_error`` (its posterior SD), one row per fixed effect."""
    est = result.fixef()
    table = pd.DataFrame({"term": est.index, "estimate": est.to_numpy()})
    se = result.fixef_se()
    if se is not None:
        table["std_error"] = se[est.index].to_numpy()
    return table


def residual_figure(result: FitResult):
    """Residuals against fitted values (with a zero line) and a histogram of the residuals.

    Uses matplotlib's Agg canvas directly rather than ``pyplot``, so no global backend state changes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fitted, resid = np.asarray(result.fitted), np.asarray(result.residuals())
    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_scatter, ax_hist = fig.subplots(1, 2)
    ax_scatter.scatter(fitted, resid, s=8, alpha=0.5, linewidths=0)
    ax_scatter.axhline(0.0, color="black", linewidth=0.8)
    ax_scatter.set(xlabel="fitted", ylabel="residual", title="Residuals vs fitted")
    ax_hist.hist(resid, bins="auto")
    ax_hist.set(xlabel="residual", ylabel="count", title="Residuals")
    fig.suptitle(result.info.formula.text)
    return fig


def _error(err) -> None:
    print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
