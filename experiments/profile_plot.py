"""The profile figure, as lme4's ``xyplot(profile(m))``: zeta against each parameter, one panel each, with the
profile confidence interval's ends marked. Used by ``experiments/inference.py``."""

from __future__ import annotations

import numpy as np
import pandas as pd


def plot_profile(table: pd.DataFrame, ci: pd.DataFrame | None = None, level: float = 0.95, path=None):
    """zeta against each profiled parameter, one panel each (lme4's ``xyplot(profile(m))``), with the quantiles
    ``+-qnorm((1 + level) / 2)`` and, given ``ci``, the interval's ends marked.

    Args:
        table: :meth:`lmevi.FitResult.profile`'s traces.
        ci: ``m.confint(method="profile")``'s intervals at ``level``, or ``None``.
        level: the intervals' level.
        path: where to save the figure; ``None``: not saved.

    Returns:
        The matplotlib figure.
    """
    from statistics import NormalDist

    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    names = list(dict.fromkeys(table[".par"]))
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        trace = table[table[".par"] == name].sort_values(".focal")
        ax.plot(trace[".focal"], trace[".zeta"], "-", color="C0", lw=1.2)
        ax.plot(trace[".focal"], trace[".zeta"], ".", color="C0", ms=3)
        for q in (-z, z):
            ax.axhline(q, color="0.6", lw=0.8, ls="--")
        if ci is not None and name in ci.index:
            for end, q in zip(ci.loc[name], (-z, z)):
                if np.isfinite(end):
                    ax.plot([end, end], [0.0 if q > 0 else q, q if q > 0 else 0.0], color="C3", lw=0.9)
        ax.axhline(0.0, color="0.85", lw=0.6)
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("zeta")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig
