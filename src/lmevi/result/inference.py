"""Inference after the fit, in lme4/lmerTest/emmeans' words: coefficient tables with Satterthwaite or
Kenward-Roger dfs, one model's type III / type I anova, contrasts, profile / Wald / bootstrap intervals and
estimated marginal means. :class:`lmevi.result.fitresult.FitResult`'s methods delegate here.

Which tests a fit gets:

- an exact Gaussian fit (``q="exact"``, lme4's criterion): t tests with Satterthwaite's df (lmerTest's
  default, :mod:`lmevi.result.satterthwaite`), Kenward-Roger's adjusted covariance and df
  (:mod:`lmevi.result.kenward_roger`), or the residual df ``n - p``; z tests with ``ddf=None``;
- a variational fit (and every GLMM, whose fits are variational): z tests resting on q's normal posterior
  for beta (REML-like fits; an ML-like fit has no covariance for beta). Satterthwaite and Kenward-Roger are
  refused: they differentiate lme4's exact criterion, which such a fit did not maximise.

What every test of one fit shares is computed once and kept in the fit's cache (``fit._cache``): the
design rebuilt in the data's units, Satterthwaite's derivatives, Kenward-Roger's adjustment.

The heavy modules (SciPy, the derivatives) are imported inside the functions that use them: ``import lmevi``
and a small exact fit load no SciPy (``tests/test_side_effects.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from lmevi.result.fitresult import FitResult

DDF = ("satterthwaite", "kenward_roger", "residual", None)
_ALIASES = {"satterthwaite": "satterthwaite", "kenward_roger": "kenward_roger", "kenward-roger": "kenward_roger",
            "kr": "kenward_roger", "residual": "residual", "lme4": None, "none": None, "z": None}
VARIATIONAL_NOTE = ("z tests resting on q's approximate normal posterior for beta (a variational fit): "
                    "std_error is a posterior SD, not lme4's; no denominator df")


def is_exact_gaussian(fit: "FitResult") -> bool:
    """Whether ``fit`` maximised lme4's exact criterion (``q="exact"``, Gaussian, sigma estimated)."""
    o = fit.options
    return o.q == "exact" and fit.likelihood.moment_form and o.residual_scale is None


def default_ddf(fit: "FitResult") -> str | None:
    """``"satterthwaite"`` for exact Gaussian fits (lmerTest's default), else ``None`` (z tests)."""
    return "satterthwaite" if is_exact_gaussian(fit) else None


def check_ddf(fit: "FitResult", ddf) -> str | None:
    """``ddf`` normalised (``"Kenward-Roger"`` -> ``"kenward_roger"``; ``"default"`` -> :func:`default_ddf`),
    refusing what the fit cannot give."""
    if isinstance(ddf, str) and ddf.lower() == "default":
        return default_ddf(fit)
    key = None if ddf is None else _ALIASES.get(str(ddf).lower())
    if ddf is not None and (str(ddf).lower() not in _ALIASES):
        raise ValueError(f"ddf must be one of {DDF}, got {ddf!r}")
    if key in ("satterthwaite", "kenward_roger") and not is_exact_gaussian(fit):
        raise ValueError(
            f"ddf={key!r} differentiates lme4's exact REML/ML criterion, which this fit (q={fit.options.q!r}, "
            f"family={fit.options.family!r}) did not maximise; refit with q='exact' (Gaussian, sigma estimated), "
            "or use ddf=None for z tests on the approximate posterior")
    if key == "kenward_roger" and not fit.options.reml:
        raise ValueError("Kenward-Roger's adjustment is defined for REML fits (as pbkrtest's); refit with reml=True")
    return key


# ---------------------------------------------------------------------------------------------------- shared


def _cached(fit, key, build):
    cache = fit._cache
    if key not in cache:
        cache[key] = build()
    return cache[key]


def data_design(fit: "FitResult"):
    """The fit's design rebuilt from its formula and data in the data's units (float64), cached."""
    if fit.data is None:
        raise ValueError("this result keeps no data: inference rebuilds the design from the fit's formula and data")

    def build():
        import jax.numpy as jnp

        from lmevi.frame.design import build_design
        from lmevi.runtime.precision import x64

        return x64(build_design)(fit.info.formula, fit.data, jnp.float64, fit.options.missing)[0]

    return _cached(fit, "design", build)


def theta_of(fit: "FitResult") -> np.ndarray:
    """``(n_theta,)`` lme4's relative Cholesky parameters of the fit in the data's units (design order)."""
    from lmevi.exact.covfactors import theta_from_chol

    return np.asarray(theta_from_chol(fit.params.model.chol, float(fit.params.model.sigma)), np.float64)


def structure_of(fit: "FitResult"):
    """:func:`lmevi.exact.structure.build_structure` of :func:`data_design` for the fit's criterion, cached."""
    from lmevi.exact.structure import build_structure

    return _cached(fit, "structure", lambda: build_structure(data_design(fit), fit.options.reml))


def derivatives(fit: "FitResult"):
    """Satterthwaite's :class:`~lmevi.result.satterthwaite.VarparDerivatives` of an exact fit, cached."""
    from lmevi.result.satterthwaite import varpar_derivatives

    return _cached(fit, "satterthwaite", lambda: varpar_derivatives(
        None, theta_of(fit), float(fit.params.model.sigma), fit.options.reml, structure=structure_of(fit)))


def kr_adjustment(fit: "FitResult"):
    """Kenward-Roger's :class:`~lmevi.result.kenward_roger.KRAdjusted` of an exact REML fit, cached."""
    from lmevi.result.kenward_roger import kenward_roger_vcov

    return _cached(fit, "kenward_roger", lambda: kenward_roger_vcov(
        data_design(fit), theta_of(fit), float(fit.params.model.sigma)))


def _beta_vcov(fit: "FitResult") -> tuple[np.ndarray, np.ndarray]:
    return fit.fixef().to_numpy(np.float64), fit.vcov().to_numpy(np.float64)


def _note(fit: "FitResult", ddf) -> str | None:
    if fit.options.q == "exact" and not is_exact_gaussian(fit):
        return "Wald z tests of glmer's criterion (Laplace or quadrature), as glmer's summary"
    if not is_exact_gaussian(fit):
        return VARIATIONAL_NOTE
    return None if ddf is not None else "z tests (ddf=None): lme4's Wald statistics on a normal reference"


# ---------------------------------------------------------------------------------------------------- tests


def contest(fit: "FitResult", L, ddf="default") -> pd.DataFrame:
    """lmerTest's ``contest(m, L, ddf)``: one row of ``L`` ``(p,)`` or ``(1, p)``: a t test (columns
    ``estimate, std_error, df, t, p``); several ``(r, p)``: an F test (``num_df, den_df, F, p``). ``L`` may be a
    Series / DataFrame with the fixed effects' names as index / columns. ``ddf=None``: z and chi-square tests
    (``df`` infinite)."""
    from lmevi.result import hypotheses

    ddf = check_ddf(fit, ddf)
    L = _as_matrix(fit, L)
    if L.shape[0] == 1:
        row = _t_test(fit, L[0], ddf)
    elif ddf == "satterthwaite":
        from lmevi.result.satterthwaite import satterthwaite_md

        row = satterthwaite_md(L, derivatives(fit))._asdict()
    elif ddf == "kenward_roger":
        from lmevi.result.kenward_roger import kenward_roger_md

        r = kenward_roger_md(L, kr_adjustment(fit))
        row = {"num_df": r.num_df, "den_df": r.den_df, "F": r.F, "p": r.p}
    else:
        beta, V = _beta_vcov(fit)
        row = hypotheses.contest(L, beta, V, None if ddf is None else (lambda _: _residual_df(fit)))
    out = pd.DataFrame([row])
    out.attrs["note"] = _note(fit, ddf)
    return out


def _as_matrix(fit: "FitResult", L) -> np.ndarray:
    names = list(fit.info.fixed_names)
    if isinstance(L, pd.Series):
        L = L.reindex(names, fill_value=0.0).to_numpy(np.float64)[None]
    elif isinstance(L, pd.DataFrame):
        L = L.reindex(columns=names, fill_value=0.0).to_numpy(np.float64)
    L = np.atleast_2d(np.asarray(L, np.float64))
    if L.ndim != 2 or L.shape[1] != len(names):
        raise ValueError(f"L must have {len(names)} columns, one per fixed effect {names}; got shape {L.shape}")
    return L


def _residual_df(fit: "FitResult") -> float:
    return float(fit.info.n_obs - len(fit.info.fixed_names))


def _renamed(row: dict) -> dict:
    return {("std_error" if k == "se" else k): v for k, v in row.items()}


def _t_test(fit: "FitResult", l: np.ndarray, ddf) -> dict:
    """One contrast's row ``estimate, std_error, df, t, p``."""
    if ddf == "satterthwaite":
        from lmevi.result.satterthwaite import satterthwaite_1d

        return _renamed(satterthwaite_1d(l, derivatives(fit))._asdict())
    if ddf == "kenward_roger":
        from lmevi.result.kenward_roger import kenward_roger_1d

        return _renamed(kenward_roger_1d(l, kr_adjustment(fit))._asdict())
    from lmevi.result import hypotheses

    beta, V = _beta_vcov(fit)
    return hypotheses.contest(l, beta, V, None if ddf is None else (lambda _: _residual_df(fit)))


def coef_table(fit: "FitResult", ddf="default") -> pd.DataFrame:
    """The coefficient table of lmerTest's ``summary(m, ddf = ...)``: indexed by term, columns ``estimate,
    std_error, df, t, p`` (``df`` infinite and ``t`` a z ratio where ``ddf`` is ``None``). ``attrs["ddf"]``
    names the method and ``attrs["note"]`` says what the tests rest on where that is not lmerTest's."""
    ddf = check_ddf(fit, ddf)
    if fit.fixef_se() is None:
        fit.vcov()  # raises, naming the remedy
    p = len(fit.info.fixed_names)
    rows = [_t_test(fit, np.eye(p)[i], ddf) for i in range(p)]
    out = pd.DataFrame(rows, index=pd.Index(list(fit.info.fixed_names), name="term"))
    out = out[["estimate", "std_error", "df", "t", "p"]]
    out.attrs["ddf"] = ddf
    out.attrs["note"] = _note(fit, ddf)
    return out


def anova_table(fit: "FitResult", type: int = 3, ddf="default") -> pd.DataFrame:
    """lmerTest's ``anova(m, type = 3)`` (or ``type = 1``) of one model: indexed by term, ``num_df, den_df, F,
    p``; the hypotheses are lmerTest's (:mod:`lmevi.result.hypotheses`), each tested as :func:`contest` tests
    a matrix (Kenward-Roger: pbkrtest's scaled F)."""
    from lmevi.result import hypotheses

    if type not in (1, 3):
        raise ValueError(f"type must be 1 or 3, got {type!r}")
    ddf = check_ddf(fit, ddf)
    hyp = (hypotheses.type3_hypotheses if type == 3 else hypotheses.type1_hypotheses)(fit.info, fit.data)
    rows = {}
    for name, L in hyp.items():
        r = contest(fit, np.atleast_2d(L), ddf).iloc[0]
        if "F" not in r:  # one row: its F is t squared
            r = pd.Series({"num_df": 1, "den_df": r["df"], "F": r["t"] ** 2, "p": r["p"]})
        rows[name] = r[["num_df", "den_df", "F", "p"]]
    out = pd.DataFrame(rows.values(), index=pd.Index(list(rows), name="term"), columns=["num_df", "den_df", "F", "p"])
    out = out.astype({"num_df": int, "den_df": float, "F": float, "p": float})
    out.attrs["note"] = _note(fit, ddf)
    return out


# ---------------------------------------------------------------------------------------------------- intervals


def confint(fit: "FitResult", level: float = 0.95, method: str = "wald", n: int = 1000, seed: int = 0,
            progress: bool = False) -> pd.DataFrame:
    """lme4's ``confint(m, method = ...)``: ``"wald"`` the fixed effects' Wald intervals (lme4's ``parm =
    "beta_"``); ``"profile"`` and ``"boot"`` every parameter, rows named as ``oldNames = FALSE``
    (``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``, ``sigma``, then the fixed effects)."""
    method = str(method).lower()
    if method == "wald":
        return fit.confint(level)
    if not is_exact_gaussian(fit):
        raise ValueError(f"method={method!r} needs an exact Gaussian fit (q='exact'); this fit has q={fit.options.q!r}")
    if method == "profile":
        from lmevi.result.profile import profile_confint

        return profile_confint(fit, level)
    if method == "boot":
        return bootstrap(fit, n=n, seed=seed, progress=progress).confint(level)
    raise ValueError(f"method must be 'wald', 'profile' or 'boot', got {method!r}")


def profile(fit: "FitResult", which=None, n_points: int = 8) -> pd.DataFrame:
    """lme4's ``as.data.frame(profile(m, signames = FALSE))`` (:func:`lmevi.result.profile.profile`)."""
    from lmevi.result.profile import profile as traces

    if not is_exact_gaussian(fit):
        raise ValueError("profiles need an exact Gaussian fit (q='exact')")
    return traces(fit, which, n_points)


def bootstrap(fit: "FitResult", n: int = 1000, seed: int = 0, progress: bool = True, batch_size: int | None = None):
    """lme4's ``bootMer(m, nsim = n, use.u = FALSE)``: :func:`lmevi.result.bootstrap.bootstrap`."""
    from lmevi.result.bootstrap import bootstrap as run

    return run(fit, n=n, seed=seed, progress=progress, batch_size=batch_size)


def simulate(fit: "FitResult", n: int = 1, seed: int = 0) -> np.ndarray:
    """lme4's ``simulate(m, nsim = n)``: ``(n_obs, n)`` responses (:func:`lmevi.result.simulate.simulate`)."""
    from lmevi.result.simulate import simulate as draw

    return draw(fit, n, seed)


# ---------------------------------------------------------------------------------------------------- emmeans


def emmeans(fit: "FitResult", specs, pairs: bool = False, ddf="default", adjust: str = "none",
            level: float = 0.95) -> pd.DataFrame:
    """R's ``emmeans(m, specs)`` (or ``pairs(...)``) with emmeans' defaults for ``lmer``: ``ddf="default"``
    is Kenward-Roger for an exact REML fit, with pbkrtest's adjusted covariance (``vcovAdj``) for the standard
    errors, as ``emmeans(m, specs)`` gives (``lmer.df = "kenward-roger"``); Satterthwaite for an exact ML fit;
    z (asymptotic) for variational fits. See :func:`lmevi.result.emmeans.emmeans` for the columns."""
    from lmevi.result import emmeans as emm

    if isinstance(ddf, str) and ddf.lower() == "default":
        ddf = ("kenward_roger" if fit.options.reml else "satterthwaite") if is_exact_gaussian(fit) else None
    ddf = check_ddf(fit, ddf)
    vcov, ddf_fn = None, None
    if ddf == "kenward_roger":
        from lmevi.result.kenward_roger import kenward_roger_ddf

        adj = kr_adjustment(fit)
        vcov, ddf_fn = adj.vcov_adj, (lambda L: kenward_roger_ddf(L, adj))
    elif ddf == "satterthwaite":
        from lmevi.result.satterthwaite import satterthwaite_1d

        d = derivatives(fit)
        vcov, ddf_fn = d.vcov, (lambda L: satterthwaite_1d(np.asarray(L).reshape(-1), d).df)
    elif ddf == "residual":
        ddf_fn = lambda _: _residual_df(fit)  # noqa: E731
    out = emm.emmeans(fit, specs, pairs=pairs, adjust=adjust, level=level, ddf_fn=ddf_fn, vcov=vcov)
    out.attrs["ddf"] = ddf
    out.attrs["note"] = _note(fit, ddf)
    return out
