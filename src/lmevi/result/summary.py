"""The summary of a fit, as lme4's ``print(summary(m))``: method, formula, criterion, residuals, random and fixed
effects, convergence and singular-fit messages."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmevi.result import inference

# The summary computes Satterthwaite's dfs where that is cheap: a dense block of at most this many
# coefficients and at most this many rows (sleepstudy: 2 coefficients, 180 rows; the first call in a process
# pays JAX's start and one compilation, about 1-2 s). Larger fits print t values and say how to get the rest.
SUMMARY_DDF_MAX_BLOCK = 128
SUMMARY_DDF_MAX_ROWS = 20_000


def summary_text(m) -> str:
    """lme4's ``summary`` of the fit ``m`` as text (:meth:`lmevi.FitResult.summary`)."""
    o = m.options
    if o.q == "exact" and not m.likelihood.moment_form:
        like = m.likelihood
        approx = {0: "nAGQ = 0", 1: "Laplace Approximation"}.get(o.nagq, f"Adaptive Gauss-Hermite Quadrature, nAGQ = {o.nagq}")
        head = (f"Generalized linear mixed model fit by maximum likelihood ({approx}) [glmerMod]\n"
                f" Family: {like.name} ( {like.link.name} )")
    elif o.q == "exact":
        head = (f"Linear mixed model fit by {'REML' if o.reml else 'maximum likelihood'} (exact: lme4's "
                f"profiled criterion, {m.run.optimizer})")
    if o.q == "exact":
        crit = (f"REML criterion at convergence: {m.reml_criterion:.4f}" if o.reml else
                f"     AIC      BIC   logLik deviance\n{m.aic:8.1f} {m.bic:8.1f} {m.loglik:8.1f} "
                f"{m.deviance:8.1f}")
    else:
        kind = "REML-like: beta in q, flat prior" if o.reml else "ML-like: beta a point estimate"
        head = f"Linear mixed model fit by variational EM ({o.q} q, {kind}; {o.method}, {o.elbo} ELBO)"
        if not m.likelihood.moment_form:
            like = m.likelihood
            head = "Generalized " + head[0].lower() + head[1:] + f"\n Family: {like.name} ( {like.link.name} )"
        crit = f"ELBO: {m.elbo:.4f}" + (
            f"   {'REML log-likelihood' if o.reml else 'log-likelihood'}: {m.loglik:.4f} (q is exact)"
            if m.exact else "   (q is an approximation: the ELBO is a lower bound)")
    lines = [
        head,
        f"Formula: {m.info.formula.text}",
        "",
        crit,
        "",
        "Scaled residuals:" if m.likelihood.moment_form else "Deviance residuals:",
    ]
    r = m.residuals() / (float(m.params.model.sigma) if m.likelihood.moment_form else 1.0)
    q = np.quantile(r, [0, 0.25, 0.5, 0.75, 1.0])
    lines.append("     Min       1Q   Median       3Q      Max")
    lines.append(" ".join(f"{v:8.4f}" for v in q))
    lines += ["", "Random effects:", f" {'Groups':<14} {'Name':<16} {'Variance':>10} {'Std.Dev.':>9}  Corr"]
    vc = m.varcorr()
    corr = vc[vc["var2"].notna()]
    for _, row in vc[vc["var2"].isna()].iterrows():
        name = "" if pd.isna(row["var1"]) else row["var1"]
        cs = corr[(corr["grp"] == row["grp"]) & (corr["var2"] == name)]["sdcor"].to_numpy()
        lines.append(
            f" {row['grp']:<14} {name:<16} {row['vcov']:>10.4g} {row['sdcor']:>9.4g}  "
            + " ".join(f"{c:+.2f}" for c in cs)
        )
    groups = ", ".join(f"{t.group}, {sum(c > 0 for c in t.counts)}" for t in m._distinct_terms())
    lines.append(f"Number of obs: {m.info.n_obs}, groups:  {groups}")
    lines += ["", "Fixed effects:"] + fixed_effects_lines(m)
    if m.info.dropped_fixed:
        lines.append(f"fixed-effect columns dropped as rank deficient: {list(m.info.dropped_fixed)}")
    lines.append("")
    lines.append(
        f"{'converged' if m.converged else 'NOT converged'} after {m.steps} "
        f"{'evaluations of the criterion' if o.q == 'exact' else 'steps'} "
        f"({m.seconds:.2f} s)"
        + ("" if np.isnan(m.run.grad_norm) else f"; final gradient norm {m.run.grad_norm:.3g}")
    )
    for msg in m.singular():
        lines.append(f"boundary (singular) fit: {msg}")
    return "\n".join(lines)


def _cheap_ddf(m) -> bool:
    if "satterthwaite" in m._cache:
        return True
    from lmevi.exact.structure import dense_block_size

    return m.info.n_obs <= SUMMARY_DDF_MAX_ROWS and dense_block_size(inference.data_design(m)) <= SUMMARY_DDF_MAX_BLOCK


def _p_text(p: float) -> str:
    return "< 2e-16" if p < 2e-16 else f"{p:.3g}"


def fixed_effects_lines(m) -> list[str]:
    """The coefficient table as lmerTest prints it for an exact Gaussian fit (``Estimate, Std. Error, df,
    t value, Pr(>|t|)``, Satterthwaite's df; t values only for large models, naming how to get the rest), with
    z tests for variational fits and GLMMs, labelled as resting on q's approximate posterior."""
    se = m.fixef_se()
    names = list(m.info.fixed_names)
    if se is None:  # a variational ML-like fit: beta is a point estimate
        return [f" {'':<20} {'Estimate':>10}"] + [f" {n:<20} {v:>10.5g}" for n, v in m.fixef().items()]
    exact = inference.is_exact_gaussian(m)
    if exact and not _cheap_ddf(m):
        est = m.fixef()
        lines = [f" {'':<20} {'Estimate':>10} {'Std. Error':>10} {'t value':>8}"]
        lines += [f" {n:<20} {est[n]:>10.5g} {se[n]:>10.4g} {est[n] / se[n]:>8.3f}" for n in names]
        return lines + ["df and p-values (Satterthwaite) not computed for a model this size: m.coef_table()"]
    table = inference.coef_table(m, "satterthwaite" if exact else None)
    if exact:
        lines = [f" {'':<20} {'Estimate':>10} {'Std. Error':>10} {'df':>10} {'t value':>8} {'Pr(>|t|)':>9}"]
        lines += [f" {n:<20} {r.estimate:>10.5g} {r.std_error:>10.4g} {r.df:>10.2f} {r.t:>8.3f} {_p_text(r.p):>9}"
                  for n, r in table.iterrows()]
        return lines + ["(df: Satterthwaite's, as lmerTest; m.coef_table(ddf=...) for Kenward-Roger or others)"]
    glmer = m.options.q == "exact"  # a generalized model by glmer's criterion: Wald z tests, as glmer prints them
    lines = [f" {'':<20} {'Estimate':>10} {'Std. Error' if glmer else 'Post. SD':>10} {'z value':>8} {'Pr(>|z|)':>9}"]
    lines += [f" {n:<20} {r.estimate:>10.5g} {r.std_error:>10.4g} {r.t:>8.3f} {_p_text(r.p):>9}"
              for n, r in table.iterrows()]
    if glmer:
        return lines
    return lines + ["(variational fit: Post. SD is q's posterior SD and the z tests rest on that approximate "
                    "posterior, not on lme4's exact criterion)"]
