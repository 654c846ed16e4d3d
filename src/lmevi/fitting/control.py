"""How a fit runs, as lme4's ``lmerControl``: :class:`FitSettings` is the typed record (method, ELBO estimator,
optimizer, stop rule, seed), :func:`settings` checks and completes user options into one, and
:func:`variational_only` says which of them ask for variational EM (the one rule that ``q="auto"`` and the
stages read).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple


from lmevi.fitting.loops import StopRule
from lmevi.runtime.options import check_bool, check_choice, check_int, check_optional_bool, check_real

if TYPE_CHECKING:  # imported where used: 0.1 s that exact fits do not pay
    import optax


METHODS = ("cavi", "optax")


ELBOS = ("closed_form", "mc")
# the options of lmevi.fit that are settings of the fit (the rest build the model)
SETTINGS = ("method", "elbo", "optimizer", "num_samples", "num_steps", "tol", "window", "seed", "progress",
            "accelerate", "init_scale", "snapshot_steps")


class FitSettings(NamedTuple):
    """How a fit runs.

    Attributes:
        method: ``"cavi"`` (coordinate ascent) or ``"optax"``.
        elbo: ``"closed_form"`` or ``"mc"`` (Edward's KLqp estimate).
        optimizer: the optax ``GradientTransformation`` (``None`` for coordinate ascent).
        num_samples: draws per Monte Carlo ELBO estimate.
        rule: the stop rule.
        seed: seed of the Monte Carlo draws.
        progress: show a progress bar (``None``: on a terminal).
        accelerate: SQUAREM extrapolation of coordinate ascent.
        init_scale: initial scale of q (optax path with the Monte Carlo ELBO).
        snapshot_steps: steps after which the parameters are kept.
    """

    method: str
    elbo: str
    optimizer: optax.GradientTransformation | None
    num_samples: int
    rule: StopRule
    seed: int
    progress: bool | None
    accelerate: bool
    init_scale: float
    snapshot_steps: tuple[int, ...]


@functools.cache
def edward_adam() -> optax.GradientTransformation:
    """The optimizer of Edward's ``inference.initialize()``: Adam, learning rate 0.1 decayed by 0.9 every
    100 steps (staircase). TensorFlow 1's Adam adds its epsilon to the denominator before bias
    correction and optax after it; with ``eps=1e-8`` the two differ negligibly here.

    The same object is returned on every call: the compiled fitting loop is keyed on the optimizer, so
    reusing one optimizer object across fits avoids compiling again."""
    import optax

    return optax.adam(optax.exponential_decay(0.1, transition_steps=100, decay_rate=0.9, staircase=True))


@functools.cache
def _lbfgs() -> optax.GradientTransformation:
    import optax

    return optax.lbfgs()


def _is_optax(optimizer) -> bool:
    import optax

    return isinstance(optimizer, optax.GradientTransformation)


def describe_optimizer(optimizer) -> str:
    """How a result names its optimizer: lmevi's defaults by name, any other optax object generically."""
    if optimizer is _lbfgs():
        return "optax.lbfgs()"
    if optimizer is edward_adam():
        return "lmevi.edward_adam()"
    return f"user-supplied optax {type(optimizer).__name__}"


def _defaults(method: str, elbo: str) -> tuple[int, float, int]:
    """Step budget, tolerance and window of the stop rule for each path."""
    if method == "cavi":
        return 3000, 1e-10, 1
    if elbo == "mc":
        return 5000, 1e-5, 200
    return 5000, 1e-10, 1


# The default tolerance of a float32 fit: its ELBO is rounded to about 6e-8 relative and its parameters move in
# their last bits, so a relative change of 1e-10 may never be seen and the fit would run to its step budget;
# 1e-6 is about 17 float32 roundings. An explicit ``tol`` is taken as given.
FLOAT32_TOL = 1e-6


def settings(
    *,
    method: str | None = None,
    elbo: str = "closed_form",
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 1,
    num_steps: int | None = None,
    tol: float | None = None,
    window: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    accelerate: bool = True,
    init_scale: float = 0.1,
    snapshot_steps=(),
    dtype: str = "float64",
) -> FitSettings:
    """Check the fitting options (see :func:`lmevi.fit`) and fill in the defaults of the chosen path; ``dtype``
    (the fit's, as :func:`lmevi.build_model` takes it) sets the floor of the default tolerance
    (:data:`FLOAT32_TOL`)."""
    elbo = check_choice("elbo", elbo, ELBOS)
    if optimizer is not None and not _is_optax(optimizer):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation such as optax.adam(0.01), got {optimizer!r}"
        )
    if method is None:
        method = "optax" if (optimizer is not None or elbo == "mc") else "cavi"
    method = check_choice("method", method, METHODS)
    if method == "cavi" and elbo == "mc":
        raise ValueError("method='cavi' maximises the closed-form ELBO; use elbo='closed_form' or method='optax'")
    if method == "cavi" and optimizer is not None:
        raise ValueError("method='cavi' takes no optimizer; pass method='optax' to use one")
    if method == "optax" and optimizer is None:
        optimizer = edward_adam() if elbo == "mc" else _lbfgs()
    num_samples = check_int("num_samples", num_samples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    progress = check_optional_bool("progress", progress)
    accelerate = check_bool("accelerate", accelerate)
    init_scale = check_real("init_scale", init_scale, positive=True)
    if isinstance(snapshot_steps, (str, bytes)) or not hasattr(snapshot_steps, "__iter__"):
        raise TypeError(f"snapshot_steps must be a sequence of step numbers, got {snapshot_steps!r}")
    snapshot_steps = tuple(check_int("snapshot_steps entry", t, minimum=1) for t in snapshot_steps)
    steps0, tol0, window0 = _defaults(method, elbo)
    if dtype == "float32":
        tol0 = max(tol0, FLOAT32_TOL)
    budget = steps0 if num_steps is None else check_int("num_steps", num_steps, minimum=1)
    rule = StopRule(
        num_steps=budget,
        tol=tol0 if tol is None else check_real("tol", tol, minimum=0.0),
        window=min(window0 if window is None else check_int("window", window, minimum=1), budget),
    )
    return FitSettings(method, elbo, optimizer, num_samples, rule, seed, progress, accelerate, init_scale,
                       snapshot_steps)


def variational_only(s: FitSettings) -> str | None:
    """The options of ``s`` that ask for variational EM, in the user's words, or ``None``: the optax path, the
    Monte Carlo ELBO, snapshots during training and plain (unaccelerated) coordinate ascent all belong to the
    variational loop; lme4's exact criterion has none of them. ``q="auto"`` then takes a variational q, and an
    exact model refuses them (:func:`lmevi.fitting.build.resolve_q`, :func:`lmevi.fitting.stage.fit_model`)."""
    asked = []
    if s.method != "cavi":
        asked.append(f"method={s.method!r}")
    if s.elbo != "closed_form":
        asked.append(f"elbo={s.elbo!r}")
    if s.snapshot_steps:
        asked.append("snapshot_steps")
    if not s.accelerate:
        asked.append("accelerate=False")
    return ", ".join(asked) or None
