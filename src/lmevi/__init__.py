"""lmevi: linear mixed-effects models fitted by variational inference in JAX.

    >>> import lmevi
    >>> df = lmevi.load_insteval()
    >>> m = lmevi.fit("y ~ service + (1|s) + (1|d) + (1|dept)", df)
    >>> m.fixef(), m.varcorr(), m.ranef().head()

The stages ``fit`` composes are public, as lme4's ``lFormula``/``optimizeLmer``/``mkMerMod``:

    >>> model = lmevi.build_model("y ~ service + (1|s) + (1|d) + (1|dept)", df)   # design, q's blocks
    >>> params, run = lmevi.fit_model(model, lmevi.fit_settings(method="cavi"))
    >>> m = lmevi.make_result(model, lmevi.fit_settings(method="cavi"), params, run)

Importing lmevi changes nothing for the rest of the process: 64-bit arithmetic is switched on only
inside lmevi's own computations (:mod:`lmevi.runtime.precision`; fits run in float64 by default, as lme4 does,
``dtype="float32"`` for single precision), and an XLA CPU workaround is applied at the first fit only if
JAX has not started yet (:mod:`lmevi.runtime.jit`). No matplotlib backend is chosen.
"""


from lmevi.api import fit
from lmevi.fitting.build import Model, build_model
from lmevi.result.checks import ConvergenceWarning, SingularFitWarning
from lmevi.result.compare import RefitWarning, anova
from lmevi.fitting.control import FitSettings, edward_adam
from lmevi.fitting.control import settings as fit_settings
from lmevi.fitting.stage import fit_model
from lmevi.frame.data import load_insteval, train_test_split
from lmevi.frame.formula import FormulaError, parse_formula
from lmevi.result.fitresult import FitResult, make_result
from lmevi.exact.devfun import devfun
from lmevi.result.inference import bootstrap, emmeans

__all__ = [
    "ConvergenceWarning",
    "SingularFitWarning",
    "FitResult",
    "FitSettings",
    "FormulaError",
    "Model",
    "RefitWarning",
    "anova",
    "bootstrap",
    "build_model",
    "edward_adam",
    "emmeans",
    "fit",
    "fit_model",
    "devfun",
    "fit_settings",
    "make_result",
    "load_insteval",
    "parse_formula",
    "train_test_split",
]
__version__ = "0.1.0"
