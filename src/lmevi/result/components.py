"""Names of a fit's variance components, as lme4 prints them: the grouping factor of each term, and the SD of every
random coefficient and the residual under the labels ``sd()`` and ``varcorr()`` use.
"""

from __future__ import annotations

import collections

import numpy as np

from lmevi.frame.design import DesignInfo
from lmevi.q.model import cov_sd_corr


def term_groups(info: DesignInfo) -> list[str]:
    """Each term's ``grp`` as lme4's ``as.data.frame(VarCorr(m))`` names it: a second term on the same factor
    is ``g.1``, a third ``g.2``."""
    seen = collections.Counter()
    out = []
    for term in info.terms:
        out.append(term.group if not seen[term.group] else f"{term.group}.{seen[term.group]}")
        seen[term.group] += 1
    return out


def sd_components(info: DesignInfo, chol, sigma: float) -> tuple[list[str], np.ndarray]:
    """Labels and values of the SD of every random coefficient and of the residual (``Residual``), the one
    labelling rule of :meth:`FitResult.sd` and the ArviZ export.

    A coefficient is labelled by its grouping factor where that factor has one random coefficient in all
    (``s``), else ``factor:coefficient`` (``Subject:Days``; for ``(1|g) + (0+x|g)``: ``g:(Intercept)`` and
    ``g:x``). The labels are unique: a formula that repeats a coefficient on a factor is refused when the
    design is built.
    """
    per_group = collections.Counter()
    for term in info.terms:
        per_group[term.group] += len(term.coef_names)
    labels, values = [], []
    for term, L in zip(info.terms, chol):
        _, sd, _ = cov_sd_corr(L)
        for name, value in zip(term.coef_names, sd):
            labels.append(term.group if per_group[term.group] == 1 else f"{term.group}:{name}")
            values.append(value)
    labels.append("Residual")
    values.append(float(sigma))
    return labels, np.asarray(values)


def percent_label(p: float) -> str:
    """R's column name for a quantile (``format(100 * p, trim = TRUE, digits = 3)`` then ``" %"``)."""
    return f"{100.0 * p:.3g} %"
