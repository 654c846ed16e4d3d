"""Shared fixtures: small simulated designs in float64, each built once per test run."""

from __future__ import annotations

import warnings

import jax
import matplotlib
import numpy as np
import pandas as pd
import pytest

# The tests build designs and q by hand, outside lmevi's own x64 scope, and compare them with float64 NumPy
# references: they need JAX's 64-bit types in the whole test process (lmevi itself never switches them on
# globally; tests/test_side_effects.py checks that in a fresh process). Figures go to files.
jax.config.update("jax_enable_x64", True)
matplotlib.use("Agg")

import lmevi  # noqa: E402
from dense import Problem, make_problem  # noqa: E402
from lmevi.q import layout
from lmevi.q.layout import QSpec  # noqa: E402

# Two crossed grouping factors, one of them with a correlated random slope.
CROSSED_FORMULA = "y ~ x + (1 + x | g) + (1 | h)"


def simulate_crossed(seed: int = 0, n_obs: int = 60, n_g: int = 6, n_h: int = 4) -> pd.DataFrame:
    """``y = 1 + 0.5 x + a_g + c_g x + d_h + e`` with every level of ``g`` and ``h`` present."""
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.resize(np.arange(n_g), n_obs))
    h = rng.permutation(np.resize(np.arange(n_h), n_obs))
    x = rng.normal(size=n_obs)
    a, c, d = rng.normal(0.0, 1.0, n_g), rng.normal(0.0, 0.5, n_g), rng.normal(0.0, 0.7, n_h)
    y = 1.0 + 0.5 * x + a[g] + c[g] * x + d[h] + rng.normal(0.0, 0.6, n_obs)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{j}" for j in g], "h": [f"h{j}" for j in h]})


def simulate_departments(n: int, n_students: int, n_instructors: int, n_departments: int = 14,
                         seed: int = 0) -> pd.DataFrame:
    """InstEval's shape: ``y ~ service + (1|s) + (1|d) + (1|dept)`` data where every instructor has a home
    department (95 % of its rows; the rest in any department), ``service`` binary (int8), grouping columns as
    integer ids."""
    rng = np.random.default_rng(seed)
    home = rng.integers(0, n_departments, n_instructors)
    d, s = rng.integers(0, n_instructors, n), rng.integers(0, n_students, n)
    dept = np.where(rng.random(n) < 0.05, rng.integers(0, n_departments, n), home[d])
    service = (rng.random(n) < 0.4).astype(np.int8)
    y = (3 + 0.1 * service + rng.normal(0, 0.3, n_students)[s] + rng.normal(0, 0.5, n_instructors)[d]
         + rng.normal(0, 0.1, n_departments)[dept] + rng.normal(0, 1.2, n))
    return pd.DataFrame({"y": y, "service": service, "s": s, "d": d, "dept": dept})


@pytest.fixture(scope="session")
def crossed() -> Problem:
    """60 rows, ``(1 + x | g)`` with 6 levels crossed with ``(1 | h)`` with 4 levels."""
    return make_problem(simulate_crossed(), CROSSED_FORMULA)


@pytest.fixture(scope="session")
def crossed_fit(crossed) -> lmevi.FitResult:
    """The structured-q fit (beta in q, coordinate ascent) of the crossed design, run to a relative ELBO change
    of 1e-14; no warning allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lmevi.ConvergenceWarning)
        return lmevi.fit(CROSSED_FORMULA, crossed.frame, q="structured", tol=1e-14, num_steps=3000, progress=False)


# Families of q exercised by the ELBO, family and CAVI tests. With ``small_threshold=5`` the slope term
# (6 levels x 2 coefficients) is large and ``h`` (4 x 1) is small: the structured family is then one
# arrowhead block (large g, small h, plus beta when reml=True); with the default threshold every term is
# small and the structured q is a single dense block.
SPEC_CASES = {
    "meanfield-ml": lambda design, info: layout.meanfield_spec(info, reml=False),
    "meanfield-reml": lambda design, info: layout.meanfield_spec(info, reml=True),
    "arrowhead-ml": lambda design, info: layout.structured_spec(design, info, reml=False, small_threshold=5),
    "arrowhead-reml": lambda design, info: layout.structured_spec(design, info, reml=True, small_threshold=5),
    "dense-reml": lambda design, info: layout.structured_spec(design, info, reml=True),
}


@pytest.fixture(params=list(SPEC_CASES), ids=list(SPEC_CASES))
def family_spec(request, crossed) -> QSpec:
    """Each family of :data:`SPEC_CASES` on the crossed design."""
    return SPEC_CASES[request.param](crossed.design, crossed.info)


def simulate_small_parts(seed: int = 5, n_obs: int = 90) -> pd.DataFrame:
    """``g`` 9 levels (large with ``small_threshold=12``: 18 coefficients), ``a`` 3 levels with a slope and
    ``b`` 4 levels (small: 6 and 4 coefficients); all three crossed."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "x": rng.normal(size=n_obs),
        "g": [f"g{j}" for j in rng.permutation(np.resize(np.arange(9), n_obs))],
        "a": [f"a{j}" for j in rng.permutation(np.resize(np.arange(3), n_obs))],
        "b": [f"b{j}" for j in rng.permutation(np.resize(np.arange(4), n_obs))],
    })
    frame["y"] = 1.0 + 0.5 * frame["x"] + rng.normal(size=n_obs)
    return frame
