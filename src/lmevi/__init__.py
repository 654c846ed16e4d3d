"""lmevi: linear mixed-effects models fitted by variational inference in JAX.

    >>> import lmevi
    >>> df = lmevi.load_insteval()
    >>> m = lmevi.fit("y ~ service + (1|s) + (1|d) + (1|dept)", df)
    >>> m.fixef(), m.varcorr(), m.ranef().head()

Precision: importing lmevi enables JAX's 64-bit mode (``jax_enable_x64``) so that fits run in float64 by
default, as lme4 does; pass ``dtype="float32"`` to :func:`fit` for single precision.
"""

import jax

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
