"""``lmevi.fit``: like ``lmer``, it only calls the stages in order.

    build_model (lFormula)  ->  fit_model (optimizeLmer)  ->  make_result (mkMerMod)  ->  checks (checkConv)

Each stage is public (:func:`lmevi.build_model`, :func:`lmevi.fit_settings`, :func:`lmevi.fit_model`,
:func:`lmevi.make_result`, :mod:`lmevi.result.checks`), so scripts never rebuild the pipeline by hand. The
rules for combining them live in the stages themselves (:func:`lmevi.fitting.build.resolve_q`,
:func:`lmevi.fitting.stage.fit_model`), not here.
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING

import pandas as pd

from lmevi.fitting import control
from lmevi.q import registry as q_registry
from lmevi.result import checks
from lmevi.runtime import xla
from lmevi.runtime.precision import x64
from lmevi.runtime.pages import small_pages
from lmevi.result.fitresult import FitResult, run_stages

if TYPE_CHECKING:  # optax is imported when a fit takes the gradient path (0.1 s that exact fits do not pay)
    import optax


@x64
@small_pages
def fit(
    formula: str,
    data: pd.DataFrame,
    *,
    family: str = "gaussian",
    link: str | None = None,
    q: str | None = None,
    reml: bool | None = None,
    method: str | None = None,
    elbo: str = "closed_form",
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 1,
    residual_scale: float | None = None,
    num_steps: int | None = None,
    tol: float | None = None,
    window: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    blocks=None,
    small_threshold: int = 50,
    dtype: str = "float64",
    missing: str = "raise",
    accelerate: bool = True,
    init_scale: float = 0.1,
    snapshot_steps=(),
    devices=None,
    distributed: bool = False,
    weights=None,
    offset=None,
    nagq: int = 1,
) -> FitResult:
    """Fit a linear mixed model by variational EM.

    Args:
        formula: lme4 syntax, e.g. ``"y ~ service + (1|s) + (1|d) + (1|dept)"``.
        data: one row per observation.
        family: the likelihood, in lme4's ``glmer`` words: ``"gaussian"`` (default, ``lmer``), ``"poisson"``
            (log link) or ``"binomial"`` (logit link, a 0/1 response; booleans and two-level columns are read
            as 0/1, the second level as success): :mod:`lmevi.families`, registered in
            :data:`lmevi.families.registry.LIKELIHOODS`. The generalized ones have no dispersion, as
            ``glmer``; coordinate ascent fits them by working-response steps
            (:mod:`lmevi.fitting.glmm`), ``method="optax"`` by L-BFGS on the same closed-form ELBO.
            ``family="structured"`` or ``"meanfield"``, the spelling of q before it had its own option, still
            works with a ``DeprecationWarning``.
        link: the link function, one the family allows (R's ``binomial(link = "probit")``): binomial
            ``"logit"`` (default), ``"probit"``, ``"cloglog"``; Poisson ``"log"`` (default), ``"identity"``,
            ``"sqrt"`` (:mod:`lmevi.families.links`).
        q: ``"auto"`` (default: ``"exact"`` when lme4's criterion applies -- Gaussian, sigma estimated, no
            ``blocks``, float64, coordinate ascent -- and its dense block has at most
            ``lmevi.fitting.build.AUTO_EXACT_MAX`` coefficients, else ``"structured"``; the result's ``options.q``
            and summary say which ran), ``"exact"`` (lme4's profiled criterion, :mod:`lmevi.exact.criterion`: lme4's
            estimates and log-likelihood), ``"structured"`` (variational: small grouping factors share a
            Gaussian block with the large factor they are nested in, see :mod:`lmevi.q.variational`) or
            ``"meanfield"`` (the tutorial's fully factorised q).
        reml: ``True`` puts beta in q with a flat prior, so the fit targets REML estimates; ``False`` makes
            beta a point estimate (ML-like, and the tutorial's). Default (``None``): ``True`` for the Gaussian
            (lme4's ``lmer``, ``REML = TRUE``), ``False`` for the generalized families (``glmer`` has no REML;
            ``reml=True`` there integrates beta under q, which gives its posterior covariance).
        method: ``"cavi"`` (coordinate ascent) or ``"optax"``; default ``"optax"`` when an optimizer is given
            or ``elbo="mc"``, else ``"cavi"``.
        elbo: ``"closed_form"`` (exact) or ``"mc"`` (Edward's KLqp estimate; optax only).
        optimizer: an optax ``GradientTransformation``; default ``optax.lbfgs()`` for the closed-form ELBO
            and :func:`edward_adam` for ``elbo="mc"``.
        num_samples: draws per Monte Carlo ELBO estimate.
        residual_scale: fix sigma at this value (the tutorial's 1.0); ``None`` estimates it.
        num_steps, tol, window: the stop rule (see :mod:`lmevi.fitting.loops`); defaults depend on the method, and
            the default ``tol`` is at least 1e-6 under ``dtype="float32"`` (:data:`lmevi.fitting.control.FLOAT32_TOL`).
        seed: seed of the Monte Carlo draws; the same seed gives the same fit.
        progress: show a progress bar (``None``: when writing to a terminal).
        blocks: ``q="structured"`` only, blocks named by grouping factor (``[("d", "dept", "fixed"), ("s",)]``).
        small_threshold: a term with at most this many coefficients in all is "small".
        dtype: ``"float64"`` (default) or ``"float32"`` for the arrays and the fit.
        missing: ``"raise"`` (default: a ValueError naming the columns with NA or inf and counting the rows)
            or ``"drop"`` (drop those rows, looking only at the formula's columns, with a warning).
        accelerate: coordinate ascent only: SQUAREM extrapolation (each step is then three sweeps); it cuts
            the steps of slow fits by 5-15x (variances heading for zero, mean-field q) and never lowers the
            ELBO.
        init_scale: initial scale of q for the optax path with ``elbo="mc"`` (with the closed-form ELBO q
            starts at its closed-form optimum given the starting point estimates).
        snapshot_steps: steps after which to keep the parameters; ``result.at_step(t)`` is then the fit as
            it stood after step ``t`` (the tutorial's residual histograms every ``n_print`` steps).
        devices: shard the rows over this many JAX devices (or these devices): each holds a slice of the
            rows, per-level sums are reduced across devices by XLA, and the fit equals the one-device fit to
            rounding (:func:`lmevi.build_model`). Coordinate ascent with a variational q; ``q="auto"`` then
            takes the structured q.
        distributed: a multi-process fit: every process of a ``jax.distributed`` job calls ``fit`` with its own
            rows (for example its own Parquet files) and gets the fit of all the rows, its rows sharded over
            the devices of every process (:func:`lmevi.build_model`; ``experiments/distributed.py`` runs one).
            The fitted values and residuals of the result are this process's rows.
        weights: R's prior weights, a column name or one number per row (``lmer``/``glmer``'s ``weights``): the
            Gaussian's residual variance of row ``i`` is ``sigma^2 / w_i``; a binomial response of proportions
            is then out of ``w_i`` trials. A binomial response may also be written ``cbind(successes,
            failures)`` (:mod:`lmevi.frame.prior`).
        nagq: with ``q="exact"`` for a Poisson or binomial model, glmer's ``nAGQ``: 1 (default) the Laplace
            approximation, 0 its first stage alone (beta inside the penalised least squares), more the adaptive
            Gauss-Hermite quadrature with that many nodes (one scalar random-effects term only)
            (:mod:`lmevi.exact.laplace`).
        offset: a column name or one number per row added to the linear predictor, as ``offset(...)`` terms
            of the formula are (R's ``offset``); ``predict(newdata)`` reads the new rows' offset.

    Returns:
        A :class:`~lmevi.result.fitresult.FitResult`.
    """
    xla.prepare()
    family, q = _family_and_q(family, q)
    how = control.settings(
        method=method, elbo=elbo, optimizer=optimizer, num_samples=num_samples, num_steps=num_steps, tol=tol,
        window=window, seed=seed, progress=progress, accelerate=accelerate, init_scale=init_scale,
        snapshot_steps=snapshot_steps, dtype=dtype,
    )
    return run_stages(
        formula, data, how, family=family, link=link, q=q, reml=reml, residual_scale=residual_scale, blocks=blocks,
        small_threshold=small_threshold, dtype=dtype, missing=missing, devices=devices, distributed=distributed,
        nagq=nagq, **{k: v for k, v in (("weights", weights), ("offset", offset)) if v is not None},
    )


def _family_and_q(family, q) -> tuple[str, str]:
    """Read ``family`` as the likelihood; the older ``family="structured"|"meanfield"`` names q."""
    if isinstance(family, str) and family in q_registry.Q_FAMILIES:
        if q is not None and q != family:
            raise ValueError(f"family={family!r} (the older spelling of q) contradicts q={q!r}; pass q only")
        warnings.warn(
            f"family={family!r} names the variational family; pass q={family!r} (family now names the "
            "likelihood, as in lme4's glmer)",
            DeprecationWarning,
            stacklevel=checks.user_stacklevel(),
        )
        return "gaussian", family
    return family, "auto" if q is None else q
