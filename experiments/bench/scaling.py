"""Scaling in the number of rows, on simulated data shaped like InstEval.

The data come from :func:`experiments.simulate.simulate` (crossed, shaped like InstEval).
:func:`scaling_part` runs every size in a fresh process (:func:`worker_scale`, the ``scale`` helper mode
of ``benchmark.py``), so that its peak RSS is its own: time of the recommended fit (first call, then
warm), time per coordinate-ascent sweep and per closed-form ELBO-and-gradient evaluation; and lme4 on
the sizes it finishes within its time limit. :func:`slope` fits the log-log growth of a timing.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from experiments.bench.accuracy import FACTORS, FORMULA
from experiments.bench.baselines import LME4_TIMING
from experiments.bench.harness import WorkerHung, last_json, log, run_measured, time_call, worker
from experiments.bench.stages import jitted_elbo_and_grad, jitted_sweep, structured_problem
from experiments.simulate import simulate
from lmevi.runtime.precision import x64

# the timings whose log-log slope against rows is reported
SLOPE_KEYS = ("fit_seconds", "fit_seconds_first_call", "seconds_per_sweep", "seconds_per_eval", "lme4_seconds")


def scaling_part(args, with_r: bool, tmpdir: Path) -> list[dict]:
    """One row per size of ``args.sizes``: lmevi's timings and peak RSS, and lme4's time where it ran.

    lme4 gets the sizes up to ``--lme4-max-rows`` until one of them times out or fails, or until the
    growth seen so far predicts more than twice ``--lme4-timeout``. A helper that stops using CPU time is
    run again on one core.
    """
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


SHARDED_CODE = r"""
import json, time, warnings
import numpy as np, jax, lmevi
warnings.simplefilter("ignore")
data = lmevi.load_insteval()
formula = "y ~ service + (1|s) + (1|d) + (1|dept)"
fits, seconds = {}, {}
for name, devices in (("single", None), ("sharded", len(jax.devices()))):
    lmevi.fit(formula, data, q="structured", accelerate=False, progress=False, devices=devices)
    t0 = time.perf_counter()
    fits[name] = lmevi.fit(formula, data, q="structured", accelerate=False, progress=False, devices=devices)
    seconds[name] = time.perf_counter() - t0
a, b = fits["single"], fits["sharded"]
diff = max(float(np.max(np.abs(a.sd().to_numpy() - b.sd().to_numpy()))),
           float(np.max(np.abs(a.fixef().to_numpy() - b.fixef().to_numpy()))),
           float(np.max(np.abs(a.ranef().condval.to_numpy() - b.ranef().condval.to_numpy()))))
print(json.dumps(dict(devices=len(jax.devices()), processes=1, seconds=seconds["sharded"],
                      single_device_seconds=seconds["single"], max_abs_diff_vs_single=diff,
                      steps=[a.steps, b.steps], data="InstEval, q='structured', plain coordinate ascent")))
"""


def sharded_part(devices: int = 4) -> dict:
    """InstEval fitted with its rows sharded over ``devices`` CPU devices (a fresh process with
    ``--xla_force_host_platform_device_count``) against the one-device fit in the same process: warm seconds and
    the largest absolute difference of SDs, fixed effects and conditional modes."""
    import os
    import subprocess
    import sys

    log(f"sharded: InstEval on {devices} CPU devices against one ...")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = subprocess.run([sys.executable, "-c", SHARDED_CODE], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {"devices": devices, "processes": 1, "error": out.stderr[-500:]}
    res = last_json(out.stdout)
    log(f"  {res['seconds']:.3f} s sharded, {res['single_device_seconds']:.3f} s on one device; "
        f"max abs difference {res['max_abs_diff_vs_single']:.1e}")
    res["multi_process"] = multi_process_part()
    return res


def multi_process_part(processes: int = 2) -> dict:
    """InstEval as ``processes`` Parquet files, one ``jax.distributed`` process each
    (``experiments/distributed.py``), against one process: warm seconds and the largest absolute difference."""
    import tempfile

    from experiments import distributed

    log(f"sharded: InstEval over {processes} processes (Parquet files, jax.distributed) ...")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = distributed.main(["--processes", str(processes), "--out", tmp])
        except Exception as err:  # noqa: BLE001 - a failed part is recorded, the others still run
            return {"processes": processes, "error": str(err)[-500:]}
    diffs = res["max_abs_diff_vs_single"]
    worst = max(diffs[k] for k in ("fixef", "sd", "ranef", "fitted"))
    out = {"devices": res["devices"], "processes": processes, "seconds": max(res["fit_seconds_per_process"]),
           "seconds_first_call": max(res["fit_seconds_first_call_per_process"]),
           "single_process_seconds": res["single_process_fit_seconds"], "max_abs_diff_vs_single": worst}
    log(f"  {out['seconds']:.3f} s warm over {processes} processes, {out['single_process_seconds']:.3f} s in one; "
        f"max abs difference {worst:.1e}")
    return out


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
    """Log-log slope of ``key`` against rows over the rows with ``lo <= n_obs <= hi`` (``None`` under two)."""
    pts = [(r["n_obs"], r[key]) for r in rows if r.get(key) and lo <= r["n_obs"] <= hi]
    if len(pts) < 2:
        return None
    x, y = np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def slopes(rows, lo, hi) -> dict:
    """:func:`slope` of every timing of :data:`SLOPE_KEYS`."""
    return {k: slope(rows, k, lo, hi) for k in SLOPE_KEYS}


@x64  # the stages are called directly, outside the 64-bit scope of ``lmevi.fit``: 64-bit for this call only
def worker_scale(args) -> dict:
    """One simulated size: recommended fit (first call, warm), then per-sweep and ELBO+gradient timings."""
    import lmevi

    if getattr(args, "no_backend_thread", False):  # side by side: JAX's backend started by the fit itself
        lmevi.runtime.xla.start_backend = lambda: False
    df, truth = simulate(args.n_obs, args.seed)
    if args.csv:
        out = df.copy()
        for g in FACTORS:
            out[g] = out[g].cat.codes
        out.to_csv(args.csv, index=False)
        del out
    t0 = time.perf_counter()
    m = lmevi.fit(FORMULA, df, q="structured", progress=False)
    first = time.perf_counter() - t0
    rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    fits = []
    for _ in range(args.repeats if args.n_obs < 10_000_000 else min(args.repeats, 2)):
        t0 = time.perf_counter()
        m = lmevi.fit(FORMULA, df, q="structured", progress=False)
        fits.append(time.perf_counter() - t0)
    rss_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    designs = []  # the design stage alone (programs compiled above); one build is a noisy sample of page faults
    for _ in range(3):
        model = None  # one model held at a time
        t0 = time.perf_counter()
        model = lmevi.build_model(FORMULA, df, q="structured")
        designs.append(time.perf_counter() - t0)
    design = float(np.median(designs))
    re = m.ranef()
    acc = {}
    for g in FACTORS:
        est = re[re["grpvar"] == g]["condval"].to_numpy()
        acc[g] = float(np.corrcoef(est, truth[g])[0, 1])
    sd = m.sd()

    problem, params = structured_problem(df, model)
    sweep = jitted_sweep()
    value_and_grad = jitted_elbo_and_grad()
    per_sweep = time_call(sweep, problem, params, repeats=max(5, args.repeats))
    per_eval = time_call(value_and_grad, problem, params, repeats=max(5, args.repeats))
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
        "design_seconds": design,
        "design_seconds_min": min(designs),
        "design_seconds_max": max(designs),
        "design_share_of_fit": design / float(np.median(fits)),
        "seconds_per_sweep": per_sweep,
        "sweep_ms": per_sweep * 1e3,
        "seconds_per_eval": per_eval,
        "peak_rss_gb_after_first_fit": rss_first,
        "peak_rss_gb_after_fits": rss_fit,
        "sd_s": float(sd["s"]), "sd_d": float(sd["d"]), "sd_dept": float(sd["dept"]),
        "sigma": float(sd["Residual"]),
        "accuracy_vs_truth": acc,
    }
