"""The InstEval reproduction's report: compare fits with saved lme4 output, and draw the tutorial's figures.

It belongs to :mod:`experiments.insteval` (limits and names are InstEval's), not to the package. It draws with
``matplotlib.pyplot``, imported inside the drawing functions, and leaves the choice of backend to the script's
``main``.

Every comparison joins estimates by level label (``merge`` on ``grpvar, term, grp``), never by row
position: the Edward tutorial's department figure paired lme4's rows with its own by position, and sized
the points by counts in a third order. :func:`plot_department_pairing` shows what that did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# lme4's saved fits and the comparisons by level label, under the names the reproduction uses
from lmevi.result.lme4ref import effect_agreement, join_by_label, join_effects, lme4_sd  # noqa: F401 - used by insteval.py
from lmevi.result.lme4ref import load_fit as load_lme4  # noqa: F401 - used by insteval.py
from lmevi.result.fitresult import FitResult


# ----------------------------------------------------------------------------------------------------
# figures


def plot_residual_histograms(residuals: dict[str, np.ndarray], path: Path, title: str, cols: int = 3) -> None:
    """Histograms of test-set residuals with the tutorial's axes (75 bins, x in [-4, 4]), one panel per
    entry: the fit at several steps, or several fits after training."""
    cols = min(cols, len(residuals))
    rows = int(np.ceil(len(residuals) / cols))
    import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax, (label, r) in zip(axes.ravel(), residuals.items()):
        ax.hist(r, 75, color="C0")
        ax.set_xlim(-4, 4)
        ax.set_title(f"{label}: mean {np.mean(r):+.3f}, RMSE {np.sqrt(np.mean(r**2)):.3f}", fontsize=9)
        ax.set_xlabel("predicted - observed rating")
    for ax in axes.ravel()[len(residuals):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("test-set rows")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_LIMITS = {"s": (-1.0, 1.0), "d": (-1.5, 1.5)}
_NAMES = {"s": "Student", "d": "Instructor", "dept": "Department"}


def plot_effects_vs_lme4(
    joined: pd.DataFrame, intercepts: tuple[float, float], counts: pd.Series, path: Path, title: str
) -> None:
    """Student, instructor and department effects against lme4, joined by label (the tutorial's three
    scatter plots, with its axes). Departments are drawn as intercept + effect, sized by their number of
    observations (looked up by label).

    Args:
        joined: output of :func:`join_effects` for one fit.
        intercepts: ``(ours, lme4)`` intercepts added to the department effects.
        counts: rows per department label.
        path: the PNG to write.
        title: figure title.
    """
    import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    for ax, grp in zip(axes, ["s", "d", "dept"]):
        d = joined[joined["grpvar"] == grp]
        x, y = d["condval_lme4"].to_numpy(), d["condval"].to_numpy()
        corr = np.corrcoef(x, y)[0, 1]
        rmse = np.sqrt(np.mean((x - y) ** 2))
        if grp == "dept":
            x, y = x + intercepts[1], y + intercepts[0]
            sizes = 0.01 * counts.reindex(d["grp"]).to_numpy()
            ax.scatter(x, y, s=sizes, alpha=0.6, color="C1")
            lo, hi = 3.0, 3.5
        else:
            ax.scatter(x, y, s=4, alpha=0.35, color="C0")
            lo, hi = _LIMITS[grp]
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        label = "intercept + effect" if grp == "dept" else "effects"
        ax.set_xlabel(f"{_NAMES[grp]} {label} from lme4")
        ax.set_ylabel(f"{_NAMES[grp]} {label} from lmevi")
        ax.set_title(f"{_NAMES[grp]} effects comparison\ncorr {corr:.5f}, RMSE {rmse:.4f} (effects, by label)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_department_pairing(
    tutorial: pd.DataFrame, structured: pd.DataFrame, lme4: pd.DataFrame, intercepts: dict[str, float],
    counts_by_label: pd.Series, counts_in_tutorial_order: np.ndarray, path: Path,
) -> None:
    """Department intercepts three ways: the tutorial configuration's effects paired with lme4's by row
    position (as the tutorial's figure did, with sizes in ``value_counts`` order), the same effects paired by
    label, and the structured family's effects paired by label.

    Args:
        tutorial, structured: ``ranef()`` of the two fits.
        lme4: lme4's ``ranef`` table, in lme4's row order.
        intercepts: ``{"tutorial", "structured", "lme4"}`` intercepts added to the effects.
        counts_by_label: rows per department label.
        counts_in_tutorial_order: the tutorial's ``train.dept.value_counts()`` values, in that order.
        path: the PNG to write.
    """
    r = lme4[lme4["grpvar"] == "dept"].reset_index(drop=True)
    panels = []
    o = tutorial[tutorial["grpvar"] == "dept"].reset_index(drop=True)
    panels.append((
        r["condval"].to_numpy() + intercepts["lme4"], o["condval"].to_numpy() + intercepts["tutorial"],
        0.01 * counts_in_tutorial_order, "tutorial configuration,\npaired by row position (the tutorial's plot)",
    ))
    for name, fit_ranef in (("tutorial", tutorial), ("structured", structured)):
        j = join_by_label(fit_ranef[fit_ranef["grpvar"] == "dept"], r)
        panels.append((
            j["condval_lme4"].to_numpy() + intercepts["lme4"], j["condval"].to_numpy() + intercepts[name],
            0.01 * counts_by_label.reindex(j["grp"]).to_numpy(),
            f"{'tutorial configuration' if name == 'tutorial' else 'structured q (recommended)'},\npaired by label",
        ))
    import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    for ax, (x, y, s, name) in zip(axes, panels):
        ax.scatter(x, y, s=s, alpha=0.6, color="C1")
        ax.plot([3.0, 3.5], [3.0, 3.5], color="k", lw=0.8)
        ax.set_xlim(3.0, 3.5)
        ax.set_ylim(3.0, 3.5)
        ax.set_xlabel("Department effects from lme4 (intercept + effect)")
        ax.set_ylabel("Department effects from lmevi (intercept + effect)")
        ax.set_title(f"{name}: corr {np.corrcoef(x, y)[0, 1]:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_elbo_traces(traces: dict[str, np.ndarray], path: Path) -> None:
    """ELBO against step for each fit, one panel per fit (the objectives differ: sigma fixed or not)."""
    cols = min(2, len(traces))
    rows = int(np.ceil(len(traces) / cols))
    import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(traces):]:
        ax.axis("off")
    for ax, (name, tr) in zip(axes.ravel(), traces.items()):
        steps = np.arange(1, len(tr) + 1)
        ax.plot(steps, tr, lw=0.8)
        ax.set_xscale("log")
        lo = np.percentile(tr, 5)
        ax.set_ylim(lo - 0.02 * abs(lo - tr.max()), tr.max() + 0.05 * abs(tr.max() - lo))
        ax.set_title(f"{name}\nfinal ELBO {tr[-1]:.1f} after {len(tr)} steps", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("ELBO")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variance_components(table: pd.DataFrame, path: Path) -> None:
    """SD of each random term and the residual for each configuration against lme4 REML and ML.

    Args:
        table: rows = components (``s``, ``d``, ``dept``, ``Residual``), columns = fits.
    """
    comps = list(table.index)
    import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

    fig, axes = plt.subplots(1, len(comps), figsize=(3.6 * len(comps), 3.8))
    colors = {c: f"C{i}" for i, c in enumerate(table.columns)}
    for ax, comp in zip(axes, comps):
        vals = table.loc[comp]
        ax.barh(range(len(vals)), vals.to_numpy(), color=[colors[c] for c in vals.index])
        ax.set_yticks(range(len(vals)), vals.index, fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(vals.to_numpy()):
            ax.text(v, i, f" {v:.4f}", va="center", fontsize=7)
        ax.set_xlim(0, 1.3 * np.nanmax(vals.to_numpy()))
        ax.set_title(f"SD of {comp}")
    fig.suptitle("Variance components (full data): each configuration against lme4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_condsd(joined: dict[str, pd.DataFrame], path: Path) -> None:
    """Posterior SDs under q against lme4's conditional SDs, per grouping factor, for several fits."""
    names = list(joined)
    import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.8 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, grp in zip(row, ["s", "d", "dept"]):
            d = joined[name][joined[name]["grpvar"] == grp]
            x, y = d["condsd_lme4"].to_numpy(), d["condsd"].to_numpy()
            ax.scatter(x, y, s=4, alpha=0.4)
            lo, hi = 0.0, 1.05 * max(x.max(), y.max())
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
            within = np.mean(np.abs(y / x - 1) <= 0.05)
            ax.set_title(f"{name}: {_NAMES[grp]}\n{within:.1%} within 5% of lme4, median ratio {np.median(y / x):.3f}", fontsize=9)
            ax.set_xlabel("lme4 conditional SD")
            ax.set_ylabel("lmevi posterior SD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sd_table(fits: dict[str, FitResult]) -> pd.DataFrame:
    """SDs of each fit, components as rows."""
    return pd.DataFrame({name: fit.sd() for name, fit in fits.items()})


def markdown(df: pd.DataFrame, floatfmt: str = ".4f", formats: dict[str, str] | None = None) -> str:
    """A pipe table (pandas' ``to_markdown`` needs the ``tabulate`` package, which we do not depend on).

    Args:
        df: the table.
        floatfmt: format of float cells.
        formats: per-column float formats that override ``floatfmt`` (``{"corr": ".6f"}``).
    """
    formats = formats or {}

    def fmt(v, col):
        if isinstance(v, (float, np.floating)):
            return format(v, formats.get(col, floatfmt)) if np.isfinite(v) else "–"
        return str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(v, c) for v, c in zip(row.to_numpy(), cols)) + " |")
    return "\n".join(lines)
