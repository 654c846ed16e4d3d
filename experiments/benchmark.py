"""Benchmark: time to lme4 accuracy on InstEval, and scaling in the number of rows.

Part 1, InstEval (73,421 rows), model ``y ~ service + (1|s) + (1|d) + (1|dept)``, all timed on this machine:

* lme4 ``lmer(REML = TRUE)`` through ``experiments/lme4_timing.R`` (or, without R, the saved
  ``fit_seconds`` of ``results/lme4/insteval/fit_reml.json``, marked ``"lme4_source": "saved"``);
* lmevi's recommended configuration, ``lmevi.fit(formula, df)`` (structured q, REML-like, coordinate
  ascent on the closed-form ELBO): wall time of the whole ``fit`` call run for the fewest steps that reach
  student correlation >= 0.999 and instructor correlation >= 0.99 with lme4's REML conditional modes
  (joined by level label), and of the default converged fit; warm (the same shapes already compiled) and
  cold (first call in a fresh Python process, JIT compilation included); float64 and float32;
* lmevi with the Edward tutorial's configuration (mean-field q, ML-like, Monte Carlo KLqp, Adam,
  sigma fixed at 1): time per step and time to the same accuracy, or its accuracy after lme4's wall time;
* mixedlm (PyPI ``mixedlm``, Rust backend) ``lmer(REML=True)``, checked against lme4;
* NumPyro SVI with ``AutoNormal`` on the same model, run in its own process in NumPyro's default
  single precision: time to the same accuracy, or its accuracy when a wall-time cap runs out.

Every timing is repeated ``--repeats`` times and reported as median, min and max.

Part 2, scaling: simulated crossed data shaped like InstEval (students ~ n/25, instructors ~ n/65,
14 departments with instructors nearly nested in them, a binary ``service``; SDs 0.33, 0.51, 0.08,
residual 1.18) at ``--sizes`` rows. Each size runs in a fresh process (so its peak RSS is its own):
time of the recommended fit (first call, then warm), time per coordinate-ascent sweep and per
closed-form ELBO-and-gradient evaluation; lme4 on the sizes it finishes within ``--lme4-timeout``.
A profile of one sweep's pieces at ``--profile-size`` rows says what limits the speed.

Writes to ``--out`` (default ``results/benchmark/``): ``benchmark.json``, ``insteval.csv``,
``targets.csv``, ``scaling.csv``, ``profile.csv``, ``scaling.png`` and ``benchmark.md``.

    python experiments/benchmark.py                 # full run, about half an hour
    python experiments/benchmark.py --quick --out /tmp/bench   # smoke run, under a minute

The quick run uses InstEval with the saved lme4 time, float64 only, one repeat, no mixedlm or NumPyro,
and simulated sizes 1e3 and 1e4; its numbers only check the code path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import jax
import matplotlib

# the profile and scaling parts call lmevi's internals directly, outside the 64-bit scope of lmevi.fit
jax.config.update("jax_enable_x64", True)
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"
LME4_DIR = ROOT / "results" / "lme4" / "insteval"
LME4_TIMING = ROOT / "experiments" / "lme4_timing.R"
FACTORS = ("s", "d", "dept")
# accuracy target: Pearson correlation of conditional modes with lme4's REML ones, per grouping factor
TARGET = {"s": 0.999, "d": 0.99}
# speed targets: (label, key in the InstEval summary, minimum ratio)
SPEED_TARGETS = (
    ("warm >= 20x faster than lme4", "speedup_vs_lme4", 20.0),
    ("cold >= 3x faster than lme4", "speedup_cold_vs_lme4", 3.0),
    ("warm >= 5x faster than mixedlm", "speedup_vs_mixedlm", 5.0),
    ("warm >= 5x faster than NumPyro", "speedup_vs_numpyro", 5.0),
)
SIM_SD = {"s": 0.33, "d": 0.51, "dept": 0.08, "residual": 1.18}
SIM_BETA = (3.2, -0.08)


# ----------------------------------------------------------------------------------------------------
# small helpers


def spread(times) -> dict:
    """Median, min, max and count of a list of seconds (``None`` entries dropped)."""
    t = np.asarray([x for x in times if x is not None], dtype=float)
    if t.size == 0:
        return {"median": None, "min": None, "max": None, "n": 0, "all": []}
    return {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max()), "n": int(t.size),
            "all": [round(float(x), 6) for x in t]}


def _med(sp: dict | None):
    return None if not sp else sp.get("median")


def ratio(a, b):
    return None if a is None or b is None or b <= 0 else float(a) / float(b)


def lme4_ranef() -> pd.DataFrame:
    """lme4's REML conditional modes, ``grpvar, term, grp, condval, condsd``; labels kept as strings."""
    return pd.read_csv(LME4_DIR / "ranef_reml.csv", dtype={"grpvar": str, "term": str, "grp": str})


def accuracy(ranef: pd.DataFrame, ref: pd.DataFrame) -> dict:
    """Correlation with lme4 per grouping factor, joined on ``grpvar, term, grp`` (level labels)."""
    both = ranef.merge(ref, on=["grpvar", "term", "grp"], suffixes=("", "_lme4"), validate="one_to_one")
    out = {}
    for g in FACTORS:
        x = both[both["grpvar"] == g]
        out[g] = float(np.corrcoef(x["condval"], x["condval_lme4"])[0, 1]) if len(x) > 1 else float("nan")
    return out


def meets(acc: dict) -> bool:
    return all(acc.get(g, float("nan")) >= thr for g, thr in TARGET.items())


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
    """Run this script in helper mode ``mode`` in a fresh process; its JSON result plus wall and RSS."""
    res = run_measured([sys.executable, str(SCRIPT), "--worker", mode, *args], timeout=timeout,
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
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(["Rscript", "-e", 'quit(status = as.integer(!requireNamespace("lme4", quietly = TRUE)))'],
                           capture_output=True)
    return probe.returncode == 0


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# machine


def machine_info(with_r: bool) -> dict:
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


# ----------------------------------------------------------------------------------------------------
# Part 1: InstEval


def time_lme4_insteval(repeats: int, with_r: bool) -> dict:
    saved = json.loads((LME4_DIR / "fit_reml.json").read_text())
    if not with_r:
        log("R with lme4 is missing: using the saved lme4 fit time of results/lme4/insteval/fit_reml.json")
        return {"lme4_source": "saved", "seconds": spread([saved["fit_seconds"]]), "lme4_version": saved["lme4_version"],
                "R_version": saved["R_version"]}
    log(f"lme4: {repeats} timed lmer fits on InstEval ...")
    res = run_measured(["Rscript", str(LME4_TIMING), "--repeats", str(repeats)])
    if res["returncode"] != 0:
        raise RuntimeError(f"lme4_timing.R failed:\n{res['stderr'][-3000:]}")
    out = last_json(res["stdout"])
    log(f"  lme4 seconds: {out['seconds']}")
    return {"lme4_source": "measured", "seconds": spread(out["seconds"]), "lme4_version": out.get("lme4_version"),
            "R_version": out.get("R_version"), "blas": out.get("blas"), "logLik": out.get("logLik"),
            "peak_rss_gb": res["peak_rss_gb"]}


def steps_to_target(df, ref, dtype: str, max_steps: int, **kw) -> tuple[int | None, list[dict]]:
    """Smallest step count whose fit meets the accuracy target (one run with a snapshot after every step)."""
    import lmevi

    snaps = tuple(range(1, max_steps + 1))
    m = lmevi.fit(FORMULA, df, num_steps=max_steps, tol=0.0, dtype=dtype, snapshot_steps=snaps, progress=False, **kw)
    trace = []
    for t in snaps:
        acc = accuracy(m.at_step(t).ranef(), ref)
        trace.append({"step": t, **acc})
        if meets(acc):
            return t, trace
    return None, trace


def time_fit(df, repeats: int, **kw) -> tuple[dict, object]:
    """Warm wall time of ``lmevi.fit(FORMULA, df, **kw)``: one untimed call compiles, then ``repeats`` timed."""
    import lmevi

    m = lmevi.fit(FORMULA, df, progress=False, **kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = lmevi.fit(FORMULA, df, progress=False, **kw)
        times.append(time.perf_counter() - t0)
    return spread(times), m


def time_ours(df, ref, repeats: int, cold_repeats: int, quick: bool) -> dict:
    """The recommended configuration, warm and cold, in float64 and (full run) float32.

    A step of the default fit is one SQUAREM iteration of coordinate ascent (three sweeps).
    """
    out = {}
    for dtype in ("float64",) if quick else ("float64", "float32"):
        k, trace = steps_to_target(df, ref, dtype, max_steps=10 if quick else 40)
        if k is None:
            raise RuntimeError(f"lmevi ({dtype}) did not reach the accuracy target: {trace[-1]}")
        warm, m = time_fit(df, repeats, num_steps=k, tol=0.0, dtype=dtype)
        acc = accuracy(m.ranef(), ref)
        log(f"  lmevi {dtype}: {k} steps reach the target {fmt_acc(acc)}; warm {warm['median']:.3f} s")
        cold = [worker("cold", "--dtype", dtype, "--num-steps", str(k)) for _ in range(cold_repeats)]
        log(f"    cold (fresh process, compile included): {[round(c['fit_seconds'], 3) for c in cold]}")
        res = {
            "steps_to_target": k,
            "accuracy_trace": trace,
            "accuracy_at_target": acc,
            "warm_seconds": warm,
            "cold_seconds": spread([c["fit_seconds"] for c in cold]),
            "cold_process_seconds": spread([c["process_wall_seconds"] for c in cold]),
            "cold_import_seconds": spread([c["import_seconds"] for c in cold]),
        }
        if not quick:
            conv, mc = time_fit(df, repeats, dtype=dtype)
            cold_conv = [worker("cold", "--dtype", dtype, "--num-steps", "0") for _ in range(cold_repeats)]
            res.update(converged_steps=mc.steps, converged_accuracy=accuracy(mc.ranef(), ref),
                       converged_warm_seconds=conv,
                       converged_cold_seconds=spread([c["fit_seconds"] for c in cold_conv]))
            log(f"    converged ({mc.steps} steps): warm {conv['median']:.3f} s, "
                f"cold {res['converged_cold_seconds']['median']:.3f} s")
        out[dtype] = res
    return out


def time_family_cost(df, repeats: int) -> dict:
    """Structured against mean-field q, both ML-like (``reml=False``), warm: per sweep (ten plain sweeps,
    no acceleration) and converged with the defaults (coordinate ascent with SQUAREM)."""
    out = {}
    for family in ("structured", "meanfield"):
        ten, _ = time_fit(df, repeats, family=family, reml=False, num_steps=10, tol=0.0, accelerate=False)
        conv, m = time_fit(df, repeats, family=family, reml=False)
        out[family] = {"seconds_per_sweep": spread([t / 10 for t in ten["all"]]), "converged_seconds": conv,
                       "converged_steps": m.steps, "sd_dept": float(m.sd()["dept"])}
        log(f"  {family}: {out[family]['seconds_per_sweep']['median'] * 1e3:.1f} ms per sweep, converged in "
            f"{m.steps} steps, {conv['median']:.3f} s")
    for key in ("seconds_per_sweep", "converged_seconds"):
        out[f"structured_over_meanfield_{key}"] = out["structured"][key]["median"] / out["meanfield"][key]["median"]
    return out


def tutorial_kwargs():
    import lmevi

    return dict(family="meanfield", reml=False, elbo="mc", optimizer=lmevi.edward_adam(), residual_scale=1.0,
                num_samples=1)


def time_tutorial(df, ref, repeats: int, lme4_seconds: float, quick: bool) -> dict:
    """Edward tutorial configuration: per-step time, then accuracy along one long run."""
    import lmevi

    kw = tutorial_kwargs()
    probe = 50 if quick else 200
    snaps = (25, 50) if quick else ()
    lmevi.fit(FORMULA, df, num_steps=probe, tol=0.0, snapshot_steps=snaps, progress=False, **kw)
    per_step = []
    for _ in range(repeats):
        m = lmevi.fit(FORMULA, df, num_steps=probe, tol=0.0, snapshot_steps=snaps, progress=False, **kw)
        per_step.append(m.run.seconds / m.steps)
    per = spread(per_step)
    log(f"  tutorial configuration: {per['median'] * 1e3:.2f} ms per step")
    steps_lme4 = max(1, int(round(lme4_seconds / per["median"])))
    if quick:
        budget, grid = probe, list(snaps)
    else:
        budget = min(max(steps_lme4, 5000), 20000)
        grid = sorted({s for s in (100, 200, 500, 1000, 2000, 3000, 5000, 7500, 10000, 15000, 20000)
                       if s <= budget} | ({steps_lme4} if steps_lme4 <= budget else set()))
        m = lmevi.fit(FORMULA, df, num_steps=budget, tol=0.0, snapshot_steps=tuple(grid), progress=False, **kw)
    trace = [{"step": s, **accuracy(m.at_step(s).ranef(), ref)} for s in grid]
    hit = next((r["step"] for r in trace if meets(r)), None)
    at_lme4 = next((r for r in trace if r["step"] == steps_lme4), None)
    out = {
        "seconds_per_step": per,
        "accuracy_trace": trace,
        "steps_to_target": hit,
        "steps_in_lme4_time": steps_lme4,
        "accuracy_at_lme4_time": at_lme4,
        "run_steps": budget,
    }
    if hit is not None:
        out["seconds_to_target"], _ = time_fit(df, max(1, min(repeats, 3)), num_steps=hit, tol=0.0, **kw)
    log(f"  tutorial: target {'reached at step ' + str(hit) if hit else 'not reached'} in {budget} steps; "
        f"accuracy at lme4's wall time ({steps_lme4} steps): {at_lme4}")
    return out


def time_mixedlm(df, ref, repeats: int) -> dict | None:
    try:
        import mixedlm
    except ImportError:
        log("mixedlm is not installed (pip install -r requirements-benchmark.txt): skipping it")
        return None
    data = df[["y", "service", "s", "d", "dept"]].copy()
    t0 = time.perf_counter()
    r = mixedlm.lmer(FORMULA, data, REML=True)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = mixedlm.lmer(FORMULA, data, REML=True)
        times.append(time.perf_counter() - t0)
    values = r.ranef()
    frames = []
    for st in r.matrices.random_structures:
        labels = [None] * st.n_levels
        for label, code in st.level_map.items():
            labels[code] = str(label)
        for term in st.term_names:
            frames.append(pd.DataFrame({"grpvar": st.grouping_factor, "term": term, "grp": labels,
                                        "condval": np.asarray(values[st.grouping_factor][term])}))
    acc = accuracy(pd.concat(frames, ignore_index=True), ref)
    saved = json.loads((LME4_DIR / "fit_reml.json").read_text())
    theta_lme4 = [saved["theta"][f"{g}.(Intercept)"] for g in FACTORS]
    out = {
        "version": mixedlm.__version__,
        "seconds": spread(times),
        "first_call_seconds": first,
        "accuracy": acc,
        "theta": [float(x) for x in np.asarray(r.theta)],
        "theta_lme4": theta_lme4,
        "sigma": float(r.sigma),
        "sigma_lme4": saved["sigma"],
        "converged": bool(r.converged),
    }
    log(f"  mixedlm: {out['seconds']['median']:.3f} s; correlation with lme4 {acc}")
    return out


def time_numpyro(df, repeats: int, cap: float, lme4_seconds: float, chunk: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "insteval.npz"
        arrays = {"y": df["y"].to_numpy(np.float32), "service": df["service"].to_numpy(np.float32)}
        for g in FACTORS:
            arrays[g] = df[g].cat.codes.to_numpy(np.int32)
            arrays[g + "_levels"] = np.asarray(df[g].cat.categories, dtype=str)
        np.savez(path, **arrays)
        out = worker("numpyro", "--data", str(path), "--cap", str(cap), "--repeats", str(repeats),
                     "--chunk", str(chunk), "--lme4-seconds", str(lme4_seconds), "--seed", str(seed))
    log(f"  NumPyro: target {'reached' if out['reached'] else 'not reached'}; "
        f"seconds {out['seconds']['median']:.2f}; final accuracy {out['final_accuracy']}")
    return out


def insteval_part(args, with_r: bool) -> dict:
    import lmevi

    warnings.simplefilter("ignore", lmevi.ConvergenceWarning)
    # the mean-field fits of the family comparison drain the departments' variance, as expected
    warnings.filterwarnings("ignore", message="boundary \\(singular\\) fit")
    df = lmevi.load_insteval()
    ref = lme4_ranef()
    lme4 = time_lme4_insteval(args.repeats, with_r and not args.quick)
    lme4_s = lme4["seconds"]["median"]
    log("lmevi, recommended configuration ...")
    ours = time_ours(df, ref, args.repeats, args.cold_repeats, args.quick)
    log("lmevi, tutorial configuration ...")
    tutorial = time_tutorial(df, ref, args.repeats, lme4_s, args.quick)
    log("lmevi, structured against mean-field q ...")
    family_cost = None if args.quick else time_family_cost(df, args.repeats)
    mixed = None if args.quick else time_mixedlm(df, ref, args.repeats)
    if args.quick:
        log("NumPyro: skipped in the quick run (its one-time setup alone takes about 20 s)")
        npy = None
    else:
        log("NumPyro SVI (AutoNormal) ...")
        npy = time_numpyro(df, args.repeats, args.numpyro_cap, lme4_s, args.numpyro_chunk, args.seed)

    warm = ours["float64"]["warm_seconds"]["median"]
    cold = ours["float64"]["cold_seconds"]["median"]
    mixed_s = None if mixed is None else mixed["seconds"]["median"]
    npy_s = None if npy is None else npy["seconds"]["median"]
    summary = {
        "n_obs": len(df),
        "quick": bool(args.quick),
        "formula": FORMULA,
        "accuracy_target": TARGET,
        "ours": "lmevi.fit defaults (structured q, reml=True, cavi, closed-form ELBO), float64, "
                "run for the fewest steps (SQUAREM iterations) that reach the accuracy target",
        "lme4_source": lme4["lme4_source"],
        "lme4_seconds": lme4_s,
        "ours_warm_seconds": warm,
        "ours_cold_seconds": cold,
        "ours_steps_to_target": ours["float64"]["steps_to_target"],
        "ours_float32_warm_seconds": _med(ours.get("float32", {}).get("warm_seconds")),
        "ours_float32_cold_seconds": _med(ours.get("float32", {}).get("cold_seconds")),
        "ours_converged_warm_seconds": _med(ours["float64"].get("converged_warm_seconds")),
        "ours_converged_cold_seconds": _med(ours["float64"].get("converged_cold_seconds")),
        "tutorial_seconds_per_step": tutorial["seconds_per_step"]["median"],
        "tutorial_seconds_to_target": (tutorial.get("seconds_to_target") or {}).get("median"),
        "mixedlm_seconds": mixed_s,
        "numpyro_seconds": npy_s,
        "numpyro_reached_target": None if npy is None else npy["reached"],
        "structured_over_meanfield_seconds": (family_cost or {}).get("structured_over_meanfield_converged_seconds"),
        "structured_over_meanfield_per_sweep": (family_cost or {}).get("structured_over_meanfield_seconds_per_sweep"),
        "speedup_vs_lme4": ratio(lme4_s, warm),
        "speedup_cold_vs_lme4": ratio(lme4_s, cold),
        "speedup_vs_mixedlm": ratio(mixed_s, warm),
        # when NumPyro never reaches the target, its time is the cap: the ratio is a lower bound
        "speedup_vs_numpyro": ratio(npy_s, warm),
        "speedup_vs_numpyro_is_lower_bound": npy is not None and not npy["reached"],
        "lme4": lme4,
        "lmevi": ours,
        "tutorial": tutorial,
        "family_cost": family_cost,
        "mixedlm": mixed,
        "numpyro": npy,
    }
    return summary


# ----------------------------------------------------------------------------------------------------
# Part 2: scaling


def simulate(n_obs: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """Crossed data shaped like InstEval; returns the frame and the simulated effects.

    Students ``n/25`` and instructors ``n/65`` levels (at least 10 and 5), 14 departments; every instructor
    has a home department, and 95% of an instructor's rows are in it. ``service`` is Bernoulli(0.4).
    """
    rng = np.random.default_rng(seed)
    n_s, n_d, n_dept = max(10, n_obs // 25), max(5, n_obs // 65), 14
    s = rng.integers(0, n_s, n_obs, dtype=np.int32)
    d = rng.integers(0, n_d, n_obs, dtype=np.int32)
    home = rng.integers(0, n_dept, n_d, dtype=np.int32)
    away = rng.random(n_obs) < 0.05
    dept = np.where(away, rng.integers(0, n_dept, n_obs, dtype=np.int32), home[d]).astype(np.int32)
    service = (rng.random(n_obs) < 0.4).astype(np.int64)
    b = {"s": rng.normal(0, SIM_SD["s"], n_s), "d": rng.normal(0, SIM_SD["d"], n_d),
         "dept": rng.normal(0, SIM_SD["dept"], n_dept)}
    y = (SIM_BETA[0] + SIM_BETA[1] * service + b["s"][s] + b["d"][d] + b["dept"][dept]
         + rng.normal(0, SIM_SD["residual"], n_obs))

    def factor(codes, n):
        return pd.Categorical.from_codes(codes, categories=[str(i) for i in range(n)])

    df = pd.DataFrame({"y": y, "service": service, "s": factor(s, n_s), "d": factor(d, n_d),
                       "dept": factor(dept, n_dept)})
    return df, b


def scaling_part(args, with_r: bool, tmpdir: Path) -> list[dict]:
    rows = []
    lme4_stopped = False
    lme4_done: list[tuple[int, float]] = []
    for n in args.sizes:
        csv = tmpdir / f"sim_{n}.csv"
        predicted = predict_lme4(lme4_done, n)
        too_slow = predicted is not None and predicted > 2 * args.lme4_timeout
        want_r = with_r and not args.quick and not lme4_stopped and n <= args.lme4_max_rows and not too_slow
        log(f"scaling: {n:,} rows ...")
        wargs = ["--n-obs", str(n), "--seed", str(args.seed), "--repeats", str(args.repeats)]
        if want_r:
            wargs += ["--csv", str(csv)]
        row_note = "all cores"
        try:
            if args.quick:  # in this process: the quick run checks the code path, not the memory of one size
                res = worker_scale(argparse.Namespace(n_obs=n, seed=args.seed, repeats=args.repeats, csv=None))
            else:
                res = worker("scale", *wargs, idle_timeout=args.idle_timeout)
        except WorkerHung as err:
            # should XLA's CPU runtime deadlock (the process then sleeps on its locks for good; see lmevi's
            # module docstring for the scheduler setting that avoided it here), try again on one core
            log(f"  {err}: running this size again on one core")
            res = worker("scale", *wargs, "--one-core", idle_timeout=args.idle_timeout)
            row_note = "one core (on all cores the XLA CPU runtime deadlocked)"
        row = scale_row(res)
        row["cores_used"] = row_note
        row["accuracy_vs_truth"] = res["accuracy_vs_truth"]
        row["lme4_seconds"] = row["lme4_peak_rss_gb"] = None
        row["lme4_status"] = "not run"
        if want_r:
            reps = args.repeats if n <= 10_000 else 1
            r = run_measured(["Rscript", str(LME4_TIMING), "--repeats", str(reps), "--csv", str(csv)],
                             timeout=args.lme4_timeout, mem_limit_gb=args.lme4_mem_gb)
            if r["timed_out"]:
                row["lme4_status"] = f"timed out after {args.lme4_timeout:.0f} s"
                lme4_stopped = True
            elif r["returncode"] != 0:
                row["lme4_status"] = "failed: " + r["stderr"].strip().splitlines()[-1][:200]
                lme4_stopped = True
            else:
                secs = last_json(r["stdout"])["seconds"]
                row["lme4_seconds"] = float(np.median(secs))
                row["lme4_seconds_all"] = secs
                row["lme4_peak_rss_gb"] = r["peak_rss_gb"]
                row["lme4_status"] = "ok"
                lme4_done.append((n, row["lme4_seconds"]))
            log(f"  lme4: {row['lme4_status']} {row['lme4_seconds']}")
        elif with_r and not args.quick and too_slow and not lme4_stopped:
            row["lme4_status"] = (f"skipped: at the growth seen so far it would take about {predicted / 60:.0f} min, "
                                  f"over twice the {args.lme4_timeout:.0f} s limit")
            row["lme4_predicted_seconds"] = predicted
            lme4_stopped = True
        elif with_r and not args.quick and n > args.lme4_max_rows:
            row["lme4_status"] = f"skipped (over --lme4-max-rows {args.lme4_max_rows:,})"
        elif lme4_stopped:
            row["lme4_status"] = "skipped (a smaller size did not finish)"
        csv.unlink(missing_ok=True)
        rows.append(row)
    return rows


def scale_row(res: dict) -> dict:
    """The flat entries of a ``scale`` worker's result, with its peak RSS, logged in one line."""
    row = {k: v for k, v in res.items() if not isinstance(v, (dict, list))}
    # peak resident memory of the fitting process up to the end of its fits (the later micro-benchmarks
    # of the ELBO gradient hold extra buffers; their peak is process_peak_rss_gb)
    row["peak_rss_gb"] = res["peak_rss_gb_after_fits"]
    log(f"  fit {row['fit_seconds']:.3g} s warm / {row['fit_seconds_first_call']:.3g} s first call, "
        f"{row['steps']} steps, sweep {row['seconds_per_sweep'] * 1e3:.3g} ms, "
        f"ELBO+grad {row['seconds_per_eval'] * 1e3:.3g} ms, peak RSS {row['peak_rss_gb']:.2f} GB")
    return row


def predict_lme4(done: list[tuple[int, float]], n: int) -> float | None:
    """lme4's time at ``n`` rows extrapolated from the last two sizes it finished (growth exponent at least 1)."""
    if len(done) < 2:
        return None
    (n0, t0), (n1, t1) = done[-2], done[-1]
    exponent = max(1.0, float(np.log(t1 / t0) / np.log(n1 / n0)))
    return t1 * (n / n1) ** exponent


def slope(rows, key, lo, hi):
    pts = [(r["n_obs"], r[key]) for r in rows if r.get(key) and lo <= r["n_obs"] <= hi]
    if len(pts) < 2:
        return None
    x, y = np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def plot_scaling(rows, slopes, path: Path, lo: int, hi: int) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    series = [("fit_seconds", "lmevi fit (warm)", "o-"), ("fit_seconds_first_call", "lmevi fit (first call)", "o--"),
              ("seconds_per_sweep", "one CAVI sweep", "s-"), ("seconds_per_eval", "ELBO + gradient", "^-"),
              ("lme4_seconds", "lme4 lmer (REML)", "D-")]
    for key, label, style in series:
        pts = [(r["n_obs"], r[key]) for r in rows if r.get(key)]
        if pts:
            s = slopes.get(key)
            ax.plot(*zip(*pts), style, label=label + (f"  (slope {s:.2f})" if s is not None else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows")
    ax.set_ylabel("seconds")
    ax.set_title(f"y ~ service + (1|s) + (1|d) + (1|dept), simulated\nslopes fitted from {lo:,} to {hi:,} rows")
    ax.grid(True, which="both", alpha=0.3)
    s = slopes.get("fit_seconds")
    if s is not None:
        ax.text(0.98, 0.03, f"lmevi fit: time ~ rows^{s:.2f}", transform=ax.transAxes, ha="right", va="bottom")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# profile of one sweep


def profile_part(args) -> dict:
    log(f"profile of one sweep at {args.profile_size:,} rows ...")
    if args.quick:  # in this process: the quick run checks the code path, not the memory of one size
        return worker_profile(argparse.Namespace(n_obs=args.profile_size, seed=args.seed, repeats=1, light=True))
    return worker("profile", "--n-obs", str(args.profile_size), "--seed", str(args.seed),
                  "--repeats", str(max(args.repeats, 5)), *(["--light"] if args.quick else []))


# ----------------------------------------------------------------------------------------------------
# report


def targets_table(ins: dict, rows: list[dict], slopes: dict) -> list[dict]:
    out = []
    for label, key, need in SPEED_TARGETS:
        v = ins.get(key)
        bound = key == "speedup_vs_numpyro" and ins.get("speedup_vs_numpyro_is_lower_bound")
        status = "not measured" if v is None else ("pass" if v >= need else "not yet")
        out.append({"target": label, "value": v, "lower_bound": bool(bound), "status": status})
    s = slopes.get("fit_seconds")
    lo, hi = slopes.get("range", (100_000, 10_000_000))
    out.append({"target": f"fit time ~ rows^slope, 0.9 <= slope <= 1.1 ({lo:,} to {hi:,} rows)", "value": s,
                "lower_bound": False, "status": "not measured" if s is None else
                ("pass" if 0.9 <= s <= 1.1 else "not yet")})
    big = next((r for r in rows if r["n_obs"] == 10_000_000), None)
    for label, key, need in (("1e7 rows fit in < 2 min (first call)", "fit_seconds_first_call", 120.0),
                             ("1e7 rows peak memory < 8 GB", "peak_rss_gb", 8.0)):
        v = None if big is None else big[key]
        out.append({"target": label, "value": v, "lower_bound": False,
                    "status": "not measured" if v is None else ("pass" if v < need else "not yet")})
    return out


def fmt_s(sp: dict | None) -> str:
    if not sp or sp.get("median") is None:
        return "n/a"
    return f"{sp['median']:.3g} [{sp['min']:.3g}, {sp['max']:.3g}]"


def fmt_acc(acc: dict | None) -> str:
    if not acc:
        return ""
    return ", ".join(f"{g} {acc[g]:.4f}" for g in FACTORS if g in acc)


def insteval_rows(ins: dict) -> list[dict]:
    """The InstEval timing table: one row per method and configuration."""
    warm = ins["ours_warm_seconds"]
    rows = []

    def add(method, config, sp, acc, note=""):
        med = None if not sp else sp.get("median")
        rows.append({"method": method, "configuration": config,
                     "median_s": med, "min_s": None if not sp else sp.get("min"),
                     "max_s": None if not sp else sp.get("max"), "repeats": 0 if not sp else sp.get("n"),
                     "ratio_to_ours": ratio(med, warm), "accuracy": fmt_acc(acc), "note": note})

    lme4 = ins["lme4"]
    add("lme4", f"lmer REML ({ins['lme4_source']})", lme4["seconds"], {g: 1.0 for g in FACTORS},
        "reference" + (", saved time: R missing" if ins["lme4_source"] == "saved" else ""))
    for dtype, o in ins["lmevi"].items():
        k = o["steps_to_target"]
        add("lmevi", f"recommended, {dtype}, {k} steps, warm", o["warm_seconds"], o["accuracy_at_target"],
            "ours" if dtype == "float64" else "")
        add("lmevi", f"recommended, {dtype}, {k} steps, cold", o["cold_seconds"], o["accuracy_at_target"],
            "fresh process, JIT compilation included")
        if "converged_steps" in o:
            add("lmevi", f"recommended, {dtype}, converged ({o['converged_steps']} steps), warm",
                o["converged_warm_seconds"], o["converged_accuracy"], "default stop rule")
            add("lmevi", f"recommended, {dtype}, converged ({o['converged_steps']} steps), cold",
                o["converged_cold_seconds"], o["converged_accuracy"], "fresh process, JIT compilation included")
    fc = ins.get("family_cost")
    if fc:
        for family in ("structured", "meanfield"):
            add("lmevi", f"{family} q, ML-like, one plain sweep (warm)", fc[family]["seconds_per_sweep"], None,
                "cost of the family")
            add("lmevi", f"{family} q, ML-like, converged ({fc[family]['converged_steps']} steps, warm)",
                fc[family]["converged_seconds"], None, f"dept SD {fc[family]['sd_dept']:.3f}")
    t = ins["tutorial"]
    per = t["seconds_per_step"]
    add("lmevi", "tutorial (meanfield, ML, MC KLqp, Adam, sigma=1): per step", per, None)
    if t.get("seconds_to_target"):
        add("lmevi", f"tutorial: {t['steps_to_target']} steps to target", t["seconds_to_target"],
            next(r for r in t["accuracy_trace"] if r["step"] == t["steps_to_target"]))
    else:
        acc = t["accuracy_at_lme4_time"]
        est = {"median": per["median"] * t["steps_in_lme4_time"], "min": per["min"] * t["steps_in_lme4_time"],
               "max": per["max"] * t["steps_in_lme4_time"], "n": per["n"]}
        add("lmevi", f"tutorial: {t['steps_in_lme4_time']} steps (lme4's wall time)", est, acc,
            f"time = steps x time per step; target not reached in {t['run_steps']} steps")
    m = ins.get("mixedlm")
    if m:
        add("mixedlm", f"lmer REML (v{m['version']})", m["seconds"], m["accuracy"])
    else:
        add("mixedlm", "skipped", None, None, "skipped in the quick run" if ins.get("quick") else "not installed")
    n = ins["numpyro"]
    if not n:
        add("NumPyro", "skipped", None, None, "skipped in the quick run")
        return rows
    add("NumPyro", f"SVI AutoNormal, Adam {n['learning_rate']}, float32, {n['steps']} steps", n["seconds"],
        n["final_accuracy"], "to target" if n["reached"] else f"target not reached by the {n['cap']:.0f} s cap")
    return rows


def write_markdown(path: Path, ins, rows_t, targets, scal, slopes, prof, machine, quick):
    L = []
    L.append("### Time to lme4 accuracy on InstEval (73,421 rows)")
    L.append("")
    L.append(f"`{FORMULA}`; accuracy = correlation of conditional modes with lme4's REML fit, joined by level "
             f"label; target: students >= {TARGET['s']}, instructors >= {TARGET['d']}. Seconds are median "
             f"[min, max] over the repeats; ratio = method / ours (lmevi recommended, float64, warm)."
             + (" **Quick smoke run: not representative.**" if quick else ""))
    L.append("")
    L.append("| method | configuration | seconds | ratio | accuracy (s, d, dept) | note |")
    L.append("|---|---|---|---|---|---|")
    for r in rows_t:
        sp = None if r["median_s"] is None else {"median": r["median_s"], "min": r["min_s"], "max": r["max_s"]}
        rr = "" if r["ratio_to_ours"] is None else f"{r['ratio_to_ours']:.3g}"
        L.append(f"| {r['method']} | {r['configuration']} | {fmt_s(sp)} | {rr} | {r['accuracy']} | {r['note']} |")
    L.append("")
    L.append("| target | value | status |")
    L.append("|---|---|---|")
    for t in targets:
        v = "n/a" if t["value"] is None else (">= " if t["lower_bound"] else "") + f"{t['value']:.3g}"
        L.append(f"| {t['target']} | {v} | {t['status']} |")
    L.append("")
    L.append("### Scaling on simulated InstEval-shaped data")
    L.append("")
    L.append("| rows | students | instructors | steps | fit warm (s) | fit first call (s) | per sweep (ms) | "
             "ELBO+grad (ms) | peak RSS (GB) | lme4 (s) | cores |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in scal:
        lm = f"{r['lme4_seconds']:.3g}" if r["lme4_seconds"] else r["lme4_status"]
        L.append(f"| {r['n_obs']:,} | {r['n_students']:,} | {r['n_instructors']:,} | {r['steps']} | "
                 f"{r['fit_seconds']:.3g} | {r['fit_seconds_first_call']:.3g} | {r['seconds_per_sweep'] * 1e3:.3g} | "
                 f"{r['seconds_per_eval'] * 1e3:.3g} | {r['peak_rss_gb']:.2f} | {lm} | {r.get('cores_used', '')} |")
    L.append("")
    L.append("A step of the default fit is one SQUAREM iteration (three coordinate-ascent sweeps). Fit times are "
             "whole `lmevi.fit` calls (design, compiled loop, results); peak RSS is that of the fitting process "
             "up to the end of its fits.")
    L.append("")
    L.append("Log-log slopes of time against rows: " + ", ".join(
        f"{k} {v:.2f}" for k, v in slopes.items() if v is not None) + ". See `scaling.png`.")
    L.append("")
    L.append(f"### What limits speed now (one sweep at {prof['n_obs']:,} rows)")
    L.append("")
    L.append("| piece | ms per call | note |")
    L.append("|---|---|---|")
    for p in prof["pieces"]:
        L.append(f"| {p['piece']} | {p['ms']:.3g} | {p['note']} |")
    L.append("")
    L.append(prof["summary"])
    L.append("")
    L.append(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']:.0f} GB; "
             f"Python {machine['python']}, JAX {machine['jax']} (CPU); "
             f"R: {machine.get('R') or 'n/a'}, lme4 {machine.get('lme4') or 'n/a'}; "
             f"mixedlm {machine.get('mixedlm') or 'n/a'}; NumPyro {machine.get('numpyro')}.")
    path.write_text("\n".join(L) + "\n")


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmark", help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (no R, no mixedlm, short caps)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of every measurement")
    p.add_argument("--cold-repeats", type=int, default=None, help="fresh processes per cold timing (default --repeats)")
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                   default=[10_000, 100_000, 1_000_000, 10_000_000], help="comma-separated row counts, e.g. 1e4,1e5")
    p.add_argument("--seed", type=int, default=20240601, help="seed of the simulations and of NumPyro")
    p.add_argument("--numpyro-cap", type=float, default=120.0, help="seconds of SVI steps before giving up")
    p.add_argument("--numpyro-chunk", type=int, default=250, help="SVI steps between accuracy checks")
    p.add_argument("--lme4-timeout", type=float, default=600.0, help="seconds an lme4 scaling fit may take")
    p.add_argument("--lme4-max-rows", type=int, default=1_000_000, help="largest simulated size given to lme4")
    p.add_argument("--lme4-mem-gb", type=float, default=16.0, help="address-space cap of the R process")
    p.add_argument("--profile-size", type=int, default=1_000_000, help="rows of the sweep profile")
    p.add_argument("--skip-insteval", action="store_true", help=argparse.SUPPRESS)
    # helper modes, run in fresh processes by the main run
    p.add_argument("--worker", choices=["cold", "numpyro", "scale", "profile"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    p.add_argument("--num-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=250, help=argparse.SUPPRESS)
    p.add_argument("--lme4-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--n-obs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--csv", help=argparse.SUPPRESS)
    p.add_argument("--light", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="a scaling process that used under 2%% of a core for this many seconds counts as hung")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.sizes = [1_000, 10_000] if args.sizes == p.get_default("sizes") else args.sizes
        args.numpyro_cap = min(args.numpyro_cap, 2.0)
        args.numpyro_chunk = min(args.numpyro_chunk, 100)
        args.profile_size = min(args.profile_size, 10_000)
    if args.cold_repeats is None:
        args.cold_repeats = args.repeats
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with_r = r_available() and not args.quick
    if not with_r and not args.quick:
        log("Rscript with lme4 not found: lme4 timings come from the saved InstEval fit, scaling runs without lme4")
    machine = machine_info(with_r)
    machine["load_average_at_start"] = list(os.getloadavg())
    ins = insteval_part(args, with_r)
    with tempfile.TemporaryDirectory() as tmp:
        scal = scaling_part(args, with_r, Path(tmp))
    lo, hi = (100_000, 10_000_000) if not args.quick else (min(args.sizes), max(args.sizes))
    slopes = {k: slope(scal, k, lo, hi) for k in
              ("fit_seconds", "fit_seconds_first_call", "seconds_per_sweep", "seconds_per_eval", "lme4_seconds")}
    plot_scaling(scal, slopes, out_dir / "scaling.png", lo, hi)
    prof = profile_part(args)
    rows_t = insteval_rows(ins)
    targets = targets_table(ins, scal, {**slopes, "range": (lo, hi)})
    pd.DataFrame(rows_t).to_csv(out_dir / "insteval.csv", index=False)
    pd.DataFrame(targets).to_csv(out_dir / "targets.csv", index=False)
    scal_cols = [k for k in scal[0] if k not in ("accuracy_vs_truth", "lme4_seconds_all")]
    pd.DataFrame([{k: r.get(k) for k in scal_cols} for r in scal]).to_csv(out_dir / "scaling.csv", index=False)
    pd.DataFrame(prof["pieces"]).to_csv(out_dir / "profile.csv", index=False)
    result = {
        "insteval": ins,
        "scaling": scal,
        "scaling_slopes": {"range": [lo, hi], **slopes},
        "profile": prof,
        "targets": targets,
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if not k.startswith("worker") and k not in ("dtype", "num_steps", "data", "cap", "chunk",
                                                                   "lme4_seconds", "n_obs", "csv")},
        "total_seconds": time.perf_counter() - start,
    }
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result = jsonable(result)
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out_dir / "benchmark.md", ins, rows_t, targets, scal, slopes, prof, machine, args.quick)
    log("")
    log(pd.DataFrame(rows_t)[["method", "configuration", "median_s", "min_s", "max_s", "ratio_to_ours",
                              "accuracy"]].to_string(index=False))
    log("")
    for t in targets:
        v = "n/a" if t["value"] is None else (">= " if t["lower_bound"] else "") + f"{t['value']:.3g}"
        log(f"  [{t['status']:>12}] {t['target']}: {v}")
    log(f"\nwrote {out_dir} in {result['total_seconds']:.0f} s")
    return result


# ----------------------------------------------------------------------------------------------------
# helper modes (each prints one JSON line)


def run_worker(args) -> None:
    if args.one_core and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX starts its thread pools
    fn = {"cold": worker_cold, "numpyro": worker_numpyro, "scale": worker_scale, "profile": worker_profile}
    out = fn[args.worker](args)
    print(json.dumps(jsonable(out)), flush=True)


def worker_cold(args) -> dict:
    """First ``lmevi.fit`` call in this process: import and data loading are timed apart from the fit."""
    t0 = time.perf_counter()
    import lmevi

    t_import = time.perf_counter() - t0
    warnings.simplefilter("ignore", lmevi.ConvergenceWarning)
    df = lmevi.load_insteval()
    kw = {} if args.num_steps == 0 else {"num_steps": args.num_steps, "tol": 0.0}
    t1 = time.perf_counter()
    m = lmevi.fit(FORMULA, df, dtype=args.dtype, progress=False, **kw)
    fit_s = time.perf_counter() - t1
    return {"fit_seconds": fit_s, "import_seconds": t_import, "steps": m.steps,
            "since_import_seconds": time.perf_counter() - t0}


def worker_numpyro(args) -> dict:
    """NumPyro SVI with AutoNormal, as its documentation writes a hierarchical model.

    Runs in NumPyro's default single precision (this process never imports lmevi, which switches JAX to
    64 bits). Hyperparameters get weakly informative priors and are sampled, so q covers them too; the
    guide starts at the prior medians (``init_to_median``). Adam's step size starts at 0.01 and decays
    tenfold every 8,000 steps (``numpyro.optim.Adam`` takes a schedule): with a constant 0.01 the student
    effects' correlation stalls near 0.992 under the noise of one-sample gradients, and a faster decay
    stalls the instructor effects below 0.99. Steps run in
    jitted chunks of ``--chunk`` ``svi.update`` calls; only the chunks (and ``svi.init``) are timed, the
    accuracy checks between them are not.
    """
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO, init_to_median
    from numpyro.infer.autoguide import AutoNormal

    data = np.load(args.data)
    s, d, dept = (jax.numpy.asarray(data[g]) for g in FACTORS)
    service, y = jax.numpy.asarray(data["service"]), jax.numpy.asarray(data["y"])
    levels = {g: [str(v) for v in data[g + "_levels"]] for g in FACTORS}
    n_s, n_d, n_dept = (len(levels[g]) for g in FACTORS)
    ref = lme4_ranef()

    def model(service, s, d, dept, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        beta = numpyro.sample("beta_service", dist.Normal(0.0, 1.0))
        sd_s = numpyro.sample("sd_s", dist.HalfNormal(1.0))
        sd_d = numpyro.sample("sd_d", dist.HalfNormal(1.0))
        sd_dept = numpyro.sample("sd_dept", dist.HalfNormal(1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with numpyro.plate("students", n_s):
            b_s = numpyro.sample("b_s", dist.Normal(0.0, sd_s))
        with numpyro.plate("instructors", n_d):
            b_d = numpyro.sample("b_d", dist.Normal(0.0, sd_d))
        with numpyro.plate("departments", n_dept):
            b_dept = numpyro.sample("b_dept", dist.Normal(0.0, sd_dept))
        eta = mu + beta * service + b_s[s] + b_d[d] + b_dept[dept]
        with numpyro.plate("obs", service.shape[0]):
            numpyro.sample("y", dist.Normal(eta, sigma), obs=y)

    from jax.example_libraries.optimizers import exponential_decay

    lr = "0.01 * 0.1**(step / 8000)"
    guide = AutoNormal(model, init_loc_fn=init_to_median)
    svi = SVI(model, guide, numpyro.optim.Adam(step_size=exponential_decay(0.01, 8000, 0.1)), Trace_ELBO())
    batch = (service, s, d, dept, y)

    @partial(jax.jit, static_argnums=2)
    def run_chunk(state, batch, n):
        return jax.lax.fori_loop(0, n, lambda i, st: svi.update(st, *batch)[0], state)

    def acc_of(state):
        med = guide.median(svi.get_params(state))
        frames = [pd.DataFrame({"grpvar": g, "term": "(Intercept)", "grp": levels[g],
                                "condval": np.asarray(med[site], dtype=float)})
                  for g, site in zip(FACTORS, ("b_s", "b_d", "b_dept"))]
        return accuracy(pd.concat(frames, ignore_index=True), ref)

    key = jax.random.PRNGKey(args.seed)
    jax.block_until_ready(run_chunk(svi.init(key, *batch), batch, args.chunk))  # compile
    runs, k_target = [], None
    for rep in range(args.repeats):
        elapsed, steps, trace = 0.0, 0, []
        t0 = time.perf_counter()
        state = svi.init(key, *batch)
        jax.block_until_ready(state)
        elapsed += time.perf_counter() - t0
        reached = False
        while True:
            t0 = time.perf_counter()
            state = jax.block_until_ready(run_chunk(state, batch, args.chunk))
            elapsed += time.perf_counter() - t0
            steps += args.chunk
            if k_target is None:
                acc = acc_of(state)
                trace.append({"step": steps, "seconds": elapsed, **acc})
                reached = meets(acc)
            else:
                reached = steps >= k_target
            if reached or elapsed >= args.cap:
                break
        runs.append({"seconds": elapsed, "steps": steps, "reached": reached, "trace": trace,
                     "accuracy": acc_of(state)})
        if not reached:  # the capped run is the measurement; repeating it would only spend the cap again
            break
        k_target = steps
    first = runs[0]
    at_lme4 = None
    if args.lme4_seconds > 0 and first["trace"]:
        before = [r for r in first["trace"] if r["seconds"] <= args.lme4_seconds]
        at_lme4 = before[-1] if before else None
    return {
        "reached": first["reached"],
        "steps": first["steps"],
        "seconds": spread([r["seconds"] for r in runs]),
        "seconds_per_step": spread([r["seconds"] / r["steps"] for r in runs]),
        "final_accuracy": first["accuracy"],
        "accuracy_trace": first["trace"],
        "accuracy_at_lme4_time": at_lme4,
        "cap": args.cap,
        "learning_rate": lr,
        "guide": "AutoNormal(init_loc_fn=init_to_median)",
        "precision": "float32",
        "numpyro": numpyro.__version__,
    }


def worker_scale(args) -> dict:
    """One simulated size: recommended fit (first call, warm), then per-sweep and ELBO+gradient timings."""
    import jax

    import lmevi
    from lmevi import cavi
    from lmevi import elbo as elbo_lib
    from lmevi import variational
    from lmevi.design import build_design
    from lmevi.formula import parse_formula

    df, truth = simulate(args.n_obs, args.seed)
    if args.csv:
        out = df.copy()
        for g in FACTORS:
            out[g] = out[g].cat.codes
        out.to_csv(args.csv, index=False)
        del out
    t0 = time.perf_counter()
    m = lmevi.fit(FORMULA, df, progress=False)
    first = time.perf_counter() - t0
    rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    fits = []
    for _ in range(args.repeats if args.n_obs < 10_000_000 else min(args.repeats, 2)):
        t0 = time.perf_counter()
        m = lmevi.fit(FORMULA, df, progress=False)
        fits.append(time.perf_counter() - t0)
    rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    re = m.ranef()
    acc = {}
    for g in FACTORS:
        est = re[re["grpvar"] == g]["condval"].to_numpy()
        acc[g] = float(np.corrcoef(est, truth[g])[0, 1])
    sd = m.sd()

    design, info = build_design(parse_formula(FORMULA), df, jax.numpy.float64)
    spec = variational.structured_spec(design, info, True)
    data_b = variational.block_data(design, spec)
    params = m.params
    # arrays go in as arguments: captured in a closure they would become constants of the compiled program
    sweep = jax.jit(cavi.sweep, static_argnums=(1, 4))
    value_and_grad = jax.jit(jax.value_and_grad(elbo_lib.closed_form), static_argnums=2)
    per_sweep = time_call(sweep, design, spec, params, data_b, True, repeats=max(5, args.repeats))
    per_eval = time_call(value_and_grad, params, design, spec, data_b, repeats=max(5, args.repeats))
    return {
        "n_obs": args.n_obs,
        "n_students": int(df["s"].cat.categories.size),
        "n_instructors": int(df["d"].cat.categories.size),
        "n_departments": int(df["dept"].cat.categories.size),
        "steps": m.steps,
        "converged": bool(m.converged),
        "fit_seconds": float(np.median(fits)),
        "fit_seconds_min": float(np.min(fits)),
        "fit_seconds_max": float(np.max(fits)),
        "fit_seconds_first_call": first,
        "loop_seconds": m.run.seconds,
        "seconds_per_sweep": per_sweep,
        "seconds_per_eval": per_eval,
        "peak_rss_gb_after_first_fit": rss_first,
        "peak_rss_gb_after_fits": rss_fit,
        "sd_s": float(sd["s"]), "sd_d": float(sd["d"]), "sd_dept": float(sd["dept"]),
        "sigma": float(sd["Residual"]),
        "accuracy_vs_truth": acc,
    }


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


def worker_profile(args) -> dict:
    """Time the pieces of one coordinate-ascent sweep, and alternatives for its passes over the rows.

    Pieces are timed as separately jitted functions at the fitted parameters (median of ``--repeats`` calls
    after a compiling one); inside the sweep XLA fuses some of them, so they need not add up to the sweep.
    """
    import jax
    import jax.numpy as jnp

    import lmevi
    from lmevi import cavi
    from lmevi import elbo as elbo_lib
    from lmevi import variational
    from lmevi.design import build_design
    from lmevi.formula import parse_formula

    warnings.simplefilter("ignore", lmevi.ConvergenceWarning)
    df, _ = simulate(args.n_obs, args.seed)
    reps = args.repeats
    m = lmevi.fit(FORMULA, df, progress=False)

    def setup(frame):
        design, info = build_design(parse_formula(FORMULA), frame, jnp.float64)
        spec = variational.structured_spec(design, info, True)
        return design, spec, variational.block_data(design, spec)

    design, spec, data_b = setup(df)
    params = m.params
    n, y = design.y.shape[0], design.y
    pieces = []

    def add(key, name, fn, *a, static=(), note=""):
        # arrays go in as arguments: captured in a closure they would become constants of the program
        ms = 1e3 * time_call(jax.jit(fn, static_argnums=static), *a, repeats=reps)
        pieces.append({"key": key, "piece": name, "ms": ms, "note": note})

    add("sweep", "one sweep (block updates + M-step)", cavi.sweep, design, spec, params, data_b, True,
        static=(1, 4))
    if not args.light:
        add("updates", "block updates", cavi.update_blocks, design, spec, params, data_b, static=(1,))
        add("mstep", "M-step (row moments, sigma, Sigma_k, ELBO)", cavi.m_step, design, spec, params, data_b, True,
            static=(1, 4))
        add("moments", "row moments (mean and variance of every row)",
            lambda d, p, b: variational.row_moments(d, spec, p.blocks, b), design, params, data_b)
        add("elbo", "closed-form ELBO", elbo_lib.closed_form, params, design, spec, data_b, static=(2,))
    for k, name in enumerate(FACTORS):
        term = design.terms[k]
        g, J = term.index, term.n_levels
        order = np.argsort(np.asarray(g), kind="stable")
        gs, ys = jnp.asarray(np.asarray(g)[order]), y[order]
        add(f"seg_{name}", f"segment_sum over {name} ({J:,} levels)",
            lambda r, g, J: jax.ops.segment_sum(r, g, J), y, g, J, static=(2,), note="rows in data order")
        add(f"segsorted_{name}", f"segment_sum over {name}, rows sorted, indices_are_sorted=True",
            lambda r, g, J: jax.ops.segment_sum(r, g, J, indices_are_sorted=True), ys, gs, J, static=(2,))
        add(f"bincount_{name}", f"jnp.bincount over {name}",
            lambda r, g, J: jnp.bincount(g, weights=r, length=J), y, g, J, static=(2,))
        add(f"gather_{name}", f"gather b[{name}] to the rows", lambda b, g: b[g],
            jnp.linspace(0.0, 1.0, J, dtype=y.dtype), g)
    dept = design.terms[2]
    onehot = jax.nn.one_hot(dept.index, dept.n_levels, dtype=y.dtype)
    add("onehot_dept", f"one-hot matmul over dept, (n_obs x {dept.n_levels})^T r", lambda oh, r: oh.T @ r, onehot, y,
        note="alternative to its segment_sum")
    # the sweep no longer builds the small block's one-hot design W (departments' indicators and X); its
    # products are timed here as the alternative that the gathers and segment sums replaced
    W = jnp.concatenate([onehot, design.X], axis=1)
    pw = W.shape[1]
    add("W_mean", f"W @ m_w, one-hot W ({n:,} x {pw})", lambda W, v: W @ v, W, jnp.ones(pw, y.dtype),
        note="former mean of the small block (departments and beta)")
    add("Wt_r", f"W^T r, one-hot W ({n:,} x {pw})", lambda W, r: W.T @ r, W, y,
        note="former right-hand side of the small block")
    add("W_var", f"row sums of squares of W @ U, U ({pw} x {pw})", lambda W, U: jnp.sum((W @ U) ** 2, axis=-1),
        W, jnp.eye(pw, dtype=y.dtype), note="former variance of the small block")
    add("stream", "one elementwise pass, sum((y - r)^2)", lambda y, r: jnp.sum((y - r) ** 2), y, y * 0.5,
        note="memory-bandwidth floor of a pass over the rows")
    if not args.light:
        order = np.argsort(df["s"].cat.codes.to_numpy(), kind="stable")
        d2, spec2, data2 = setup(df.iloc[order].reset_index(drop=True))
        add("sweep_sorted", "one sweep, rows sorted by student", cavi.sweep, d2, spec2, params, data2, True,
            static=(1, 4), note="same sweep; only the row order differs")
    return {"n_obs": n, "pieces": pieces, "summary": profile_summary(n, pieces, pw)}


def profile_summary(n: int, pieces: list[dict], pw: int) -> str:
    """A few sentences on what one sweep spends its time on, from the measured pieces."""
    ms = {p["key"]: p["ms"] for p in pieces}
    parts = [f"At {n:,} simulated rows one sweep takes {ms['sweep']:.3g} ms"]
    if "updates" in ms:
        parts[0] += (f" (block updates {ms['updates']:.3g} ms, M-step {ms['mstep']:.3g} ms, each compiled on its "
                     f"own); the sweep needs only the sum of the rows' variances, from per-level tables, while "
                     f"computing every row's mean and variance on its own takes {ms['moments']:.3g} ms")
    seg = sum(ms[f"seg_{f}"] for f in FACTORS)
    gat = sum(ms[f"gather_{f}"] for f in FACTORS)
    parts.append(
        f"Per pass over the rows, the three scatter-adds (segment_sum) take {seg:.3g} ms "
        f"(students {ms['seg_s']:.3g}, instructors {ms['seg_d']:.3g}, departments {ms['seg_dept']:.3g}), the three "
        f"gathers {gat:.3g} ms; the one-hot products with W ({pw} columns) that the sweep no longer makes would take {ms['W_mean']:.3g} ms for the mean, "
        f"{ms['Wt_r']:.3g} ms for W^T r and {ms['W_var']:.3g} ms for the variance, against {ms['stream']:.3g} ms for a plain elementwise pass"
    )
    parts.append(
        f"Alternatives: sorted rows with indices_are_sorted=True {ms['segsorted_s']:.3g} ms for the students' "
        f"segment_sum, jnp.bincount {ms['bincount_s']:.3g} ms, and for the 14 departments a one-hot matmul "
        f"{ms['onehot_dept']:.3g} ms against {ms['seg_dept']:.3g} ms"
        + (f"; the whole sweep on rows sorted by student takes {ms['sweep_sorted']:.3g} ms"
           if "sweep_sorted" in ms else "")
    )
    top = sorted((p for p in pieces if p["key"] not in ("sweep", "updates", "mstep", "moments", "elbo",
                                                            "sweep_sorted")), key=lambda p: -p["ms"])[:3]
    parts.append("The costliest single pieces: " + "; ".join(f"{p['piece']} {p['ms']:.3g} ms" for p in top))
    return ". ".join(parts) + "."


if __name__ == "__main__":
    main()
