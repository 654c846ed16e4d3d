"""Importing any experiment changes no global setting (tier 3, a fresh process).

Every module under ``experiments/`` is imported, by walking the folder, in one fresh interpreter started from
the repository's root; afterwards JAX's 64-bit mode is still off, ``matplotlib.pyplot`` was never imported and
matplotlib's settings are those it had before, its backend still unresolved (matplotlib's own
``rcParams._get_backend_or_none``: reading ``rcParams["backend"]`` would itself choose one). The experiments choose 64-bit types
and matplotlib's backend inside their own calls and their ``main``, never at import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = r"""
import importlib, json, sys
from pathlib import Path

import jax
import matplotlib

root = Path.cwd()
names = sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
               for p in (root / "experiments").rglob("*.py"))
# read without resolving the backend (reading rcParams["backend"] would choose one, importing pyplot)
rc = lambda: {k: repr(matplotlib.rcParams._get(k)) for k in matplotlib.rcParams.keys() if k != "backend"}
before = rc()
x64_before = bool(jax.config.jax_enable_x64)
for name in names:
    importlib.import_module(name)
after = rc()
print(json.dumps({"names": names, "x64_before": x64_before, "x64": bool(jax.config.jax_enable_x64),
                  "pyplot": "matplotlib.pyplot" in sys.modules,
                  "backend": matplotlib.rcParams._get_backend_or_none(),
                  "rc_changed": sorted(k for k in before if before[k] != after.get(k))}))
"""


def test_importing_every_experiment_changes_no_global_setting():
    res = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # the walk found the experiments, the bench subpackage among them
    assert {"experiments.benchmark", "experiments.bench.scaling", "experiments.corpus",
            "experiments.latency", "experiments.insteval"} <= set(got["names"])
    assert got["x64_before"] is False and got["x64"] is False
    assert got["pyplot"] is False
    assert got["backend"] is None  # no backend chosen (rcParams' backend still unresolved)
    assert got["rc_changed"] == []
