"""Results stage: a fitted model in lme4's words (``fixef``, ``ranef``, ``varcorr``, ``predict``).

Every table speaks in the data's level labels, in the layouts of lme4's ``as.data.frame`` methods, so a
user can merge ours with lme4's on ``grp``.

Differences from lme4 to keep in mind: ``condsd`` is the posterior SD under q, which under the mean-field
family is too small wherever factors are crossed or nested (see :mod:`lmevi.q.variational`); the variance
components are the point estimates of variational EM (ML-like, or REML-like when ``reml=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import pandas as pd

from lmevi.q import registry as q_registry
from lmevi.frame.design import DesignInfo
from lmevi.runtime.options import check_bool, check_real
from lmevi.q.protocol import VIParams
from lmevi.fitting.loops import RunInfo, StopRule
from lmevi.q.model import cov_sd_corr
from lmevi.fitting import control
from lmevi.fitting.build import build_model
from lmevi.fitting.stage import fit_model
from lmevi.result import checks
from lmevi.result import inference
from lmevi.fitting import scaling
from lmevi.families import registry as likelihood_lib
from lmevi.runtime.precision import to_host, x64
from lmevi.result.predict import predict
from lmevi.result.summary import summary_text
from lmevi.fitting.scaling import Scales, relative_chol
from lmevi.result.components import percent_label
from lmevi.result.components import sd_components, term_groups
from lmevi.result.fitted import _exact_linear_predictor, _linear_predictor, local_rows


class FitOptions(NamedTuple):
    """The options a fit ran with, as a typed record.

    Attributes:
        family: the likelihood (``"gaussian"``, ``"poisson"``, ``"binomial"``).
        q: the variational family (``"structured"`` or ``"meanfield"``).
        reml: whether beta is in q (REML-like).
        method, elbo, num_samples, accelerate, seed: as :func:`lmevi.fit` took them.
        residual_scale: the fixed residual SD, or ``None`` (estimated).
        dtype: ``"float64"`` or ``"float32"``.
        stop_rule: the stop rule the loop ran under.
        optimizer: the optax optimizer's description, or ``None`` for coordinate ascent.
        missing: the missing-value rule.
        link: the link function's name (R's: ``"identity"``, ``"log"``, ``"logit"``, ...).
        nagq: glmer's ``nAGQ`` of an exact generalized fit.
    """

    family: str
    q: str
    reml: bool
    method: str
    elbo: str
    num_samples: int
    accelerate: bool
    residual_scale: float | None
    seed: int
    dtype: str
    stop_rule: StopRule
    optimizer: str | None
    missing: str = "raise"
    link: str = "identity"
    nagq: int = 1


@dataclass(frozen=True)
class FitResult:
    """An immutable fitted model.

    Attributes:
        info: names and labels of the design.
        spec: the variational family.
        params: point estimates and q (constrained).
        run: ELBO trace, steps, convergence and wall time of the fitting loop.
        options: the options the fit ran with (:class:`FitOptions`).
        fitted: ``(n_obs,)`` fitted values on the training rows (posterior means).
        y: ``(n_obs,)`` the training response.
        scales: the standardisation the fit ran in (:mod:`lmevi.fitting.scaling`); the singular-fit rules read the
            estimates in those units, so they mean the same whatever the data's units.
    """

    info: DesignInfo
    spec: object
    params: VIParams
    run: RunInfo
    options: FitOptions
    fitted: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    scales: Scales | None = field(default=None, repr=False)
    data: pd.DataFrame | None = field(default=None, repr=False)
    # what inference after the fit computes once per fit (the design in data units, Satterthwaite's
    # derivatives, Kenward-Roger's adjustment): not an init field, so ``replace`` (at_step) starts empty
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    # ---------------------------------------------------------------- lme4-style accessors

    @property
    def elbo(self) -> float:
        """The final ELBO (closed-form methods: exact; Monte Carlo: the last noisy estimate)."""
        return float(self.run.elbo_trace[-1])

    @property
    def q(self):
        """The q family's protocol module (:mod:`lmevi.q.registry`; an exact fit's estimates are held in the
        layout of :data:`lmevi.q.registry.EXACT_LAYOUT`)."""
        return q_registry.family(self.options.q)

    @property
    def likelihood(self):
        """The response distribution with its link (:mod:`lmevi.families`)."""
        return likelihood_lib.get(self.options.family, self.options.link)

    @property
    def exact(self) -> bool:
        """Whether the fit is exact: ``q="exact"`` (lme4's profiled criterion), or a variational q that is the
        exact posterior of the random effects (and of beta when ``reml=True``) given the variance components,
        which holds when everything random lies in one block (one grouping factor, or one large factor with
        small ones) under the Gaussian likelihood. The ELBO is then the log-likelihood (ML) or the REML
        log-likelihood. For the Poisson and binomial families only with ``q="exact"`` (glmer's Laplace or
        quadrature criterion), never with a variational q, whose Gaussian posterior is not theirs."""
        if self.options.q == "exact":
            return True
        return self.likelihood.moment_form and len(self.spec.blocks) == 1

    @property
    def loglik(self) -> float | None:
        """lme4's ``logLik``: the log-likelihood (REML log-likelihood when ``reml=True``) where the fit is
        exact, else ``None`` (the ELBO is then only a lower bound)."""
        return self.elbo if self.exact else None

    @property
    def n_params(self) -> int:
        """lme4's ``df`` of ``logLik``: fixed effects, covariance parameters (``p_k (p_k + 1) / 2`` per term)
        and sigma (when estimated; a Poisson or binomial model has none)."""
        k = len(self.info.fixed_names) + sum(len(t.coef_names) * (len(t.coef_names) + 1) // 2 for t in self.info.terms)
        return k + (self.likelihood.has_dispersion and self.options.residual_scale is None)

    @property
    def aic(self) -> float | None:
        """lme4's ``AIC``: ``-2 logLik + 2 df`` (of the REML log-likelihood for REML fits, as lme4); ``None``
        where the fit is not exact."""
        return None if self.loglik is None else -2.0 * self.loglik + 2.0 * self.n_params

    @property
    def bic(self) -> float | None:
        """lme4's ``BIC``: ``-2 logLik + df log(n)``; ``None`` where the fit is not exact."""
        return None if self.loglik is None else -2.0 * self.loglik + self.n_params * np.log(self.info.n_obs)

    @property
    def deviance(self) -> float | None:
        """lme4's ``deviance`` of an ML fit, ``-2 logLik``; ``None`` for REML fits (see
        :attr:`reml_criterion`) and where the fit is not exact."""
        return None if (self.loglik is None or self.options.reml) else -2.0 * self.loglik

    @property
    def reml_criterion(self) -> float | None:
        """lme4's ``REMLcrit``, ``-2`` times the REML log-likelihood; ``None`` for ML fits and where the fit is
        not exact."""
        return None if (self.loglik is None or not self.options.reml) else -2.0 * self.loglik

    def singular(self, tol: float = 1e-3) -> list[str]:
        """Variance components at the boundary, one sentence per finding; see
        :func:`lmevi.result.checks.singular_findings` for the three rules and why ``tol = 1e-3``."""
        from lmevi.result.checks import singular_findings

        unit = "residual SDs" if self.likelihood.moment_form else "on the link scale"
        return singular_findings(self.info, self.params.model.chol, self._relative_chol(), tol, unit)

    @property
    def converged(self) -> bool:
        return self.run.converged

    @property
    def steps(self) -> int:
        return self.run.steps

    @property
    def seconds(self) -> float:
        return self.run.seconds

    def at_step(self, step: int) -> "FitResult":
        """The fit as it stood after ``step`` (needs ``snapshot_steps`` containing it at fit time).

        Only the parameters change: ``predict``, ``fixef``, ``ranef`` and ``varcorr`` of the returned result
        describe that step; ``fitted`` and the run information stay those of the final fit.
        """
        snaps = self.run.snapshots
        if step not in snaps:
            raise ValueError(f"no snapshot at step {step}; fitted with snapshot_steps={sorted(snaps)}")
        return replace(self, params=snaps[step])

    @x64
    def fixef(self, add_dropped: bool = False) -> pd.Series:
        """Fixed effects indexed by the names lme4 prints (``(Intercept)``, ``service``).

        Args:
            add_dropped: also list the columns dropped as aliased (rank deficiency), as NaN, in the
                formula's column order (lme4's ``fixef(m, add.dropped = TRUE)``).
        """
        add_dropped = check_bool("add_dropped", add_dropped)
        est = pd.Series(self._beta_mean(), index=list(self.info.fixed_names), name="estimate")
        if not add_dropped or not self.info.dropped_fixed:
            return est
        names = list(self.info.fixed_spec.column_names)
        from lmevi.frame.rsyntax import lme4_name

        return est.reindex([lme4_name(n) for n in names])

    @x64
    def vcov(self) -> pd.DataFrame:
        """The fixed effects' covariance matrix, as lme4's ``vcov(m)``: for an exact fit lme4's own
        ``sigma^2 (R_X' R_X)^{-1}`` (REML and ML); for a variational fit with beta in q (``reml=True``) its
        posterior covariance under q. A variational ML-like fit has beta as a point estimate, with no
        covariance: that raises, naming the remedy."""
        names = list(self.info.fixed_names)
        if self.run.beta_cov is not None:
            cov = self.run.beta_cov
        elif self.spec.reml:
            cov = np.asarray(self.q.fixed_moments(self.spec, self.params.blocks)[1], np.float64)
        else:
            raise ValueError(
                "this fit (variational, reml=False) has beta as a point estimate, with no covariance; fit with "
                "q='exact' (or q='auto') for lme4's vcov, or reml=True for beta's posterior covariance"
            )
        return pd.DataFrame(cov, index=names, columns=names)

    def fixef_se(self) -> pd.Series | None:
        """Standard errors of beta (lme4's ``Std. Error``; posterior SDs for a variational REML-like fit), or
        ``None`` where the fit has no covariance for beta (variational, ``reml=False``)."""
        if self.run.beta_cov is None and not self.spec.reml:
            return None
        return pd.Series(np.sqrt(np.diag(self.vcov().to_numpy())), index=list(self.info.fixed_names),
                         name="std_error")

    def confint(self, level: float = 0.95, method: str = "wald", n: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Wald confidence intervals for the fixed effects, as lme4's ``confint(m, parm = "beta_", method =
        "Wald")``: ``estimate +- z_{(1 + level) / 2} * std_error``, one row per coefficient, columns named as
        R names them (``"2.5 %"``, ``"97.5 %"``). For a variational fit they are the intervals of q's normal
        posterior for beta (REML-like fits only).

        ``method="wald"`` is the default (the fixed effects only, as before; lme4's default is ``"profile"``).
        ``method="profile"`` (lme4's ``confint(m)``) and ``method="boot"`` (``n`` parametric bootstrap
        replicates from ``seed``, percentile intervals) need an exact Gaussian fit and give every parameter,
        rows named as lme4's ``oldNames = FALSE``: ``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``,
        ``sd_Days|Subject``, ``sigma``, ``(Intercept)``, ``Days``; see :func:`lmevi.result.inference.confint`."""
        if str(method).lower() != "wald":
            return inference.confint(self, level, method, n=n, seed=seed)
        from statistics import NormalDist

        level = check_real("level", level, positive=True)
        if level >= 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        se = self.fixef_se()
        if se is None:
            self.vcov()  # raises, naming the remedy
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        est = self.fixef()
        lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
        return pd.DataFrame({percent_label(lo): est - z * se, percent_label(hi): est + z * se})

    @x64
    def ranef(self, given_beta: bool = True) -> pd.DataFrame:
        """Random effects in the layout of lme4's ``as.data.frame(ranef(m, condVar = TRUE))``.

        Args:
            given_beta: when beta is in q (``reml=True``), ``condsd`` is the SD conditional on beta, as
                lme4's ``condVar`` conditions on the estimated fixed effects; ``False`` gives the marginal
                posterior SD, which also carries the uncertainty of beta.

        Returns:
            Columns ``grpvar, term, grp, condval, condsd``: one row per level and coefficient, ``grp`` the
            level label, ``condval`` the posterior mean and ``condsd`` the posterior SD under q.
        """
        given_beta = check_bool("given_beta", given_beta)
        frames = []
        for k, term in enumerate(self.info.terms):
            mean, cov = self.q.term_moments(self.spec, self.params.blocks, k, given_beta=given_beta)
            mean, sd = np.asarray(mean), np.sqrt(np.asarray(np.diagonal(cov, axis1=1, axis2=2)))
            for c, name in enumerate(term.coef_names):
                frames.append(
                    pd.DataFrame(
                        {
                            "grpvar": term.group,
                            "term": name,
                            "grp": list(term.levels),
                            "condval": mean[:, c],
                            "condsd": sd[:, c],
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    def varcorr(self) -> pd.DataFrame:
        """Variance components in the layout of lme4's ``as.data.frame(VarCorr(m))``.

        Returns:
            Columns ``grp, var1, var2, vcov, sdcor``: per term a row per coefficient (variance and SD), then
            a row per pair (covariance and correlation); the residual last as ``Residual`` (not for the
            Poisson and binomial families, which have none, as in lme4).
        """
        rows = []
        for term, grp, L in zip(self.info.terms, term_groups(self.info), self.params.model.chol):
            cov, sd, corr = cov_sd_corr(L)
            for a, name in enumerate(term.coef_names):
                rows.append((grp, name, None, cov[a, a], sd[a]))
            for a in range(len(sd)):
                for b in range(a + 1, len(sd)):
                    rows.append((grp, term.coef_names[a], term.coef_names[b], cov[a, b], corr[a, b]))
        sigma = float(self.params.model.sigma)
        if self._dispersion:
            rows.append(("Residual", None, None, sigma**2, sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    @property
    def _dispersion(self) -> bool:
        return self.likelihood.has_dispersion

    def sd(self) -> pd.Series:
        """SD of every random coefficient and of the residual (:func:`sd_components`' labels; no residual for
        the Poisson and binomial families)."""
        labels, values = sd_components(self.info, self.params.model.chol, float(self.params.model.sigma))
        if not self._dispersion:
            labels, values = labels[:-1], values[:-1]
        return pd.Series(values, index=labels, name="sd")

    @x64
    def predict(
        self, data: pd.DataFrame, allow_new_levels: bool = True, re_form: str | None = "full", missing: str = "raise",
        type: str = "link",
    ) -> np.ndarray:
        """Predictions with posterior means.

        Args:
            data: new rows with the formula's columns (the response is not needed).
            allow_new_levels: a level of a grouping factor never seen at fit time gets its effect's prior
                mean, 0; with ``False`` such a level raises ``ValueError`` naming the factor and a few labels
                (lme4's ``allow.new.levels``). A fixed-effect factor's unseen level always raises.
            re_form: ``"full"`` uses every random term; ``None`` (or lme4's ``"~0"``) predicts at the
                population level (fixed effects only), as lme4's ``re.form = NA``.
            missing: ``"raise"`` (default) stops on NA or inf in a column the predictions use, naming it;
                ``"drop"`` predicts NaN for those rows, with a warning counting them, so rows still align.
            type: ``"link"`` (default, as lme4's ``predict``: the linear predictor) or ``"response"`` (its
                inverse link: the mean of a Poisson count, the probability of a binomial success). The same
                for the Gaussian family.

        Returns:
            ``(n_new,)`` predictions, in the rows' order.
        """
        return predict(self, data, allow_new_levels, re_form, missing, type)

    @x64
    def to_inference_data(self, num_samples: int = 1000, rng_key=None):
        """Draws from q as an ArviZ ``InferenceData``; see :func:`lmevi.result.export.to_inference_data`."""
        from lmevi.result.export import to_inference_data  # arviz loads only when exporting

        return to_inference_data(self, num_samples, rng_key)

    def refit(self, **changes) -> "FitResult":
        """Fit the same formula to the same data again with some options changed (``reml=False`` for a
        likelihood-ratio test, as lme4's ``refitML``); the rest as this fit ran (coordinate ascent or lme4's
        criterion; an optax optimizer is not kept)."""
        if self.data is None:
            raise ValueError("this result keeps no data to refit")
        o = self.options
        options = dict(family=o.family, link=o.link, q=o.q, reml=o.reml, residual_scale=o.residual_scale,
                       dtype=o.dtype, missing=o.missing, nagq=o.nagq)
        options.update(changes)
        how = control.settings(progress=options.pop("progress", False), dtype=options["dtype"],
                               **{k: options.pop(k) for k in list(options) if k in control.SETTINGS})
        return run_stages(self.info.formula.text, self.data, how, **options)

    def residuals(self) -> np.ndarray:
        """Training residuals, ``(n_obs,)``, in the caller's row order: ``y - fitted`` for the Gaussian family, the
        deviance residuals for the Poisson and binomial ones (lme4's default ``residuals`` of a ``glmer``)."""
        return np.asarray(self.likelihood.deviance_residuals(self.y, self.fitted))

    @x64
    def summary(self) -> str:
        """An lme4-style summary: method, formula, ELBO (and log-likelihood where exact), scaled residuals,
        random effects, fixed effects, convergence and singular-fit messages."""
        return summary_text(self)

    def _distinct_terms(self):
        seen, out = set(), []
        for t in self.info.terms:
            if t.group not in seen:
                seen.add(t.group)
                out.append(t)
        return out

    def __str__(self) -> str:
        return self.summary()

    # ---------------------------------------------------------------- helpers

    def _relative_chol(self) -> tuple[np.ndarray, ...]:
        """lme4's relative factors ``theta_k`` in the standardised units of the fit."""
        sigma = float(self.params.model.sigma)
        if self.scales is None:
            return tuple(np.asarray(L, np.float64) / sigma for L in self.params.model.chol)
        return relative_chol(self.params.model.chol, sigma, self.scales)

    def _beta_mean(self) -> np.ndarray:
        if self.spec.reml:
            return np.asarray(self.q.fixed_moments(self.spec, self.params.blocks)[0])
        return np.asarray(self.params.model.beta)

    # ---------------------------------------------------------------- inference after the fit

    def coef_table(self, ddf: str | None = "default") -> pd.DataFrame:
        """lmerTest's coefficient table: indexed by term, ``estimate, std_error, df, t, p``. ``ddf``:
        ``"satterthwaite"`` (the default for exact Gaussian fits), ``"kenward_roger"`` (adjusted SEs),
        ``"residual"`` (``n - p``) or ``None`` (z tests: the default for variational fits and GLMMs, whose
        ``attrs["note"]`` says they rest on the approximate posterior). See
        :func:`lmevi.result.inference.coef_table`."""
        return inference.coef_table(self, ddf)

    def anova(self, type: int = 3, ddf: str | None = "default") -> pd.DataFrame:
        """lmerTest's ``anova(m, type = 3)`` of this model: ``num_df, den_df, F, p`` per term."""
        return inference.anova_table(self, type, ddf)

    def contest(self, L, ddf: str | None = "default") -> pd.DataFrame:
        """lmerTest's ``contest(m, L)``: one row of ``L``, a t test; several rows, an F test."""
        return inference.contest(self, L, ddf)

    def profile(self, which=None, n_points: int = 8) -> pd.DataFrame:
        """lme4's ``as.data.frame(profile(m))``: the profile traces (exact Gaussian fits)."""
        return inference.profile(self, which, n_points)

    def simulate(self, n: int = 1, seed: int = 0) -> np.ndarray:
        """lme4's ``simulate(m, nsim = n)``: ``(n_obs, n)`` responses drawn from the fitted Gaussian model."""
        return inference.simulate(self, n, seed)


@x64
def make_result(model, fit_settings, params: VIParams, run: RunInfo) -> FitResult:
    """Results stage, as lme4's ``mkMerMod``: map a fit from the model's standardised units back to the data's
    and wrap it with its labels and options.

    Args:
        model: the :class:`~lmevi.fitting.build.Model` that was fitted.
        fit_settings: the :class:`~lmevi.fitting.control.FitSettings` it ran with.
        params: point estimates and q in standardised units, as :func:`lmevi.fitting.stage.fit_model` returns them.
        run: the run record.
    """
    problem, scales, spec = model.problem, model.scales, model.spec
    n = model.info.n_obs
    exact_fit = model.q_name == "exact"
    if exact_fit:  # on the host: an exact fit of a small model compiles nothing
        linear = _exact_linear_predictor(problem.design, spec, params)
    else:
        linear = local_rows(_linear_predictor(problem, params))
    # this process's rows (all rows but in a multi-process fit), padding dropped
    fitted = scales.y_shift + scales.y_scale * linear[: len(model.y)]
    if model.folded is not None:  # a Gaussian's prior weights and offset (lmevi.fitting.weighting)
        fitted = model.folded.fitted(fitted)
    if problem.likelihood.link.name != "identity":  # lme4's fitted values of a glmer: the mean at the modes
        fitted = np.asarray(problem.likelihood.inverse_link(fitted), np.float64)
    offset = scaling.elbo_offset(scales, n, spec.reml) + (0.0 if model.folded is None else model.folded.loglik_shift)

    def back(p):  # to the data's levels (padding dropped) and units, on the host
        p = to_host(p)
        if model.padded:
            p = problem.q.unpad(p, problem.spec, spec)
        return scaling.to_data_units(p, spec, scales, problem.q)

    snapshots = {t: back(p) for t, p in run.snapshots.items()}
    s = fit_settings
    options = FitOptions(
        family=problem.likelihood.name, q=model.q_name, reml=model.reml,
        method="profiled" if exact_fit else s.method, elbo="none" if exact_fit else s.elbo,
        num_samples=s.num_samples, accelerate=s.accelerate, residual_scale=model.residual_scale, seed=s.seed,
        dtype=model.dtype, stop_rule=s.rule,
        optimizer=None if (s.method == "cavi" or exact_fit) else control.describe_optimizer(s.optimizer),
        missing=model.missing, link=problem.likelihood.link.name, nagq=model.nagq,
    )
    return FitResult(
        info=model.info,
        spec=spec,
        params=back(params),
        run=run._replace(
            elbo_trace=run.elbo_trace + offset, snapshots=snapshots,
            beta_cov=None if run.beta_cov is None else scaling.beta_cov_to_data_units(run.beta_cov, scales),
        ),
        options=options,
        fitted=fitted,
        y=model.y,
        scales=scales,
        data=model.data,
    )


def run_stages(formula: str, data, fit_settings, **build_options) -> FitResult:
    """The stages in order, as ``lmer`` calls them: :func:`lmevi.build_model` (with ``build_options`` and the
    settings, which decide ``q="auto"``), :func:`lmevi.fit_model`, the convergence checks, :func:`make_result`
    and the singular-fit checks. :func:`lmevi.fit` and :meth:`FitResult.refit` both run them."""
    model = build_model(formula, data, fit_settings=fit_settings, **build_options)
    params, run = fit_model(model, fit_settings)
    checks.warn_convergence(run, fit_settings.rule)
    result = make_result(model, fit_settings, params, run)
    checks.warn_singular(result)
    return result
