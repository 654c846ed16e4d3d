"""lme4's ``devfun``, public: the exact profiled criterion as a function of lme4's ``theta``.

lme4 splits ``lmer`` into stages and exports the third, ``mkLmerDevfun``: a function of the relative covariance
factors ``theta`` alone (beta and sigma profiled out) returning the REML criterion or the deviance ``-2 log L``
(Bates et al. 2015, eqs. 41-42). :func:`devfun` gives the same function for a model built by
:func:`lmevi.build_model` (or for a fit), with lme4's ``theta`` layout -- terms in lme4's order (by decreasing
number of levels, :func:`lmevi.exact.covfactors.lme4_term_order`; ``getME(m, "theta")``), each term's lower
triangle column by column -- and in the data's units, so that its values are lme4's to rounding. It is what
the profile, Satterthwaite's and Kenward-Roger's derivatives and the bootstrap build on.

    >>> f = lmevi.devfun(lmevi.build_model("Reaction ~ Days + (Days | Subject)", sleepstudy))
    >>> f([1.0, 0.0, 1.0])                              # REML criterion, as lme4's devfun(c(1, 0, 1))
    1773.68033062...
    >>> value, grad = f.value_and_grad(f.theta0)       # exact gradient (JAX), lme4's order
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from lmevi.exact import criterion
from lmevi.exact.covfactors import lme4_theta_order, theta_default, theta_lower_bounds
from lmevi.exact.structure import Structure, build_structure
from lmevi.frame.design import build_design
from lmevi.frame.formula import parse_formula
from lmevi.runtime.precision import x64


@dataclass(frozen=True)
class DevFun:
    """The profiled criterion of one design as a function of lme4's ``theta`` (call it, or
    :meth:`value_and_grad`).

    Attributes:
        structure: the design's cross-products (:func:`lmevi.exact.structure.build_structure`), data units.
        reml: REML criterion (``True``) or deviance (``False``).
        order: ``(n_theta,)`` design-order index of each of lme4's theta entries.
        lower: ``(n_theta,)`` lme4's lower bounds (``getME(m, "lower")``): 0 on each diagonal, ``-inf`` below.
        theta0: ``(n_theta,)`` lme4's starting value (identity factors).
        names: lme4's names of the theta entries (``getME(m, "theta")``'s names), e.g.
            ``"Subject.(Intercept)"``, ``"Subject.Days.(Intercept)"``, ``"Subject.Days"``.
    """

    structure: Structure
    reml: bool
    order: np.ndarray
    lower: np.ndarray
    theta0: np.ndarray
    names: tuple[str, ...]

    def _design_theta(self, theta) -> np.ndarray:
        theta = np.asarray(theta, np.float64).reshape(-1)
        if theta.shape != self.order.shape:
            raise ValueError(f"theta must have {self.order.size} entries (lme4's order: {list(self.names)}), "
                             f"got {theta.size}")
        out = np.empty_like(theta)
        out[self.order] = theta
        return out

    def __call__(self, theta) -> float:
        """The criterion at ``theta`` (lme4's order), ``float``; on the host (NumPy), compiling nothing."""
        return float(criterion.profiled_deviance(self._design_theta(theta), self.structure, self.reml,
                                                 criterion.NUMPY_OPS))

    @x64
    def value_and_grad(self, theta) -> tuple[float, np.ndarray]:
        """The criterion and its exact gradient (JAX's, through the blocked elimination) at ``theta``; the
        gradient ``(n_theta,)`` in lme4's order."""
        s = jax.device_put(self.structure)
        value, grad = criterion._value_and_grad(jax.device_put(self._design_theta(theta)), s, reml=self.reml)
        return float(value), np.asarray(grad, np.float64)[self.order]


def _theta_names(info) -> list[list[str]]:
    """Per term (design order), lme4's names of its theta entries: ``group.coef`` on the diagonal,
    ``group.row.col`` below it, column by column."""
    out = []
    for t in info.terms:
        names, p = t.coef_names, len(t.coef_names)
        out.append([f"{t.group}.{names[r]}" if r == c else f"{t.group}.{names[r]}.{names[c]}"
                    for c in range(p) for r in range(c, p)])
    return out


def devfun(model, reml: bool | None = None) -> DevFun:
    """lme4's profiled criterion for ``model`` as a function of lme4's ``theta`` (``mkLmerDevfun``).

    Args:
        model: a :class:`~lmevi.fitting.build.Model` from :func:`lmevi.build_model`, or a fit
            (:class:`~lmevi.result.fitresult.FitResult`); Gaussian, with the residual SD estimated.
        reml: the REML criterion (``True``) or the deviance (``False``); default: the model's.

    Returns:
        A :class:`DevFun`: ``f(theta) -> float`` and ``f.value_and_grad(theta)``.
    """
    info = getattr(model, "info", None)
    formula = getattr(model, "formula", None) or getattr(getattr(info, "formula", None), "text", None)
    data = getattr(model, "data", None)
    options = getattr(model, "options", None)
    like = model.problem.likelihood if hasattr(model, "problem") else getattr(model, "likelihood", None)
    if formula is None or data is None or like is None:
        raise TypeError(f"devfun takes a model from lmevi.build_model or a fit from lmevi.fit, got {type(model)!r}")
    residual_scale = model.residual_scale if hasattr(model, "residual_scale") else options.residual_scale
    if not like.moment_form or residual_scale is not None:
        raise ValueError("devfun is lme4's criterion of a linear mixed model: a Gaussian likelihood with the "
                         f"residual SD estimated (this model: family={like.name!r}, residual_scale={residual_scale})")
    model_reml = model.reml if hasattr(model, "reml") else options.reml
    reml = model_reml if reml is None else bool(reml)
    missing = getattr(model, "missing", None) or getattr(options, "missing", "raise")
    design, info = build_design(parse_formula(formula), data, missing=missing)
    n_levels = tuple(t.n_levels for t in design.terms)
    n_coefs = tuple(t.covariates.shape[1] for t in design.terms)
    order = lme4_theta_order(n_levels, n_coefs)
    names = [n for term in _theta_names(info) for n in term]
    return DevFun(
        structure=build_structure(design, reml=reml), reml=reml, order=order,
        lower=theta_lower_bounds(n_coefs)[order], theta0=theta_default(n_coefs)[order],
        names=tuple(names[i] for i in order),
    )
