"""Simulated data shaped like InstEval, shared by the scaling benchmark (:mod:`experiments.bench.scaling`,
:mod:`experiments.bench.profile`) and the multi-process fit (:mod:`experiments.distributed`).

:func:`simulate` draws crossed data like InstEval's (students ~ n/25, instructors ~ n/65, 14 departments
with instructors nearly nested in them, a binary ``service``; SDs 0.33, 0.51, 0.08, residual 1.18);
:func:`simulate_levels` and :func:`simulate_rows` draw its levels and then its rows in blocks, so that one data
set can be written a shard at a time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FACTORS = ("s", "d", "dept")
SIM_SD = {"s": 0.33, "d": 0.51, "dept": 0.08, "residual": 1.18}
SIM_BETA = (3.2, -0.08)


def simulate(n_obs: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """Crossed data shaped like InstEval; returns the frame and the simulated effects.

    Students ``n/25`` and instructors ``n/65`` levels (at least 10 and 5), 14 departments; every instructor
    has a home department, and 95% of an instructor's rows are in it. ``service`` is Bernoulli(0.4).
    """
    rng = np.random.default_rng(seed)
    levels = simulate_levels(n_obs, rng)
    rows = simulate_rows(levels, n_obs, rng)

    def factor(codes, n):
        return pd.Categorical.from_codes(codes, categories=[str(i) for i in range(n)])

    df = pd.DataFrame({"y": rows["y"], "service": rows["service"],
                       **{g: factor(rows[g], levels["n_levels"][g]) for g in FACTORS}})
    return df, levels["effects"]


def simulate_levels(n_obs: int, rng) -> dict:
    """The levels of :func:`simulate` for ``n_obs`` rows: their numbers, the instructors' home departments and
    every level's effect."""
    n_levels = {"s": max(10, n_obs // 25), "d": max(5, n_obs // 65), "dept": 14}
    home = rng.integers(0, n_levels["dept"], n_levels["d"], dtype=np.int32)
    effects = {g: rng.normal(0, SIM_SD[g], n_levels[g]) for g in FACTORS}
    return {"n_levels": n_levels, "home": home, "effects": effects}


def simulate_rows(levels: dict, n_rows: int, rng) -> dict:
    """``n_rows`` rows of :func:`simulate` given its levels (:func:`simulate_levels`): level codes (int32),
    ``service`` and ``y``. Drawn in blocks from separate streams, rows of one data set can be made a shard
    at a time."""
    n = levels["n_levels"]
    s = rng.integers(0, n["s"], n_rows, dtype=np.int32)
    d = rng.integers(0, n["d"], n_rows, dtype=np.int32)
    away = rng.random(n_rows) < 0.05
    dept = np.where(away, rng.integers(0, n["dept"], n_rows, dtype=np.int32), levels["home"][d]).astype(np.int32)
    service = (rng.random(n_rows) < 0.4).astype(np.int64)
    b = levels["effects"]
    y = (SIM_BETA[0] + SIM_BETA[1] * service + b["s"][s] + b["d"][d] + b["dept"][dept]
         + rng.normal(0, SIM_SD["residual"], n_rows))
    return {"y": y, "service": service, "s": s, "d": d, "dept": dept}
