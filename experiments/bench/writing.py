"""The benchmark's outputs: tables, the markdown report, the scaling plot and the files under ``--out``.

:func:`write_outputs` writes ``benchmark.json``, ``insteval.csv``, ``targets.csv``, ``scaling.csv``,
``profile.csv`` and ``benchmark.md``; :func:`plot_scaling` draws ``scaling.png``. :func:`jsonable` turns
results into plain JSON values (NumPy scalars to Python ones, non-finite floats to ``null``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.bench.accuracy import FACTORS, FORMULA, TARGET, fmt_acc
from experiments.bench.harness import log, ratio

# What "cold" means: a fresh process with lmevi's defaults, so its compilation cache (filled by earlier runs) is
# in use; the empty-cache figure is experiments/latency.py's.
COLD_NOTE = "fresh process, compilation cache as lmevi leaves it (warm)"

# speed targets: (label, key in the InstEval summary, minimum ratio)
SPEED_TARGETS = (
    ("warm >= 20x faster than lme4", "speedup_vs_lme4", 20.0),
    ("cold >= 3x faster than lme4", "speedup_cold_vs_lme4", 3.0),
    ("warm >= 5x faster than mixedlm", "speedup_vs_mixedlm", 5.0),
    ("warm >= 5x faster than NumPyro", "speedup_vs_numpyro", 5.0),
)


def plot_scaling(rows, slopes, path: Path, lo: int, hi: int) -> None:
    """``scaling.png``: every timing against rows on log-log axes, with its slope from ``lo`` to ``hi`` rows."""
    import matplotlib.pyplot as plt  # here, not at import: no backend chosen by importing

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


def targets_table(ins: dict, rows: list[dict], slopes: dict) -> list[dict]:
    """Each speed, scaling and 1e7-row target with its measured value and status (``pass``, ``not yet`` or
    ``not measured``)."""
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
    def at_most(label, v, need):
        out.append({"target": label, "value": v, "lower_bound": False,
                    "status": "not measured" if v is None else ("pass" if v <= need else "not yet")})

    def at(n_obs, key):
        row = next((r for r in rows if r["n_obs"] == n_obs), None)
        return None if row is None else row.get(key)

    at_most("1e6 rows: one sweep <= 20 ms", at(1_000_000, "sweep_ms"), 20.0)
    at_most("1e7 rows from a DataFrame, design included, <= 10 s (first call)",
            at(10_000_000, "fit_seconds_first_call"), 10.0)
    at_most("1e7 rows peak RSS <= 4 GB", at(10_000_000, "peak_rss_gb"), 4.0)
    at_most("1e7 rows: building the design <= 15 % of the fit", at(10_000_000, "design_share_of_fit"), 0.15)
    big = row_1e8()
    at_most("1e8 rows from Parquet row shards (read + first call) <= 3 min",
            None if big is None else big["parquet_read_seconds"] + big["fit_seconds_first_call"], 180.0)
    at_most("1e8 rows peak RSS <= 16 GB", None if big is None else big["peak_rss_gb"], 16.0)
    gpu = row_gpu()
    at_most("GPU (separate run): 1e7 rows from a DataFrame, end to end, first call <= 3 s",
            None if gpu is None else gpu["seconds"], 3.0)
    return out


def fmt_s(sp: dict | None) -> str:
    """``median [min, max]`` of a :func:`bench.harness.spread`, or ``n/a``."""
    if not sp or sp.get("median") is None:
        return "n/a"
    return f"{sp['median']:.3g} [{sp['min']:.3g}, {sp['max']:.3g}]"


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
            COLD_NOTE)
        if "converged_steps" in o:
            add("lmevi", f"recommended, {dtype}, converged ({o['converged_steps']} steps), warm",
                o["converged_warm_seconds"], o["converged_accuracy"], "default stop rule")
            add("lmevi", f"recommended, {dtype}, converged ({o['converged_steps']} steps), cold",
                o["converged_cold_seconds"], o["converged_accuracy"], COLD_NOTE)
    ex = ins.get("exact")
    if ex:
        note = f"lme4's criterion; SDs within {ex['max_sd_rel_diff_vs_lme4_reml']:.1e} of lme4 REML"
        add("lmevi", f"exact q (default q='auto' here), {ex['evaluations']} evaluations, warm", ex["warm_seconds"],
            None, note)
        add("lmevi", "exact q, cold", ex["cold_seconds"], None, COLD_NOTE)
        for o in ex.get("optimisers", {}).values():
            sec = {"median": o["seconds"], "min": o["seconds"], "max": o["seconds"], "n": 1}
            add("lmevi", f"exact q, optimisation alone from the structured start: {o['optimizer']}, "
                f"{o['evaluations']} evaluations, warm", sec, None, f"REML criterion {o['criterion']:.6f}")
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


def write_markdown(path: Path, ins, rows_t, targets, scal, slopes, prof, machine, quick, sharded=None):
    """``benchmark.md``: the InstEval table, the targets, the scaling table and slopes, the profile, the machine."""
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
    L.append("| rows | students | instructors | steps | fit warm (s) | fit first call (s) | design (s) | per sweep (ms) | "
             "ELBO+grad (ms) | peak RSS (GB) | lme4 (s) | cores |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in scal:
        lm = f"{r['lme4_seconds']:.3g}" if r["lme4_seconds"] else r["lme4_status"]
        design = "" if r.get("design_seconds") is None else f"{r['design_seconds']:.3g}"
        L.append(f"| {r['n_obs']:,} | {r['n_students']:,} | {r['n_instructors']:,} | {r['steps']} | "
                 f"{r['fit_seconds']:.3g} | {r['fit_seconds_first_call']:.3g} | {design} | "
                 f"{r['seconds_per_sweep'] * 1e3:.3g} | "
                 f"{r['seconds_per_eval'] * 1e3:.3g} | {r['peak_rss_gb']:.2f} | {lm} | {r.get('cores_used', '')} |")
    L.append("")
    L.append("A step of the default fit is one SQUAREM iteration (three coordinate-ascent sweeps). Fit times are "
             "whole `lmevi.fit` calls (design, compiled loop, results); design is the design stage alone "
             "(`lmevi.build_model`), median of 3 builds after the fits; peak RSS is that of the fitting process "
             "up to the end of its fits.")
    L.append("")
    L.append("Log-log slopes of time against rows: " + ", ".join(
        f"{k} {v:.2f}" for k, v in slopes.items() if v is not None) + ". See `scaling.png`.")
    if sharded and "seconds" in sharded:
        L.append("")
        L.append(f"Rows sharded over {sharded['devices']} CPU devices (one process, "
                 "`--xla_force_host_platform_device_count`), InstEval, structured q, plain coordinate ascent: "
                 f"{sharded['seconds']:.3g} s warm against {sharded['single_device_seconds']:.3g} s on one device "
                 f"(the same 2 cores), largest absolute difference {sharded['max_abs_diff_vs_single']:.1e}.")
        mp = sharded.get("multi_process") or {}
        if "seconds" in mp:
            L.append(f"Rows over {mp['processes']} processes (`experiments/distributed.py`: one Parquet file and one "
                     "`jax.distributed` process each, gloo collectives), InstEval, structured q: "
                     f"{mp['seconds']:.3g} s warm ({mp['seconds_first_call']:.3g} s first call) against "
                     f"{mp['single_process_seconds']:.3g} s in one process, largest absolute difference "
                     f"{mp['max_abs_diff_vs_single']:.1e}.")
    big = row_1e8()
    if big:
        L.append("")
        L.append(f"{big['n_obs']:,} rows (separate run, `{big['command']}`): read from {big['files']} Parquet files "
                 f"in {big['parquet_read_seconds']:.0f} s, fitted ({big['dtype']}, first call) in "
                 f"{big['fit_seconds_first_call']:.0f} s, {big['steps']} steps, peak RSS {big['peak_rss_gb']:.1f} GB; "
                 f"the whole process (start, import, read, fit) {big['job_seconds_whole']:.0f} s.")
    gpu = row_gpu()
    if gpu:
        L.append("")
        L.append(f"GPU (separate run, `experiments/benchmark_gpu.py`, {gpu['device']}, JAX {gpu['jax']}: "
                 "`results/benchmark/gpu/gpu.md`): 1e7 rows from a DataFrame, first call in a fresh process "
                 f"({'warm' if gpu['cache_warm'] else 'as found'} compilation cache) {gpu['seconds']:.2f} s, "
                 f"repeated {gpu['fit_seconds_warm']:.2f} s.")
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
    """``x`` with NumPy scalars as Python numbers, tuples as lists, keys as strings and non-finite floats
    as ``None``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


# The 1e8-row fit takes longer than the rest of the benchmark together: it is its own run of
# experiments/distributed.py (the command below), on the same machine, and the benchmark reports its record.
RUN_1E8 = ("python -m experiments.distributed --rows 100000000 --processes 1 --files 8 --no-single --fits 1 "
           "--dtype float32 --timeout 3000 --out results/benchmark/1e8")
FILE_1E8 = Path(__file__).resolve().parents[2] / "results" / "benchmark" / "1e8" / "distributed.json"


def row_1e8() -> dict | None:
    """The record of the 1e8-row run (:data:`RUN_1E8`), with the command that made it, or ``None``."""
    if not FILE_1E8.exists():
        return None
    res = json.loads(FILE_1E8.read_text())
    return {"n_obs": res["rows"], "command": RUN_1E8, "separate_run": True, "dtype": res["dtype"],
            "files": res["files"], "processes": res["processes"],
            "fit_seconds_first_call": max(res["fit_seconds_first_call_per_process"]),
            "parquet_read_seconds": max(res["parquet_read_seconds_per_process"]),
            "peak_rss_gb": max(res["peak_rss_gb_per_process"]), "steps": res["steps"]["distributed"],
            "job_seconds_whole": res["job_seconds_whole"],
            "converged": res["converged"], "sd": res["sd"]["distributed"]}


# The GPU part runs where a GPU is lent (experiments/benchmark_gpu.py); the benchmark reports its record.
FILE_GPU = Path(__file__).resolve().parents[2] / "results" / "benchmark" / "gpu" / "gpu.json"


def row_gpu() -> dict | None:
    """The GPU record's 1e7-row first call (``experiments/benchmark_gpu.py``), or ``None`` where there is none."""
    if not FILE_GPU.exists():
        return None
    res = json.loads(FILE_GPU.read_text())
    row = next((r for r in res.get("scaling", []) if r["n_obs"] == 10_000_000), None)
    if row is None or "cache_warm_at_first_call" not in row:  # a record from before the first call was measured so
        return None
    return {"seconds": row["fit_seconds_first_call"], "device": res["machine"]["device"],
            "jax": res["machine"]["jax"], "cache_warm": row["cache_warm_at_first_call"],
            "fit_seconds_warm": row["fit_seconds"]}


def write_outputs(out_dir: Path, args, ins: dict, scal: list[dict], slopes: dict, lo: int, hi: int, prof: dict,
                  machine: dict, start: float, sharded: dict | None = None) -> dict:
    """Write the tables, ``benchmark.json`` and ``benchmark.md`` to ``out_dir``, log the summary and return
    the JSON result; ``start`` is the ``time.perf_counter()`` of the run's beginning."""
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
        "sharded": sharded,
        "1e8": row_1e8(),
        "gpu": row_gpu(),
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if not k.startswith("worker") and k not in ("dtype", "num_steps", "data", "cap", "chunk",
                                                                   "lme4_seconds", "n_obs", "csv")},
        "total_seconds": time.perf_counter() - start,
    }
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result = jsonable(result)
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out_dir / "benchmark.md", ins, rows_t, targets, scal, slopes, prof, machine, args.quick, sharded)
    log("")
    log(pd.DataFrame(rows_t)[["method", "configuration", "median_s", "min_s", "max_s", "ratio_to_ours",
                              "accuracy"]].to_string(index=False))
    log("")
    for t in targets:
        v = "n/a" if t["value"] is None else (">= " if t["lower_bound"] else "") + f"{t['value']:.3g}"
        log(f"  [{t['status']:>12}] {t['target']}: {v}")
    log(f"\nwrote {out_dir} in {result['total_seconds']:.0f} s")
    return result
