r"""Prior weights and offsets of a Gaussian model, folded into its rows (lme4's ``lmer(..., weights, offset)``).

With prior weights the residual variance of row ``i`` is ``sigma^2 / w_i``, so

    sqrt(w_i) (y_i - o_i) = sqrt(w_i) x_i beta + sum_k sqrt(w_i) z_ik b_k[g_k(i)] + e_i,   e_i ~ N(0, sigma^2)

is an unweighted linear mixed model on rescaled rows (the transformation lme4's ``lmerResp`` makes with its
``sqrtrwt``). Every Gaussian kernel (the closed-form ELBO's moment sums, coordinate ascent's cross-products,
lme4's exact criterion ``Z'WZ``, ``X'WX``, ``y'Wy``) then takes the weights with no code of its own, and
standardising the folded rows (:mod:`lmevi.fitting.scaling`) stays a change of units. What the folding
changes is undone in the results: the log-likelihood of the weighted model is that of the folded one plus
``sum_i log(w_i) / 2`` (the Jacobian of ``y -> sqrt(w) y``; lme4's ``ldW``), and the fitted values are
``mu'_i / sqrt(w_i) + o_i``. Generalized families keep the arrays and weight each row's expected
log-density (:func:`lmevi.q.elbo.closed_form`, :mod:`lmevi.fitting.glmm`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lmevi.frame.design import Design, TermData


class Folded(NamedTuple):
    """What folding did to a Gaussian design, to undo it in the results (host NumPy).

    Attributes:
        sqrt_weights: ``(n_obs,)`` ``sqrt(w_i)``, or ``None`` (no weights).
        offset: ``(n_obs,)`` ``o_i`` in the data's units, or ``None`` (no offset).
        loglik_shift: ``sum_i log(w_i) / 2``: add to the folded model's log-likelihood (and ELBO).
    """

    sqrt_weights: np.ndarray | None
    offset: np.ndarray | None
    loglik_shift: float

    def fitted(self, folded_fitted: np.ndarray) -> np.ndarray:
        """``(n_obs,)`` fitted values in the data's units from those of the folded rows."""
        out = np.asarray(folded_fitted, np.float64)
        if self.sqrt_weights is not None:
            out = out / self.sqrt_weights
        return out if self.offset is None else out + self.offset


def fold(design: Design) -> tuple[Design, Folded | None]:
    """The unweighted design without offset whose fit is the weighted one's (see the module docstring), and
    how to undo it; ``(design, None)`` unchanged when it has neither weights nor offset.

    Args:
        design: the data's arrays (host), ``weights`` all positive (:meth:`Gaussian.check_weighted`).
    """
    if design.weights is None and design.offset is None:
        return design, None
    y = np.asarray(design.y, np.float64)
    offset = None if design.offset is None else np.asarray(design.offset, np.float64)
    if offset is not None:
        y = y - offset
    if design.weights is None:
        dtype = np.asarray(design.y).dtype
        return Design(y=y.astype(dtype), X=design.X, terms=design.terms), Folded(None, offset, 0.0)
    w = np.asarray(design.weights, np.float64)
    sw = np.sqrt(w)
    dtype = np.asarray(design.y).dtype

    def rows(a):
        return (np.asarray(a, np.float64) * (sw if np.ndim(a) == 1 else sw[:, None])).astype(dtype)

    terms = tuple(TermData(index=t.index, covariates=rows(t.covariates), n_levels=t.n_levels, unit=False)
                  for t in design.terms)
    folded = Design(y=rows(y), X=rows(design.X), terms=terms)
    return folded, Folded(sw, offset, float(0.5 * np.sum(np.log(w))))
