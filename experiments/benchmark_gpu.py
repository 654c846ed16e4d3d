"""The lmevi parts of the benchmark on a GPU, where one is at hand (optional; nothing else needs a GPU).

Runs, on whatever device JAX picks by default (a CUDA GPU when ``jax[cuda]`` is installed), in this order:

* the scaling part: ``benchmark.py``'s simulated InstEval-shaped data at ``--sizes`` rows, each size
  in a fresh process. Sizes of at least ``--warm-from`` rows run once more before, untimed, so that the
  timed process's first call finds lmevi's compilation cache warm, as a user's second script would (the
  scaling target of 3 s for a 1e7-row fit from a DataFrame, design included, is that first call);
* InstEval with the defaults (``lmevi.fit(formula, df)``, ``q="auto"``: the exact REML fit here), warm;
* InstEval, the recommended variational configuration to the accuracy target of ``benchmark.py`` (student
  correlation >= 0.999, instructor correlation >= 0.99 with lme4's REML modes), warm and cold, float64
  and float32, and the default converged fit.

lme4, mixedlm and NumPyro are not run: they belong to the side-by-side CPU run of ``benchmark.py``, so no
ratio is formed here across machines. Writes ``gpu.json`` and ``gpu.md`` to ``--out``
(default ``results/benchmark/gpu/``), again after every part, so that a run cut short keeps what it did.

    python -m experiments.benchmark_gpu --repeats 5 --sizes 1e5,1e6,1e7,3e7
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

from experiments.bench.accuracy import FORMULA, lme4_ranef
from experiments.bench.harness import ROOT, log, machine_info, worker
from experiments.bench.insteval_race import time_fit, time_ours
from experiments.bench.scaling import scale_row
from experiments.bench.writing import jsonable

# the GPU target: a 1e7-row fit from a DataFrame, end to end, first call in the process
TARGET_ROWS, TARGET_SECONDS = 10_000_000, 3.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmark" / "gpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                   default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--warm-from", type=lambda s: int(float(s)), default=TARGET_ROWS,
                   help="sizes of at least this many rows run once untimed first, to warm the compilation cache")
    p.add_argument("--skip-insteval", action="store_true", help="the scaling part only")
    p.add_argument("--target-rows", type=lambda s: int(float(s)), default=TARGET_ROWS,
                   help="the size whose first call is the target's measurement (a smoke test shrinks it)")
    p.add_argument("--seed", type=int, default=20240601)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import jax

    import lmevi

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    machine = machine_info(with_r=False)
    dev = jax.devices()[0]
    machine["device"] = f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}"
    log(f"device: {machine['device']}")
    warnings.simplefilter("ignore", lmevi.ConvergenceWarning)
    result = {"machine": machine, "default_fit": None, "insteval": {}, "scaling": [],
              "settings": {"repeats": args.repeats, "cold_repeats": args.cold_repeats, "sizes": args.sizes,
                           "warm_from": args.warm_from, "seed": args.seed,
                           "target_rows": args.target_rows}}

    def save():
        result["total_seconds"] = time.perf_counter() - start
        res = jsonable(result)
        (args.out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "gpu.md").write_text(markdown(res) + "\n")

    for n in args.sizes:
        wargs = ("--n-obs", str(n), "--seed", str(args.seed), "--repeats", str(args.repeats))
        untimed = None
        if n >= args.warm_from:
            log(f"scaling: {n:,} rows, untimed run to warm the compilation cache ...")
            untimed = worker("scale", *wargs)["fit_seconds_first_call"]
        log(f"scaling: {n:,} rows ...")
        row = scale_row(worker("scale", *wargs))
        row["cache_warm_at_first_call"] = untimed is not None
        # the warming run's own first call: compilation included where the cache did not hold this size's
        # programs yet (on a fresh machine, an empty cache)
        row["fit_seconds_first_call_warming_run"] = untimed
        result["scaling"].append(row)
        save()
        if n == args.target_rows and n >= args.warm_from:
            result["first_call_variants"] = first_call_variants(wargs)
            save()
    if not args.skip_insteval:
        df = lmevi.load_insteval()
        warm, m = time_fit(df, args.repeats)
        result["default_fit"] = {"warm_seconds": warm, "q": m.options.q, "steps": int(m.steps)}
        log(f"InstEval, defaults (q={m.options.q}): warm {warm['median']:.3f} s")
        save()
        result["insteval"] = time_ours(df, lme4_ranef(), args.repeats, args.cold_repeats, quick=False)
        save()
    save()
    print(markdown(jsonable(result)))
    return result


def first_call_variants(wargs) -> dict:
    """The first call at the target size again (compilation cache warm), each in a fresh process: without
    lmevi's helper thread that starts JAX's backend beside the design stage (``lmevi.runtime.xla.start_backend``),
    and with JAX's memory preallocation off (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), which a user can set."""
    out = {}
    log("  the same first call without the backend thread ...")
    out["without_backend_thread"] = worker("scale", *wargs, "--no-backend-thread")["fit_seconds_first_call"]
    log(f"    {out['without_backend_thread']:.3g} s")
    log("  the same first call with XLA_PYTHON_CLIENT_PREALLOCATE=false ...")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    try:
        out["preallocate_false"] = worker("scale", *wargs)["fit_seconds_first_call"]
    finally:
        del os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]
    log(f"    {out['preallocate_false']:.3g} s")
    return out


def target_row(res: dict) -> dict | None:
    """The GPU target's measurement: the first call at the record's target size (:data:`TARGET_ROWS` unless
    ``--target-rows`` said otherwise), if that size ran."""
    rows = res.get("settings", {}).get("target_rows", TARGET_ROWS)
    for r in res["scaling"]:
        if r["n_obs"] == rows:
            return {"rows": rows, "seconds": r["fit_seconds_first_call"], "limit": TARGET_SECONDS,
                    "cache_warm": r.get("cache_warm_at_first_call"),
                    "met": r["fit_seconds_first_call"] <= TARGET_SECONDS}
    return None


def markdown(res: dict) -> str:
    ins, m = res["insteval"], res["machine"]
    L = [f"## lmevi on {m['device']} (jax {m['jax']})", ""]
    t = target_row(res)
    if t is not None:
        L += ["| target | measured | limit | status |", "|---|---|---|---|",
              f"| 1e7-row fit from a DataFrame, end to end, first call in a fresh process "
              f"({'warm' if t['cache_warm'] else 'as found'} compilation cache) | {t['seconds']:.2f} s | "
              f"{t['limit']:.0f} s | {'met' if t['met'] else 'not met'} |", ""]
        v = res.get("first_call_variants")
        if v:
            L += [f"The same first call, each in a fresh process: without the helper thread that starts JAX's "
                  f"backend beside the design stage {v['without_backend_thread']:.2f} s; with "
                  f"`XLA_PYTHON_CLIENT_PREALLOCATE=false` {v['preallocate_false']:.2f} s.", ""]
    if res.get("default_fit"):
        d = res["default_fit"]
        L += [f"InstEval, `{FORMULA}`, defaults (`lmevi.fit(formula, df)`, q='{d['q']}'): warm "
              f"{d['warm_seconds']['median']:.3f} s (median of {d['warm_seconds']['n']}).", ""]
    if ins:
        L += ["InstEval, recommended variational configuration (q='structured'); medians "
              f"of {res['settings']['repeats']} warm and {res['settings']['cold_repeats']} cold runs "
              "(cold: first call in a fresh process, compilation cache warm).", "",
              "| precision | steps to target | warm to target (s) | cold to target (s) | converged steps "
              "| converged warm (s) | converged cold (s) |", "|---|---|---|---|---|---|---|"]
        for dtype, o in ins.items():
            L.append(f"| {dtype} | {o['steps_to_target']} | {o['warm_seconds']['median']:.3f} | "
                     f"{o['cold_seconds']['median']:.2f} | {o['converged_steps']} | "
                     f"{o['converged_warm_seconds']['median']:.3f} | {o['converged_cold_seconds']['median']:.2f} |")
        L.append("")
    if res["scaling"]:
        L += ["Simulated InstEval-shaped data (float64), each size in a fresh process; the first call includes "
              "the design stage (from a pandas DataFrame) and, where the cache did not hold the size's programs, "
              "compilation; the warming run is the untimed one before the timed process (on a fresh machine, with "
              "an empty cache):", "",
              "| rows | steps | fit warm (s) | fit first call (s) | warming run's first call (s) | design (s) "
              "| per sweep (ms) | ELBO+grad (ms) | host peak RSS (GB) |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in res["scaling"]:
            untimed = r.get("fit_seconds_first_call_warming_run")
            L.append(f"| {r['n_obs']:,} | {r['steps']} | {r['fit_seconds']:.3g} | {r['fit_seconds_first_call']:.3g} | "
                     f"{'-' if untimed is None else format(untimed, '.3g')} | {r['design_seconds']:.3g} | "
                     f"{r['seconds_per_sweep'] * 1e3:.3g} | {r['seconds_per_eval'] * 1e3:.3g} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(L)


if __name__ == "__main__":
    main()
