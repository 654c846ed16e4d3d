"""R formula expressions in formulaic: the one place where R and Python disagree.

formulaic evaluates the terms of a formula as Python; R evaluates them as R. The differences that matter
for model formulas, and what this module does about each:

=================================  ======================================  ===============================
R                                  formulaic                               here
=================================  ======================================  ===============================
``x^2`` is a power inside ``I()``  ``^`` is XOR in Python                   ``^`` becomes ``**``
``log.NIF`` is a column name       ``log.NIF`` is attribute access          quoted as ```log.NIF```
``factor(x)``, ``as.factor(x)``    ``C(x)``                                  ``factor`` in the context
``ordered(x)`` (polynomial)         ``C(x, contr.poly)``                      translated, names mapped back
``sqrt``, ``sin``, ``pi``, ...     not defined                               defined in the context
term names ``I(x^2)``, ``fb``      ``I(x ** 2)``, ``f[T.b]``                 :func:`lme4_name`
=================================  ======================================  ===============================

``log``, ``exp`` and ``I()`` mean the same in both and pass through.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from lmevi.frame.formula import FormulaError
from lmevi.frame.labels import as_factor

# identifiers with a dot that are not calls (``log.NIF``, ``avg.IQ.ver.cen``, but not ``as.factor(``)
_DOTTED = re.compile(r"(?<![\w.`])([A-Za-z_][\w]*(?:\.[\w]+)+|\.[A-Za-z_][\w.]*)(?![\w.`]*\s*\()")
_AS_FACTOR = re.compile(r"\bas\.factor\s*\(")
_ORDERED = re.compile(r"(?<![\w.])ordered\s*\(([^()]*)\)")
_POLY_NAME = re.compile(r"C\(([^,()]+), contr\.poly\)")
_UNSUPPORTED = {
    "offset": "offset() terms are not supported",
    "poly": "poly() (orthogonal polynomials) is not supported; use I(x^2) terms",
    "ns": "spline terms ns() are not supported",
    "bs": "spline terms bs() are not supported",
    "s": "smooth terms s() belong to GAMs, not to linear mixed models",
}


def _factor(x) -> pd.Series:
    """R's ``factor``: levels in R's order, labels as R prints them (``1``, not ``1.0``; see
    :mod:`lmevi.frame.labels`)."""
    return pd.Series(as_factor(x), index=getattr(x, "index", None))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def clean_error(err) -> str:
    """The first line of a formulaic error, without its terminal colour codes."""
    text = _ANSI.sub("", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


CONTEXT = {
    "factor": _factor,
    "sqrt": np.sqrt,
    "log10": np.log10,
    "log2": np.log2,
    "log1p": np.log1p,
    "abs": np.abs,
    "exp": np.exp,
    "log": np.log,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "pi": np.pi,
}


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def plain_terms(expr: str) -> tuple[bool, tuple[str, ...]] | None:
    """``(intercept, columns)`` when ``expr`` is only column names and ``1`` / ``0`` / ``- 1`` joined by
    ``+`` (``Days``, ``1 + service``, ``0 + x + z``), else ``None``.

    Such a side needs no formula engine: its model matrix is the intercept column (unless removed) and the
    named columns, each once, in the order written (as formulaic and R order first-order terms). Names
    with dots or other characters, and every operator or call, go to formulaic.
    """
    text = re.sub(r"\s+", "", expr)
    intercept = True
    if text.endswith("-1"):
        text, intercept = text[:-2], False
    columns: list[str] = []
    tokens = text.split("+") if text else ["1"]
    if "1" in tokens and (not intercept or "0" in tokens):
        return None  # "0 + 1", "1 + x - 1": leave R's precedence to the formula engine
    for token in tokens:
        if token == "1":
            continue
        if token == "0":
            intercept = False
        elif _NAME.fullmatch(token) and token not in CONTEXT:
            if token not in columns:
                columns.append(token)
        else:
            return None
    return intercept, tuple(columns)


def required_columns(expr: str) -> set[str]:
    """Data columns an R expression reads (function names of :data:`CONTEXT` excluded)."""
    plain = plain_terms(expr)
    if plain is not None:  # no formula engine needed (nor imported)
        return set(plain[1])
    from formulaic import Formula

    # formulaic's required_variables splits quoted names at their dots: stand in plain names for them
    quoted: dict[str, str] = {}

    def hold(m):
        key = f"__lmevi_q{len(quoted)}__"
        quoted[key] = m.group(1)
        return key

    plain = re.sub(r"`([^`]*)`", hold, to_formulaic(expr))
    try:
        names = set(Formula(plain).required_variables) - set(CONTEXT) - {"np", "C", "I", "contr"}
    except Exception as err:  # formulaic's syntax errors: keep the message, drop the colours
        raise FormulaError(f"cannot read {expr!r} as a formula: {clean_error(err)}") from None
    return {quoted.get(n, n) for n in names}


def to_formulaic(expr: str) -> str:
    """Translate an R formula expression (one side, no random terms) into formulaic syntax.

    Raises:
        ValueError: naming an R construct that has no counterpart here.
    """
    for name, why in _UNSUPPORTED.items():
        if re.search(rf"(?<![\w.]){name}\s*\(", expr):
            raise ValueError(f"{why} (in {expr!r})")
    out = _AS_FACTOR.sub("factor(", expr)
    out = out.replace("^", "**")
    out = _DOTTED.sub(lambda m: f"`{m.group(1)}`", out)
    return _ORDERED.sub(lambda m: f"C({m.group(1).strip()}, contr.poly)", out)


def lme4_name(name: str) -> str:
    """A formulaic column name as lme4 prints it.

    ``Intercept`` -> ``(Intercept)``; ``f[T.b]`` and ``f[b]`` -> ``fb``; ``I(x ** 2)`` -> ``I(x^2)``.
    """
    if name == "Intercept":
        return "(Intercept)"
    name = _POLY_NAME.sub(r"ordered(\1)", name)
    name = re.sub(r"\[T\.([^\]]*)\]", r"\1", name)
    name = re.sub(r"\[([^\]]*)\]", r"\1", name)
    return name.replace(" ** ", "^").replace("**", "^").replace("`", "")
