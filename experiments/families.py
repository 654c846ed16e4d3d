"""A study of the three q's: mean-field, structured and exact, on designs of growing size and imbalance.

For each simulated design and size, fit the same model (REML) with ``q="meanfield"``, ``q="structured"`` and
``q="exact"`` (lme4's profiled criterion, the reference: its estimates are lme4's), and record

* the relative error of every variance component's SD against the exact fit's;
* the median over levels of the ratio of posterior SDs (``condsd``, given beta) to the exact ones, per factor;
* wall time: the first fit of that shape in the process (compilation included, warm cache) and a second one.

Designs (Goplerud, Papaspiliopoulos & Zanella, Biometrika 2024, study the same two regimes):

* ``crossed``: ``y ~ x + (1 | a) + (1 | b)``, ``a`` with twice ``b``'s levels, each row a random pair;
* ``crossed-skewed``: the same with level frequencies proportional to ``1 / rank`` (Zipf), as real raters and
  items are;
* ``nested``: ``y ~ x + (1 | s) + (1 | g) + (1 | h)``, ``g`` nested in ``h`` (10 levels of ``g`` per ``h``), as
  InstEval's instructors in departments, and ``s`` crossed with both, as its students; ``g`` grows past
  ``small_threshold`` (50) and ``h`` at the largest size too, and each is then a large factor of its own.

InstEval (the tutorial's model) is added as one more row. The figures are in the style of the paper: error
against size, one line per q. Writes ``results/families/``: ``families.csv``, ``families.json``,
``sd_error.png``, ``condsd_ratio.png``, ``seconds.png`` and ``families.md``.

The exact fit's time against its dense block size also gives ``q="auto"``'s crossover
(``lmevi.fitting.build.AUTO_EXACT_MAX``): the block at which an exact fit reaches :data:`BUDGET_SECONDS` of warm wall
time on this machine.

Usage, from the repository's root: ``python -m experiments.families [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import lmevi
from lmevi.exact import structure as structure_lib

ROOT = Path(__file__).resolve().parents[1]
QS = ("meanfield", "structured", "exact")
SIZES = (50, 100, 200, 400, 800, 1600)  # levels of the factor that stays in the dense block (b, or g)
QUICK_SIZES = (50, 100)
# The exact fit "stops paying" where its warm wall time reaches this many seconds (2 cores).
BUDGET_SECONDS = 5.0
SD_TRUE = {"a": 1.0, "b": 0.5, "h": 0.5, "g": 1.0, "Residual": 1.0}


def simulate(design: str, size: int, seed: int = 0) -> tuple[str, pd.DataFrame]:
    """``(formula, data)`` of one design at one size (see the module docstring); ``size`` is the number of
    levels of the factor left in the dense block: ``b`` (crossed) or ``g`` (nested, with ``size / 10`` levels
    of ``h`` and a crossed factor ``s`` of ``3 size`` levels that is eliminated first)."""
    rng = np.random.default_rng(seed)
    if design.startswith("crossed"):
        J_b, J_a = size, 2 * size
        n = 10 * J_a
        if design == "crossed-skewed":
            pa, pb = 1.0 / np.arange(1, J_a + 1), 1.0 / np.arange(1, J_b + 1)
            a = rng.choice(J_a, n, p=pa / pa.sum())
            b = rng.choice(J_b, n, p=pb / pb.sum())
        else:
            a, b = rng.integers(0, J_a, n), rng.integers(0, J_b, n)
        x = rng.normal(size=n)
        y = (1.0 + 0.5 * x + SD_TRUE["a"] * rng.normal(size=J_a)[a] + SD_TRUE["b"] * rng.normal(size=J_b)[b]
             + SD_TRUE["Residual"] * rng.normal(size=n))
        return "y ~ x + (1 | a) + (1 | b)", pd.DataFrame({"y": y, "x": x, "a": a, "b": b})
    # nested: g nested in h, 10 levels of g per h, 8 rows per g; size = levels of g
    J_g = size
    J_h = max(J_g // 10, 2)
    n = 8 * J_g
    g = rng.integers(0, J_g, n)
    h = g % J_h
    x = rng.normal(size=n)
    y = (1.0 + 0.5 * x + SD_TRUE["h"] * rng.normal(size=J_h)[h] + SD_TRUE["g"] * rng.normal(size=J_g)[g]
         + SD_TRUE["Residual"] * rng.normal(size=n))
    # a student-like crossed factor s, so that g is not the largest term and nesting meets a split
    s = rng.integers(0, 3 * J_g, n)
    y = y + 0.3 * rng.normal(size=3 * J_g)[s]
    return "y ~ x + (1 | s) + (1 | g) + (1 | h)", pd.DataFrame({"y": y, "x": x, "s": s, "g": g, "h": h})


def _fit(formula: str, data: pd.DataFrame, q: str) -> tuple[lmevi.FitResult, float, float]:
    """The fit, and the wall time of a first and of a second call."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = lmevi.fit(formula, data, q=q, progress=False)
        times.append(time.perf_counter() - t0)
    return m, times[0], times[1]


def compare(design: str, size: int, formula: str, data: pd.DataFrame) -> list[dict]:
    """One row per q: SD errors and posterior-SD ratios against the exact fit, and times."""
    fits = {q: _fit(formula, data, q) for q in QS}
    ref, _, _ = fits["exact"]
    ref_sd, ref_re = ref.sd(), ref.ranef()
    model = lmevi.build_model(formula, data, q="exact")
    rows = []
    for q, (m, first, warm) in fits.items():
        sd = m.sd()
        row = {"design": design, "size": size, "q": q, "n_obs": len(data),
               "dense_block": structure_lib.dense_block_size(model.problem.design),
               "first_seconds": first, "warm_seconds": warm, "steps": int(m.steps), "converged": bool(m.converged)}
        floor = 1e-3 * ref_sd["Residual"]  # an SD at zero in the exact fit: errors relative to 1e-3 sigma
        for k in ref_sd.index:
            row[f"sd_{k}"] = float(sd[k])
            row[f"sd_err_{k}"] = float(abs(sd[k] - ref_sd[k]) / max(ref_sd[k], floor))
        re = m.ranef().merge(ref_re, on=["grpvar", "term", "grp"], suffixes=("", "_exact"))
        for g, part in re.groupby("grpvar"):
            ok = part["condsd_exact"] > 0  # a factor whose exact SD is zero has no posterior spread to compare
            row[f"condsd_ratio_{g}"] = float(np.median(part["condsd"][ok] / part["condsd_exact"][ok])) if ok.any() else None
        rows.append(row)
    return rows


def crossover(table: pd.DataFrame) -> dict:
    """Where the exact fit's warm time reaches :data:`BUDGET_SECONDS`: a power law fitted to the exact rows'
    (dense block, warm seconds) over blocks of at least 200 (below, fixed costs dominate)."""
    ex = table[(table["q"] == "exact") & (table["dense_block"] >= 200)]
    if len(ex) < 2:
        return {"dense_block_at_budget": None, "slope": None, "budget_seconds": BUDGET_SECONDS}
    slope, icpt = np.polyfit(np.log(ex["dense_block"]), np.log(ex["warm_seconds"]), 1)
    at = float(np.exp((np.log(BUDGET_SECONDS) - icpt) / slope))
    return {"dense_block_at_budget": at, "slope": float(slope), "budget_seconds": BUDGET_SECONDS,
            "auto_exact_max": lmevi.fitting.build.AUTO_EXACT_MAX}


def figures(table: pd.DataFrame, out: Path) -> None:
    designs = list(dict.fromkeys(table["design"]))
    style = {"meanfield": ("tab:red", "o"), "structured": ("tab:blue", "s"), "exact": ("black", "^")}

    def panel_plot(name: str, ylabel: str, value, logy: bool, title: str):
        import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

        fig, axes = plt.subplots(1, len(designs), figsize=(4.2 * len(designs), 3.6), squeeze=False)
        for ax, design in zip(axes[0], designs):
            part = table[table["design"] == design]
            for q in QS:
                rows = part[part["q"] == q].sort_values("size")
                y = value(rows)
                if y is None:
                    continue
                c, mk = style[q]
                ax.plot(rows["size"], y, color=c, marker=mk, label=q)
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_title(design)
            ax.set_xlabel("levels of the dense-block factor")
            ax.set_ylabel(ylabel)
        axes[0][0].legend()
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    def worst_sd_error(rows):
        cols = [c for c in rows.columns if c.startswith("sd_err_") and c != "sd_err_Residual"]
        return np.maximum(rows[cols].max(axis=1).to_numpy(), 1e-12)

    panel_plot("sd_error.png", "largest relative SD error vs exact", worst_sd_error, True,
               "Variance components: relative error of the worst random-effect SD against the exact fit "
               "(exact: 0, drawn at 1e-12)")

    def min_ratio(rows):
        cols = [c for c in rows.columns if c.startswith("condsd_ratio_")]
        return rows[cols].min(axis=1).to_numpy()

    panel_plot("condsd_ratio.png", "smallest median condsd ratio", min_ratio, False,
               "Posterior SDs: median over levels of condsd(q) / condsd(exact), the smallest factor's")
    panel_plot("seconds.png", "warm wall time (s)", lambda r: r["warm_seconds"].to_numpy(), True,
               f"Time per fit (second call, 2 cores); the exact fit's budget for q='auto' is {BUDGET_SECONDS:g} s")


def markdown(table: pd.DataFrame, cross: dict) -> str:
    """One table per design, with the columns that design has."""
    parts = ["# The three q's against the exact fit", "",
             "SD errors are relative to the exact fit's SDs (floor 1e-3 residual SDs); condsd ratios are medians "
             "over levels of the posterior SD (given beta) over the exact conditional SD; seconds are the second "
             "fit of that shape in the process (warm) and the first (compilation included, warm cache).", ""]
    for design, part in table.groupby("design", sort=False):
        part = part.dropna(axis=1, how="all")
        cols = ["size", "dense_block", "q", "warm_seconds", "first_seconds", "steps"]
        cols += [c for c in part.columns if c.startswith("sd_err_") or c.startswith("condsd_ratio_")]
        t = part[cols].copy()
        for c in cols:
            if c.startswith("sd_err_"):
                t[c] = t[c].map(lambda v: "" if pd.isna(v) else f"{v:.1e}")
            elif c.startswith("condsd_ratio_"):
                t[c] = t[c].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
            elif c.endswith("_seconds"):
                t[c] = t[c].map(lambda v: f"{v:.3f}")
        parts += [f"## {design}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        parts += ["| " + " | ".join(str(v) for v in row) + " |" for row in t.itertuples(index=False)]
        parts.append("")
    at = cross.get("dense_block_at_budget")
    if at:
        parts.append(f"The exact fit's warm time grows as (dense block)^{cross['slope']:.2f} over blocks of 200 and "
                     f"more; it reaches {cross['budget_seconds']:g} s at a dense block of about {at:.0f} "
                     f"coefficients (q='auto' uses the exact q up to lmevi.fitting.build.AUTO_EXACT_MAX = "
                     f"{cross['auto_exact_max']}).")
    return "\n".join(parts) + "\n"


def main(argv=None) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # files only: this process's choice, made when it runs, not at import
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "families")
    p.add_argument("--quick", action="store_true", help="two small sizes, no InstEval (a smoke test)")
    p.add_argument("--replot", action="store_true", help="redo the figures and tables from the saved results")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((args.out / "families.json").read_text())
        table = pd.DataFrame(saved["rows"])
        figures(table[table["design"] != "InstEval"], args.out)
        (args.out / "families.md").write_text(markdown(table, saved["crossover"]))
        return saved
    rows = []
    for design in ("crossed", "crossed-skewed", "nested"):
        for size in QUICK_SIZES if args.quick else SIZES:
            formula, data = simulate(design, size)
            rows += compare(design, size, formula, data)
            last = rows[-3:]
            print(f"{design:15s} {size:5d}: " + "  ".join(
                f"{r['q']} {r['warm_seconds']:.2f}s err {max(v for k, v in r.items() if k.startswith('sd_err_')):.1e}"
                for r in last), flush=True)
    if not args.quick:
        data = lmevi.load_insteval()
        rows += compare("InstEval", data["d"].nunique(), "y ~ service + (1|s) + (1|d) + (1|dept)", data)
    table = pd.DataFrame(rows)
    cross = crossover(table)
    table.to_csv(args.out / "families.csv", index=False)
    (args.out / "families.json").write_text(json.dumps({"rows": rows, "crossover": cross}, indent=2) + "\n")
    figures(table[table["design"] != "InstEval"], args.out)
    (args.out / "families.md").write_text(markdown(table, cross))
    print(json.dumps(cross, indent=2))
    return {"rows": rows, "crossover": cross}


if __name__ == "__main__":
    main()
