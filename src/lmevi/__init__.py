"""lmevi: linear mixed-effects models fitted by variational inference in JAX.

    >>> import lmevi
    >>> df = lmevi.load_insteval()
    >>> m = lmevi.fit("y ~ service + (1|s) + (1|d) + (1|dept)", df)
    >>> m.fixef(), m.varcorr(), m.ranef().head()

Precision: importing lmevi enables JAX's 64-bit mode (``jax_enable_x64``) so that fits run in float64 by
default, as lme4 does; pass ``dtype="float32"`` to :func:`fit` for single precision.

XLA on CPU: importing lmevi also adds ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to
``XLA_FLAGS`` unless that flag is already set there. With jaxlib 0.10's default scheduler, a fit of 1e7 rows
deadlocked inside XLA's CPU runtime on every try on a 2-core machine; with that scheduler off it never did,
and side by side the InstEval and 1e6-row fits ran 10-20 % faster (see the README's benchmark section).
XLA reads the variable when its first computation starts, so this only takes effect when lmevi is imported
before anything has run on JAX; it changes nothing on GPU.
"""

import os

_XLA_SCHEDULER = "xla_cpu_enable_concurrency_optimized_scheduler"
if _XLA_SCHEDULER not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_XLA_SCHEDULER}=false".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from lmevi.api import ConvergenceWarning, SingularFitWarning, edward_adam, fit  # noqa: E402
from lmevi.data import load_insteval, train_test_split  # noqa: E402
from lmevi.formula import FormulaError, parse_formula  # noqa: E402
from lmevi.results import FitResult  # noqa: E402

__all__ = [
    "ConvergenceWarning",
    "SingularFitWarning",
    "FitResult",
    "FormulaError",
    "edward_adam",
    "fit",
    "load_insteval",
    "parse_formula",
    "train_test_split",
]
__version__ = "0.1.0"
