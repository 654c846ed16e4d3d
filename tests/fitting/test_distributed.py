"""A multi-process fit (``lmevi.fit(..., distributed=True)``): rows in Parquet files, one process each.

Tier 3 (fresh processes): ``python -m experiments.distributed`` writes simulated InstEval-shaped rows as two Parquet
files, starts two processes that join one ``jax.distributed`` job (CPU collectives through gloo), each
reading its own file, and fits the same rows in one process; every estimate, every random effect and every
row's fitted value must agree to 1e-10 in float64 (the processes sum their rows' contributions in another
order than one process does: the difference is rounding, measured at about 1e-13). Tier 1: the option's
errors name the problem.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmevi

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("ignore")
def test_two_processes_reading_their_own_parquet_files_fit_as_one(tmp_path):
    pytest.importorskip("pyarrow")
    cmd = [sys.executable, "-m", "experiments.distributed", "--processes", "2", "--rows", "6000",
           "--out", str(tmp_path), "--timeout", "300"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "distributed.json").read_text())
    assert result["processes"] == 2 and result["devices"] == 2
    assert result["rows_per_process"] == [3000, 3000]
    diffs = result["max_abs_diff_vs_single"]
    assert diffs["same_in_every_process"]
    for key in ("fixef", "sd", "ranef", "fitted"):
        assert diffs[key] <= 1e-10, (key, diffs)
    assert diffs["elbo"] <= 1e-10 * 6000  # the ELBO sums over rows: 1e-10 per row
    assert result["steps"]["distributed"] == result["steps"]["single"]


def test_distributed_needs_a_jax_distributed_job():
    frame = pd.DataFrame({"y": np.arange(20.0) % 7, "g": np.arange(20) % 4})
    with pytest.raises(RuntimeError, match="jax.distributed.initialize"):
        lmevi.fit("y ~ 1 + (1 | g)", frame, distributed=True)


def test_distributed_takes_numeric_columns_only():
    """A factor in the fixed part would be coded from one process's rows: refused, naming the remedy."""
    from lmevi.runtime.collective import Local
    from lmevi.frame.matrix import _design_matrix

    class TwoProcesses(Local):
        distributed = True

    frame = pd.DataFrame({"x": np.arange(6.0), "f": list("abcabc")})
    assert _design_matrix("x", frame, TwoProcesses())[0].shape == (6, 2)
    with pytest.raises(ValueError, match="numeric columns and the intercept only"):
        _design_matrix("x + f", frame, TwoProcesses())
