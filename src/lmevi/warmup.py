"""Warm-up: compile the common model shapes into the compilation cache once, as MixedModels.jl's precompile
workload does, so that a user's first fit of such a model in a new process loads its programs instead of
compiling them (``lmevi warmup`` on the command line).

A compiled program depends on the model's structure (its random terms, REML or ML, q, dtype) and on the
size buckets of rows and levels (:func:`lmevi.fitting.build.bucket`), not on the data. The workload fits each of
:data:`STRUCTURES` on simulated data of each size in :data:`SIZES`, by REML and by ML, with the structured
q; each fit stores its programs in the cache (:mod:`lmevi.runtime.jit`). The default ``q="auto"`` fits models
this small exactly, in NumPy, which compiles nothing: the warm-up is for the variational path, which
``q="auto"`` takes for large models and any fit asks for with ``q="structured"`` or ``"meanfield"``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd

# The structures most models in the corpus and in lme4's examples share.
STRUCTURES = (
    "y ~ x + (1 | g)",
    "y ~ x + (x | g)",
    "y ~ x + (1 | g) + (1 | h)",
    "y ~ x + (1 | h/g)",
)
# name -> (rows, levels of g, levels of h): each lands in one bucket of rows and of levels.
SIZES = {"small": (200, 15, 5), "medium": (900, 60, 12), "large": (3500, 250, 30)}


def simulate(rows: int, levels_g: int, levels_h: int, seed: int = 0) -> pd.DataFrame:
    """A data frame with ``y``, ``x`` and grouping factors ``g`` (nested in ``h``) of the given sizes."""
    rng = np.random.default_rng(seed)
    g = np.resize(np.arange(levels_g), rows)
    h = g % levels_h
    x = rng.normal(size=rows)
    y = 1.0 + x + rng.normal(size=levels_g)[g] + 0.5 * rng.normal(size=levels_g)[g] * x
    y = y + rng.normal(size=levels_h)[h] + rng.normal(size=rows)
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": h})


def warmup(structures=STRUCTURES, sizes=("small", "medium"), progress=None) -> list[dict]:
    """Fit every structure at every size, REML and ML; returns one record per fit (formula, size, reml,
    seconds). Warnings of the fits (simulated data) are silenced."""
    import lmevi

    done = []
    for size in sizes:
        frame = simulate(*SIZES[size])
        for formula in structures:
            for reml in (True, False):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lmevi.fit(formula, frame, q="structured", reml=reml, progress=False)
                record = dict(formula=formula, size=size, reml=reml, seconds=time.perf_counter() - start)
                done.append(record)
                if progress is not None:
                    progress(record)
    return done
