"""Checks of a finished fit, as lme4's ``checkConv.R`` and ``isSingular.R``: convergence and boundary
(singular) fits, each as findings (sentences) and as warnings."""

from __future__ import annotations

import warnings

import numpy as np

from lmevi.fitting.loops import RunInfo, StopRule
from lmevi.q.model import cov_sd_corr
from lmevi.runtime.options import user_stacklevel

# Convergence check: the largest gradient norm of the closed-form ELBO per observation, in the unconstrained
# coordinates, that still counts as an optimum (see inference.final_grad_norm).
GRAD_TOL = 1e-3


class ConvergenceWarning(UserWarning):
    """The fit stopped on its step budget before its convergence rule held, or where the ELBO's gradient is
    still large (``GRAD_TOL``)."""


class SingularFitWarning(UserWarning):
    """A variance component is at the boundary (SD near zero or a correlation near +-1)."""


def convergence_findings(run: RunInfo, rule: StopRule) -> list[str]:
    """Why the fit may not be at an optimum: the step budget ran out, or the ELBO settled with a large
    gradient. Empty when it converged."""
    if not run.converged:
        return [
            f"the fit stopped on its step budget ({rule.num_steps} steps) before the ELBO settled "
            f"(relative change <= {rule.tol:g}; gradient norm {run.grad_norm:.2g} per observation); "
            "estimates may still move: raise num_steps"
        ]
    if run.grad_norm > GRAD_TOL:
        return [
            f"the ELBO settled but its gradient norm at the end is {run.grad_norm:.2g} per observation "
            f"(above {GRAD_TOL:g}): the fit stopped on a plateau, not at an optimum, and estimates may still "
            "move: lower tol or raise num_steps"
        ]
    return []


def singular_findings(info, chol, relative, tol: float = 1e-3, unit: str = "residual SDs") -> list[str]:
    """Variance components at the boundary. Three rules, each with tolerance ``tol``: an SD below ``tol``
    residual SDs; a correlation within ``tol`` of +-1; and lme4's ``isSingular`` rule, a diagonal entry of
    a relative Cholesky factor (``theta``, the Cholesky factor of ``Sigma_k / sigma^2``) below ``tol``,
    which also catches a coefficient that is nearly a linear combination of the term's earlier ones.

    lme4's optimizer can land exactly on the boundary and uses ``tol = 1e-4``; variational EM approaches
    it from inside, slowly, and stops once the ELBO no longer moves, where a zero typically reads 1e-4 to
    1e-2: hence the default ``1e-3`` and the correlation rule (a correlation converges to +-1 faster than
    the Cholesky entry to zero).

    Args:
        info: the design's names (:class:`lmevi.frame.design.DesignInfo`).
        chol: one ``(p_k, p_k)`` Cholesky factor of ``Sigma_k`` per term, in the data's units.
        relative: the same factors relative to sigma in standardised units (unit-free).
        tol: the tolerance of all three rules.
        unit: what ``relative`` is in, for the sentences: ``"residual SDs"``, or for a family without a
            residual (Poisson, binomial, sigma held at 1) ``"on the link scale"``.

    Returns:
        One sentence per finding.
    """
    out = []
    for term, L, R in zip(info.terms, chol, relative):
        cov, sd, corr = cov_sd_corr(L)
        _, rsd, _ = cov_sd_corr(R)  # SD of each coefficient's share of the predictor, in residual SDs
        theta = np.abs(np.diag(np.asarray(R)))
        names = term.coef_names
        flagged = set()
        for a, name in enumerate(names):
            if rsd[a] < tol:
                per = "" if name == "(Intercept)" else f" per SD of {name}"
                out.append(
                    f"the SD of {name} for {term.group!r} is {sd[a]:.3g} ({rsd[a]:.2g} {unit}{per}), "
                    "near zero"
                )
                flagged.add(a)
        for a in range(len(sd)):
            for b in range(a + 1, len(sd)):
                if a in flagged or b in flagged:
                    continue
                if 1.0 - abs(corr[a, b]) < tol:
                    out.append(f"the correlation of {names[a]} and {names[b]} for {term.group!r} is {corr[a, b]:+.4f}")
                    flagged.add(b)
        for a, name in enumerate(names):
            if a not in flagged and theta[a] < tol:
                out.append(
                    f"the {name} effects for {term.group!r} are nearly a linear combination of the term's "
                    f"earlier coefficients (relative Cholesky entry {theta[a]:.2g})"
                )
    return out


def warn_convergence(run: RunInfo, rule: StopRule) -> None:
    """:func:`convergence_findings` as :class:`ConvergenceWarning`\\ s, pointing at the user's call."""
    for msg in convergence_findings(run, rule):
        warnings.warn(msg, ConvergenceWarning, stacklevel=user_stacklevel())


def warn_singular(result) -> None:
    """The result's :meth:`~lmevi.result.fitresult.FitResult.singular` findings as :class:`SingularFitWarning`\\ s,
    with the remedy when the approximate q may be the cause: mean-field q drains nested factors' variances;
    the structured q keeps the blocks of different large factors independent, which can pull a variance
    towards zero that the exact posterior keeps (never silently: each message names the factor)."""
    for msg in result.singular():
        hint = ""
        if result.options.q == "meanfield":
            hint = (" Under q='meanfield' this is often mean-field q draining a nested factor's variance; "
                    "q='structured' avoids it.")
        elif result.options.q == "structured" and not result.exact:
            hint = (" Under q='structured' the blocks of crossed large factors are independent, which can drain "
                    "a variance that lme4 keeps; q='exact' (or q='auto') fits lme4's criterion where its dense "
                    "block is affordable.")
        warnings.warn(
            f"boundary (singular) fit: {msg}: the data do not support this variance component as modelled.{hint}",
            SingularFitWarning,
            stacklevel=user_stacklevel(),
        )
