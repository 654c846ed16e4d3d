"""lmevi: linear mixed-effects models fitted by variational inference in JAX.

    >>> import lmevi
    >>> df = lmevi.load_insteval()
    >>> m = lmevi.fit("y ~ service + (1|s) + (1|d) + (1|dept)", df)
    >>> m.fixef(), m.varcorr(), m.ranef().head()

Importing lmevi changes nothing for the rest of the process: 64-bit arithmetic is switched on only
inside lmevi's own computations (:mod:`lmevi.precision`; fits run in float64 by default, as lme4 does,
``dtype="float32"`` for single precision), and an XLA CPU workaround is applied at the first fit only if
JAX has not started yet (:mod:`lmevi.runtime`). No matplotlib backend is chosen.
"""

from lmevi.api import ConvergenceWarning, SingularFitWarning, edward_adam, fit
from lmevi.data import load_insteval, train_test_split
from lmevi.formula import FormulaError, parse_formula
from lmevi.results import FitResult

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
