"""Measurement harness of the benchmark.

* :func:`run_measured` runs a command and reports its wall time and its own peak RSS, with an optional
  time limit, address-space cap and a watchdog that kills a process which stopped using CPU time;
* :func:`worker` runs ``python -m experiments.benchmark --worker <mode>`` in a fresh process (cold starts,
  NumPyro, one scaling size, the sweep profile) and reads back the JSON line it prints;
* :func:`spread`, :func:`median_of`, :func:`ratio` and :func:`time_call` summarise timings;
* :func:`machine_info` describes the machine and the versions; :func:`log` prints with elapsed time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# the entry module, run again in helper mode by :func:`worker` (``python -m``, from :data:`ROOT`)
ENTRY = "experiments.benchmark"


def spread(times) -> dict:
    """Median, min, max and count of a list of seconds (``None`` entries dropped)."""
    t = np.asarray([x for x in times if x is not None], dtype=float)
    if t.size == 0:
        return {"median": None, "min": None, "max": None, "n": 0, "all": []}
    return {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max()), "n": int(t.size),
            "all": [round(float(x), 6) for x in t]}


def median_of(sp: dict | None):
    """The median of a :func:`spread` (``None`` for a missing one)."""
    return None if not sp else sp.get("median")


def ratio(a, b):
    """``a / b``, or ``None`` when either is missing or ``b`` is not positive."""
    return None if a is None or b is None or b <= 0 else float(a) / float(b)


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a live process, from ``/proc`` (``None`` where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_measured(cmd, timeout=None, mem_limit_gb=None, idle_timeout=None) -> dict:
    """Run ``cmd``; return its stdout, stderr, exit code, wall time and its own peak RSS (``os.wait4``).

    ``mem_limit_gb`` caps the address space of the command (``ulimit -v`` in a shell that then ``exec``s it).
    ``idle_timeout``: kill the command when, over the last that many seconds, it used under 2 % of one core
    (a deadlocked runtime sleeps on its locks, waking now and then); the result then has ``hung: True``.
    """
    if mem_limit_gb:
        cmd = ["bash", "-c", f'ulimit -v {int(mem_limit_gb * 2**20)} && exec "$@"', "bash", *map(str, cmd)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
        timed_out = hung = False
        samples: list[tuple[float, float]] = []  # (wall, cpu seconds) of the command
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            cpu = None if idle_timeout is None else _cpu_seconds(proc.pid)
            if cpu is not None:
                samples.append((now, cpu))
                while len(samples) > 1 and now - samples[1][0] >= idle_timeout:
                    samples.pop(0)
                t_old, cpu_old = samples[0]
                hung = now - t_old >= idle_timeout and cpu - cpu_old < 0.02 * (now - t_old)
            if hung or (timeout is not None and now - start > timeout):
                timed_out = True
                os.killpg(proc.pid, 9)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
            "returncode": proc.returncode,
            "timed_out": timed_out,
            "hung": hung,
            "wall_seconds": wall,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
        }


def last_json(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON line in output:\n{text[-2000:]}")


class WorkerHung(RuntimeError):
    """A helper process stopped using CPU time without finishing."""


def worker(mode: str, *args: str, timeout=None, idle_timeout=None) -> dict:
    """Run the entry script in helper mode ``mode`` in a fresh process; its JSON result plus wall and RSS."""
    res = run_measured([sys.executable, "-m", ENTRY, "--worker", mode, *args], timeout=timeout,
                       idle_timeout=idle_timeout)
    if res["hung"]:
        raise WorkerHung(f"worker {mode} {args} used under 2% of a core for {idle_timeout} s "
                         f"(after {res['wall_seconds']:.0f} s)")
    if res["returncode"] != 0 or res["timed_out"]:
        raise RuntimeError(f"worker {mode} {args} failed (rc={res['returncode']}, timed out={res['timed_out']}):"
                           f"\n{res['stderr'][-3000:]}")
    out = last_json(res["stdout"])
    out["process_wall_seconds"] = res["wall_seconds"]
    out["process_peak_rss_gb"] = res["peak_rss_gb"]
    return out


def r_available() -> bool:
    """Whether ``Rscript`` is on the path and has lme4."""
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(["Rscript", "-e", 'quit(status = as.integer(!requireNamespace("lme4", quietly = TRUE)))'],
                           capture_output=True)
    return probe.returncode == 0


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Print ``msg`` after the seconds since this module was imported."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", flush=True)


def time_call(fn, *args, repeats: int = 5) -> float:
    """Median seconds of ``fn(*args)`` after one compiling call (``fn`` jitted, arrays passed as arguments)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine_info(with_r: bool) -> dict:
    """CPU, cores, memory, platform and the versions of Python, JAX and the compared packages; R's and
    lme4's too with ``with_r``."""
    import jax
    import jaxlib

    import lmevi  # noqa: F401 - before JAX's backend starts, so that lmevi's XLA settings apply in this process

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "numpy": np.__version__,
    }
    for pkg in ("numpyro", "mixedlm", "lmevi"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - an absent optional package is reported, not fatal
            info[pkg] = None
    info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS")  # as importing lmevi left it
    info["R"] = info["lme4"] = None
    if with_r:
        r = subprocess.run(["Rscript", "-e", 'cat(R.version.string, "|", as.character(packageVersion("lme4")))'],
                           capture_output=True, text=True)
        if r.returncode == 0 and "|" in r.stdout:
            info["R"], info["lme4"] = (s.strip() for s in r.stdout.split("|", 1))
    return info
