"""``python -m experiments.inference --quick`` runs (sleepstudy: profile intervals and figure, 50 bootstrap
replicates) and writes its JSON, markdown and PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_its_outputs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "experiments.inference", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "inference.json").read_text())
    assert res["targets"]["profile_ends_within_1pct"]
    assert res["bootstrap"]["n"] == 50 and res["bootstrap"]["converged"] == 50
    assert (tmp_path / "profile.png").stat().st_size > 10_000 and "bootMer" in (tmp_path / "inference.md").read_text()
