"""Comparing fits, as lme4's ``anova(m1, m2, ...)``: likelihood-ratio tests of nested models.

Only exact log-likelihoods are compared (``q="exact"``, or a variational fit whose q is exact,
:attr:`~lmevi.result.fitresult.FitResult.exact`): an ELBO is a lower bound whose gap differs between models, so a
difference of ELBOs is not a likelihood ratio. ``approximate=True`` compares ELBOs anyway and says so.
REML fits are refitted by maximum likelihood first, as lme4 does (REML likelihoods of models with different
fixed effects are not comparable), with a :class:`RefitWarning` in place of lme4's message.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from lmevi.runtime.options import check_bool
from lmevi.result.fitresult import FitResult


class RefitWarning(UserWarning):
    """lme4's "refitting model(s) with ML (instead of REML)"."""


def anova(*fits: FitResult, refit: bool = True, approximate: bool = False, type: int = 3,
          ddf: str | None = "default") -> pd.DataFrame:
    """lme4's likelihood-ratio table for two or more fits of the same data; for ONE fit, lmerTest's F tests of
    its fixed-effect terms (``anova(m, type = 3, ddf = "Satterthwaite")``, :meth:`FitResult.anova`).

    Args:
        fits: fitted models, in any order; rows come sorted by the number of parameters, as lme4's.
        refit: refit REML fits by maximum likelihood first (lme4's default ``refit = TRUE``).
        approximate: allow variational fits whose ELBO is only a lower bound (their ELBO stands in for the
            log-likelihood, and the table's ``attrs["approximate"]`` is ``True``).
        type, ddf: one fit only: type 3 or 1 hypotheses, and the denominator df (``"satterthwaite"``, the
            default for exact Gaussian fits; ``"kenward_roger"``, ``"residual"``, ``None``).

    Returns:
        One fit: indexed by term, ``num_df, den_df, F, p``. Several: columns ``npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq)``, indexed ``m1, m2, ...`` in the
        order the fits were given.
    """
    if len(fits) == 1 and isinstance(fits[0], FitResult):
        return fits[0].anova(type=type, ddf=ddf)
    refit = check_bool("refit", refit)
    approximate = check_bool("approximate", approximate)
    if len(fits) < 2 or not all(isinstance(f, FitResult) for f in fits):
        raise TypeError("anova tests one FitResult's terms, anova(m), or compares two or more: anova(m1, m2, ...)")
    names = [f"m{i + 1}" for i in range(len(fits))]
    first = fits[0]
    for name, f in zip(names, fits):
        if f.info.n_obs != first.info.n_obs or not np.array_equal(f.y, first.y):
            raise ValueError(f"anova compares fits of the same data; {name} was fitted to other rows or response")
    if refit and any(f.options.reml for f in fits):
        warnings.warn("refitting model(s) with ML (instead of REML)", RefitWarning, stacklevel=2)
        fits = tuple(f.refit(reml=False) if f.options.reml else f for f in fits)
    elif any(f.options.reml for f in fits) and len({f.info.fixed_names for f in fits}) > 1:
        raise ValueError("REML fits with different fixed effects are not comparable: use refit=True")
    inexact = [name for name, f in zip(names, fits) if not f.exact]
    if inexact and not approximate:
        raise ValueError(
            f"{', '.join(inexact)}: variational fit(s) whose ELBO is only a lower bound, so differences are not "
            "likelihood ratios; fit with q='exact' (or q='auto'), or pass approximate=True to compare ELBOs"
        )
    loglik = np.array([f.elbo for f in fits])
    npar = np.array([f.n_params for f in fits])
    n = first.info.n_obs
    table = pd.DataFrame(
        {
            "npar": npar,
            "AIC": -2 * loglik + 2 * npar,
            "BIC": -2 * loglik + npar * np.log(n),
            "logLik": loglik,
            "deviance": -2 * loglik,
        },
        index=names,
    )
    table = table.iloc[np.argsort(npar, kind="stable")]
    from scipy import stats  # imported here: scipy.stats loads scipy.optimize, which import lmevi does not need

    chisq = 2 * np.diff(table["logLik"].to_numpy())
    df = np.diff(table["npar"].to_numpy())
    with np.errstate(invalid="ignore"):
        p = np.where(df > 0, stats.chi2.sf(np.maximum(chisq, 0.0), np.maximum(df, 1)), np.nan)
    table["Chisq"] = np.concatenate([[np.nan], np.maximum(chisq, 0.0)])
    table["Df"] = np.concatenate([[np.nan], df])
    table["Pr(>Chisq)"] = np.concatenate([[np.nan], p])
    table.attrs["approximate"] = bool(inexact)
    return table
