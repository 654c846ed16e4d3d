"""The summary of a fit, as lme4's ``print(summary(m))``: method, formula, criterion, residuals, random and fixed
effects, convergence and singular-fit messages."""

from __future__ import annotations

import numpy as np
import pandas as pd


def summary_text(m) -> str:
    """lme4's ``summary`` of the fit ``m`` as text (:meth:`lmevi.FitResult.summary`)."""
    o = m.options
    if o.q == "exact":
        head = (f"Linear mixed model fit by {'REML' if o.reml else 'maximum likelihood'} (exact: lme4's "
                f"profiled criterion, {m.run.optimizer})")
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
    lines += ["", "Fixed effects:"]
    se = m.fixef_se()
    se_name = "Std. Error" if o.q == "exact" else "Post. SD"
    lines.append(f" {'':<20} {'Estimate':>10}" + (f" {se_name:>10}" if se is not None else ""))
    for name, value in m.fixef().items():
        lines.append(f" {name:<20} {value:>10.5g}" + (f" {se[name]:>10.4g}" if se is not None else ""))
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
