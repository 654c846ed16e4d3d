"""Kept executables (:mod:`lmevi.runtime.jit`): what their key depends on, which calls are never kept, and that an
executable JAX's own cache served is used but not written out again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmevi.runtime import cache as cache_lib
from lmevi.runtime import jit as runtime


def _scaled(x, factor, power=1):
    return factor * x**power


STATIC = runtime._StaticArgs.of(_scaled, {"static_argnums": 1, "static_argnames": ("power",)})


def key(*args, **kwargs):
    found = runtime._key("test._scaled", *runtime._split(STATIC, args, kwargs))
    return None if found is None else found[0]


def test_static_arguments_are_known_by_position_and_by_name():
    assert STATIC == runtime._StaticArgs(frozenset({1, 2}), frozenset({"factor", "power"}))


def test_the_key_follows_everything_that_changes_the_program(monkeypatch):
    base = key(np.ones(3), 2.0, power=2)
    assert base == key(np.zeros(3), 2.0, power=2)  # values of array arguments are data, not program
    assert len({
        base,
        key(np.ones(4), 2.0, power=2),  # shape
        key(np.ones(3, np.float32), 2.0, power=2),  # dtype
        key(np.ones(3), 3.0, power=2),  # a static argument
        key(np.ones(3), 2.0, power=3),  # a static keyword argument
        key((np.ones(3),), 2.0, power=2),  # tree structure
    }) == 6
    assert key(jnp.ones(3), 2.0, power=2) == base  # a host or a device array: one program, as for jit
    with jax.enable_x64(False):  # 64-bit types on or off
        assert key(np.ones(3), 2.0, power=2) != base
    # lmevi's own source (and the JAX versions and devices) enter every key: an edited lmevi loads nothing old
    monkeypatch.setattr(runtime, "_fingerprints", ["another lmevi"])
    assert key(np.ones(3), 2.0, power=2) != base


def test_the_host_cpu_is_part_of_every_key_on_cpu():
    """A cache folder shared by machines with different CPUs (a cluster's home folder) must not hand one of them
    code compiled for another's instruction set."""
    cpu = runtime._host_cpu()
    assert cpu == runtime._host_cpu() and cpu.split(":")[0]
    if jax.devices()[0].platform == "cpu":
        assert cpu in runtime._fingerprint()


class Opaque:  # its text is its address, so no later process could match a key made from it
    pass


def test_calls_that_cannot_be_keyed_safely_are_not():
    assert key(np.ones(3), Opaque()) is None
    assert key(np.ones(3), 2.0, power=2) is not None

    seen = []

    def traced(x):
        seen.append(key(x, 2.0))
        return x

    jax.jit(traced)(np.ones(3))
    assert seen == [None]


def test_a_cached_program_runs_the_same_as_jit(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_lib, "_cache_choice", [tmp_path])
    monkeypatch.setattr(runtime, "_memory", {})
    f = runtime.sized_jit(_scaled, sized=False, static_argnums=1, static_argnames=("power",),
                          name="tests.test_runtime._scaled")
    before = dict(runtime.EXECUTABLE_STATS)
    x = np.arange(5.0)
    np.testing.assert_array_equal(f(x, 2.0, power=3), 2.0 * x**3)
    np.testing.assert_array_equal(f(x + 1, 2.0, power=3), 2.0 * (x + 1) ** 3)  # same program, in memory
    assert f._cache_size() == 1
    assert runtime.EXECUTABLE_STATS["compiled"] == before["compiled"] + 1
    assert len(list((tmp_path / runtime.EXECUTABLES).glob("*.bin"))) == 1
    runtime._memory.clear()  # as a new process would: from the file
    np.testing.assert_array_equal(f(x, 2.0, power=3), 2.0 * x**3)
    assert runtime.EXECUTABLE_STATS["loaded"] == before["loaded"] + 1


SERVED_BY_JAX = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from lmevi.runtime import jit as runtime
    from lmevi.runtime import lapack
    def f(x):
        return jax.numpy.linalg.cholesky(x @ x.T + np.eye(3)).sum()
    x = np.arange(9.0).reshape(3, 3)
    if sys.argv[2] == "jit":
        print(json.dumps(float(jax.jit(f)(x))))
    else:
        g = runtime.sized_jit(f, sized=False, name="served_by_jax.f")
        print(json.dumps([float(g(x)), runtime.EXECUTABLE_STATS]))
    """
)


def test_an_executable_that_jax_s_cache_served_is_used_but_not_kept(tmp_path):
    """jaxlib 0.10 on CPU writes an executable it loaded from its own cache out again without part of its code
    (the next process failed with "Function ... not found"), so lmevi keeps only programs XLA compiled."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["LMEVI_CACHE_DIR"] = str(tmp_path / "lmevi")
    jax_cache = str(tmp_path / "jax")

    def run(mode):
        out = subprocess.run([sys.executable, "-c", SERVED_BY_JAX, jax_cache, mode], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    expected = run("jit")  # the user's own jit puts the program in JAX's cache
    value, stats = run("lmevi")
    assert value == expected
    assert stats == {"loaded": 0, "compiled": 1, "stored": 0, "failed_loads": 0}
    assert not (tmp_path / "lmevi" / runtime.EXECUTABLES).exists()


def test_an_edit_of_lmevi_that_leaves_a_program_unchanged_loads_it(tmp_path, monkeypatch):
    """The call key holds a hash of lmevi's source, so an edit anywhere in lmevi is a new call key; the call
    then lowers its program and finds the executable by the program's own text, without compiling."""
    monkeypatch.setattr(cache_lib, "_cache_choice", [tmp_path])
    monkeypatch.setattr(runtime, "_memory", {})
    f = runtime.sized_jit(_scaled, sized=False, static_argnums=1, name="tests.test_runtime._scaled.edited")
    x = np.arange(4.0)
    f(x, 3.0)
    runtime._memory.clear()
    monkeypatch.setattr(runtime, "_sources", ["lmevi after an edit"])
    before = dict(runtime.EXECUTABLE_STATS)
    np.testing.assert_array_equal(f(x, 3.0), 3.0 * x)
    assert runtime.EXECUTABLE_STATS["compiled"] == before["compiled"]
    assert runtime.EXECUTABLE_STATS["loaded"] == before["loaded"] + 1
    assert len(list((tmp_path / runtime.EXECUTABLES).glob("*.bin"))) == 1  # one program, two call keys
    assert len(list((tmp_path / runtime.EXECUTABLES).glob("*.key"))) == 2


@pytest.mark.parametrize("damage", [b"", b"not a pickle"])
def test_a_damaged_file_is_compiled_again(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(cache_lib, "_cache_choice", [tmp_path])
    monkeypatch.setattr(runtime, "_memory", {})
    f = runtime.sized_jit(_scaled, sized=False, static_argnums=1, name="tests.test_runtime._scaled.damaged")
    x = np.arange(3.0)
    f(x, 2.0)
    (path,) = (tmp_path / runtime.EXECUTABLES).glob("*.bin")
    path.write_bytes(damage)
    runtime._memory.clear()
    failed = runtime.EXECUTABLE_STATS["failed_loads"]
    np.testing.assert_array_equal(f(x, 2.0), 2.0 * x)
    assert runtime.EXECUTABLE_STATS["failed_loads"] == failed + 1
    assert path.stat().st_size > len(damage)  # written again


LINK_WITHOUT_SCIPY_LINALG = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from lmevi.runtime import jit as runtime
    from lmevi.runtime import lapack
    lapack._link_lapack()
    linked_alone = "scipy.linalg" not in sys.modules and "scipy.linalg.cython_lapack" in sys.modules
    import jax
    jax.config.update("jax_enable_x64", True)
    x = np.arange(9.0).reshape(3, 3) @ np.arange(9.0).reshape(3, 3).T + np.eye(3)
    ours = float(jax.jit(jax.numpy.linalg.cholesky)(x)[2, 2])
    import scipy.linalg  # the user's own import afterwards: the whole package, the same LAPACK modules
    from scipy.linalg import cython_lapack
    same = cython_lapack is sys.modules["scipy.linalg.cython_lapack"]
    print(json.dumps([linked_alone, ours, float(scipy.linalg.cholesky(x, lower=True)[2, 2]), same]))
    """
)


def test_lapack_is_linked_without_importing_scipy_linalg():
    """jaxlib's CPU kernels take LAPACK from two SciPy extension modules; lmevi loads them from their files
    (10 ms) rather than by a plain import, which runs all of ``scipy.linalg`` first (0.1-0.3 s). The kernels
    must work, and a later ``import scipy.linalg`` must work and share the modules. Cholesky factors of the
    same 3 x 3 matrix by the two LAPACK routes agree to 1e-12 relative (a few roundings)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    out = subprocess.run([sys.executable, "-c", LINK_WITHOUT_SCIPY_LINALG], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    linked_alone, ours, scipys, same = json.loads(out.stdout.strip().splitlines()[-1])
    assert linked_alone
    assert ours == pytest.approx(scipys, rel=1e-12)
    assert same
