"""Model matrices: formulaic's for R expressions, and a plain NumPy path for formulas that only name numeric
columns (``1 + x + z``), which skips formulaic's parser (most of a small design's time); column SDs
computed in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


from lmevi.runtime.precision import RowBuffers
from lmevi.runtime.collective import LOCAL, Local
from lmevi.frame.rsyntax import CONTEXT, plain_terms, to_formulaic


def column_sd(M: np.ndarray, collective: Local = LOCAL, columns=None) -> np.ndarray:
    """``(p,)`` the SD of each column of ``M`` ``(n, p)`` over all processes' rows: NumPy's own for one
    process, else from summed sums (the mean first, then the squared deviations from it). With ``columns``
    (indices), only those, ``(len(columns),)``.

    Column by column: NumPy reduces a 1-D column pairwise and several times faster than it reduces an
    ``(n, p)`` array with few columns along its rows (1e7 x 2: 0.08 s against 0.5 s)."""
    cols = [M[:, j] for j in (range(M.shape[1]) if columns is None else columns)]
    if not collective.distributed:
        return np.array([_sd(c) for c in cols], dtype=M.dtype)
    n = collective.sum(M.shape[0])
    mean = collective.sum(np.array([c.sum() for c in cols], dtype=M.dtype)) / n
    return np.sqrt(collective.sum(np.array([((c - m) ** 2).sum() for c, m in zip(cols, mean)], dtype=M.dtype)) / n)


# Rows per chunk of :func:`_sd`'s sum of squares: the deviations of one chunk (512 KiB) stay in cache.
SD_CHUNK = 1 << 16


def _sd(c: np.ndarray) -> float:
    """The (population) SD of a 1-D array: its mean by NumPy's pairwise sum, then the squared deviations
    summed chunk by chunk. ``np.std`` allocates two temporaries as long as the column, and at 1e7 rows their
    fresh memory cost more than the arithmetic (80 ms a column against 15 ms)."""
    n = c.shape[0]
    if n == 0:
        return float("nan")
    mean = c.sum(dtype=np.float64) / n
    ss = 0.0
    for start in range(0, n, SD_CHUNK):
        d = np.subtract(c[start:start + SD_CHUNK], mean, dtype=np.float64)
        ss += float(d @ d)
    return float(np.sqrt(ss / n))


@dataclass(frozen=True)
class PlainSpec:
    """The model matrix of a formula side that is only numeric columns and the intercept
    (:func:`lmevi.frame.rsyntax.plain_terms`), built without a formula engine: as formulaic builds it (the same
    columns, names and values), in a few array copies, with no formulaic import. Offers the part of formulaic's
    ``ModelSpec`` that lmevi uses (``column_names``, ``get_model_matrix``), so that new data is encoded the
    same way."""

    intercept: bool
    columns: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return (("Intercept",) if self.intercept else ()) + self.columns

    def get_model_matrix(self, data: pd.DataFrame, context=None, na_action=None, out=None) -> np.ndarray:
        """``(n, p)`` float64, C-ordered; written into ``out`` when given (an ``(n, p)`` float64 array)."""
        if out is None:
            out = np.empty((len(data), len(self.column_names)), dtype=np.float64)
        if self.intercept:
            out[:, 0] = 1.0
        for j, c in enumerate(self.columns, start=int(self.intercept)):
            col = data[c]
            # a NumPy column is cast while it is copied (no float64 temporary: 80 MB at 1e7 rows); pandas'
            # extension types (nullable, Arrow) convert with NA as NaN
            out[:, j] = (col.to_numpy() if isinstance(col.dtype, np.dtype)
                         else col.to_numpy(dtype=np.float64, na_value=np.nan))
        return out


def _plain_spec(expr: str, data: pd.DataFrame) -> PlainSpec | None:
    """A :class:`PlainSpec` for ``expr`` when every column it names is a plain number column of ``data``
    (not boolean or categorical, which formulaic encodes as factors), else ``None``."""
    plain = plain_terms(expr)
    if plain is None:
        return None
    intercept, columns = plain
    for c in columns:
        col = data[c] if c in data.columns else None
        if (col is None or isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col)
                or pd.api.types.is_bool_dtype(col)):
            return None
    return PlainSpec(intercept, columns)


def _design_matrix(
    expr: str, data: pd.DataFrame, collective: Local = LOCAL, buffers: RowBuffers | None = None
) -> tuple[np.ndarray, list[str], object]:
    """``(matrix (n, p) float64, formulaic-style column names, spec)`` of one side of the formula: by
    :class:`PlainSpec` where it applies (into ``buffers``, when given), else by formulaic
    (``na_action="raise"``; formulaic's errors pass through). A multi-process fit takes plain sides only:
    formulaic would code a factor by the levels of this process's rows alone."""
    spec = _plain_spec(expr, data)
    if spec is not None:
        out = None if buffers is None else buffers.zeros(len(data), (len(spec.column_names),), np.float64)
        return spec.get_model_matrix(data, out=out), list(spec.column_names), spec
    if collective.distributed:
        raise ValueError(
            f"{expr!r}: a multi-process fit (distributed=True) takes fixed effects and random-effect covariates "
            "that are numeric columns and the intercept only (a factor or a transform would be coded from "
            "this process's rows alone); add such columns to the data before splitting it"
        )
    mm = _model_matrix(to_formulaic(expr), data, na_action="raise", context=CONTEXT)
    return np.asarray(mm, dtype=np.float64), list(mm.columns), mm.model_spec


def _model_matrix(*args, **kwargs):
    """formulaic's ``model_matrix``, imported at the first design built: ``import lmevi`` stays fast."""
    from formulaic import model_matrix

    return model_matrix(*args, **kwargs)
