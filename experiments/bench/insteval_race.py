"""lmevi's timings on InstEval, and the InstEval part of the benchmark as a whole.

* the recommended variational configuration, ``lmevi.fit(formula, df, q="structured")`` (REML-like, coordinate ascent on
  the closed-form ELBO), run for the fewest steps that reach the accuracy target (:func:`steps_to_target`)
  and to convergence; warm (:func:`time_fit`) and cold (a fresh process, :func:`worker_cold`, the ``cold``
  helper mode of ``benchmark.py``); float64 and float32;
* the Edward tutorial's configuration (mean-field q, ML-like, Monte Carlo KLqp, Adam, sigma fixed at 1):
  time per step and time to the target, or its accuracy after lme4's wall time;
* the cost of the variational family: structured against mean-field q, per sweep and converged;
* :func:`insteval_part` runs these and the baselines and returns the InstEval summary.
"""

from __future__ import annotations

import time
import warnings

from experiments.bench.accuracy import FORMULA, TARGET, accuracy, fmt_acc, lme4_ranef, meets
from experiments.bench.baselines import time_lme4_insteval, time_mixedlm, time_numpyro
from experiments.bench.harness import log, median_of, ratio, spread, worker


def steps_to_target(df, ref, dtype: str, max_steps: int, **kw) -> tuple[int | None, list[dict]]:
    """Smallest step count whose fit meets the accuracy target (one run with a snapshot after every step)."""
    import lmevi

    snaps = tuple(range(1, max_steps + 1))
    m = lmevi.fit(FORMULA, df, q="structured", num_steps=max_steps, tol=0.0, dtype=dtype, snapshot_steps=snaps,
                  progress=False, **kw)
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
        warm, m = time_fit(df, repeats, q="structured", num_steps=k, tol=0.0, dtype=dtype)
        acc = accuracy(m.ranef(), ref)
        log(f"  lmevi {dtype}: {k} steps reach the target {fmt_acc(acc)}; warm {warm['median']:.3f} s")
        cold = [worker("cold", "--dtype", dtype, "--num-steps", str(k)) for _ in range(cold_repeats)]
        log(f"    cold (fresh process, compilation cache warm): {[round(c['fit_seconds'], 3) for c in cold]}")
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
            conv, mc = time_fit(df, repeats, q="structured", dtype=dtype)
            cold_conv = [worker("cold", "--dtype", dtype, "--num-steps", "0") for _ in range(cold_repeats)]
            res.update(converged_steps=mc.steps, converged_accuracy=accuracy(mc.ranef(), ref),
                       converged_warm_seconds=conv,
                       converged_cold_seconds=spread([c["fit_seconds"] for c in cold_conv]))
            log(f"    converged ({mc.steps} steps): warm {conv['median']:.3f} s, "
                f"cold {res['converged_cold_seconds']['median']:.3f} s")
        out[dtype] = res
    return out


def time_exact(df, repeats: int, cold_repeats: int) -> dict:
    """``q="exact"`` (lme4's REML criterion, the default ``q="auto"``'s choice where the dense block is small):
    warm and cold (a fresh process), and the largest relative difference of its SDs from lme4 REML's."""
    from experiments.bench.accuracy import lme4_sd

    warm, m = time_fit(df, repeats, q="exact")
    ref = lme4_sd()
    sd = m.sd()
    diff = max(abs(sd[k] / ref[k] - 1.0) for k in ref)
    cold = [worker("cold", "--q", "exact", "--num-steps", "0") for _ in range(cold_repeats)]
    log(f"  exact: warm {warm['median']:.3f} s ({m.steps} evaluations, {m.run.optimizer}), cold "
        f"{[round(c['fit_seconds'], 3) for c in cold]}; SDs within {diff:.1e} of lme4 REML")
    return {"warm_seconds": warm, "cold_seconds": spread([c["fit_seconds"] for c in cold]),
            "evaluations": int(m.steps), "optimizer": m.run.optimizer,
            "max_sd_rel_diff_vs_lme4_reml": float(diff), "sd": {k: float(v) for k, v in sd.items()},
            "optimisers": time_exact_optimisers(df, repeats)}


def time_exact_optimisers(df, repeats: int) -> dict:
    """The exact fit's optimisation alone (``lmevi.exact.optimise.fit_exact``, from the structured fit's start, as
    ``lmevi.fit`` runs it) with each gradient optimiser, side by side: seconds (median), evaluations, and the
    REML criterion reached."""
    import jax
    import numpy as np

    import lmevi
    from lmevi.exact import structure as structure_lib
    from lmevi.exact import optimise
    from lmevi.fitting.stage import _exact_start

    model = lmevi.build_model(FORMULA, df)
    out = {}
    with jax.enable_x64(True):
        start = _exact_start(model)
        s = structure_lib.build_structure(model.problem.design, model.reml)
        for name in ("newton", "lbfgsb"):
            fits = [optimise.fit_exact(model.problem.design, model.reml, theta0=start, structure=s, optimizer=name)
                    for _ in range(repeats + 1)]  # the first compiles
            out[name] = {"seconds": float(np.median([f.seconds for f in fits[1:]])), "evaluations": fits[-1].n_evals,
                         "optimizer": fits[-1].optimizer, "criterion": float(fits[-1].objective)}
    log("  exact optimisers from the structured start: " + ", ".join(
        f"{v['optimizer']} {v['seconds']:.3f} s ({v['evaluations']} evaluations, criterion {v['criterion']:.6f})"
        for v in out.values()))
    return out


def time_family_cost(df, repeats: int) -> dict:
    """Structured against mean-field q, both ML-like (``reml=False``), warm: per sweep (ten plain sweeps,
    no acceleration) and converged with the defaults (coordinate ascent with SQUAREM)."""
    out = {}
    for family in ("structured", "meanfield"):
        ten, _ = time_fit(df, repeats, q=family, reml=False, num_steps=10, tol=0.0, accelerate=False)
        conv, m = time_fit(df, repeats, q=family, reml=False)
        out[family] = {"seconds_per_sweep": spread([t / 10 for t in ten["all"]]), "converged_seconds": conv,
                       "converged_steps": m.steps, "sd_dept": float(m.sd()["dept"])}
        log(f"  {family}: {out[family]['seconds_per_sweep']['median'] * 1e3:.1f} ms per sweep, converged in "
            f"{m.steps} steps, {conv['median']:.3f} s")
    for key in ("seconds_per_sweep", "converged_seconds"):
        out[f"structured_over_meanfield_{key}"] = out["structured"][key]["median"] / out["meanfield"][key]["median"]
    return out


def tutorial_kwargs():
    """``lmevi.fit`` options of the Edward tutorial's configuration."""
    import lmevi

    return dict(q="meanfield", reml=False, elbo="mc", optimizer=lmevi.edward_adam(), residual_scale=1.0,
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


def insteval_part(args, with_r: bool) -> dict:
    """All InstEval timings (lme4, lmevi, mixedlm, NumPyro) and the summary: medians, ratios to ours, details."""
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
    log("lmevi, exact q (lme4's criterion) ...")
    exact = time_exact(df, args.repeats, args.cold_repeats)
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
        "ours": "lmevi.fit(q='structured') (reml=True, cavi, closed-form ELBO), float64, "
                "run for the fewest steps (SQUAREM iterations) that reach the accuracy target",
        "lme4_source": lme4["lme4_source"],
        "lme4_seconds": lme4_s,
        "ours_warm_seconds": warm,
        "ours_cold_seconds": cold,
        "ours_steps_to_target": ours["float64"]["steps_to_target"],
        "ours_float32_warm_seconds": median_of(ours.get("float32", {}).get("warm_seconds")),
        "ours_float32_cold_seconds": median_of(ours.get("float32", {}).get("cold_seconds")),
        "ours_converged_warm_seconds": median_of(ours["float64"].get("converged_warm_seconds")),
        "ours_converged_cold_seconds": median_of(ours["float64"].get("converged_cold_seconds")),
        "tutorial_seconds_per_step": tutorial["seconds_per_step"]["median"],
        "tutorial_seconds_to_target": (tutorial.get("seconds_to_target") or {}).get("median"),
        "exact_warm_seconds": exact["warm_seconds"]["median"],
        "exact_cold_seconds": exact["cold_seconds"]["median"],
        "exact_max_sd_rel_diff_vs_lme4_reml": exact["max_sd_rel_diff_vs_lme4_reml"],
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
        "exact": exact,
        "tutorial": tutorial,
        "family_cost": family_cost,
        "mixedlm": mixed,
        "numpyro": npy,
    }
    return summary


def worker_cold(args) -> dict:
    """First ``lmevi.fit`` call in this process: import and data loading are timed apart from the fit."""
    t0 = time.perf_counter()
    import lmevi

    t_import = time.perf_counter() - t0
    warnings.simplefilter("ignore", lmevi.ConvergenceWarning)
    df = lmevi.load_insteval()
    kw = {} if args.num_steps == 0 else {"num_steps": args.num_steps, "tol": 0.0}
    q = getattr(args, "q", "structured")
    t1 = time.perf_counter()
    m = lmevi.fit(FORMULA, df, q=q, dtype=args.dtype if q != "exact" else "float64", progress=False, **kw)
    fit_s = time.perf_counter() - t1
    return {"fit_seconds": fit_s, "import_seconds": t_import, "steps": m.steps,
            "since_import_seconds": time.perf_counter() - t0}
