"""The methods lmevi is compared with on InstEval.

* lme4 ``lmer(REML = TRUE)`` timed through ``experiments/lme4_timing.R`` (or, without R, the saved fit
  time of ``results/lme4/insteval/fit_reml.json``);
* mixedlm (PyPI ``mixedlm``, Rust backend) ``lmer(REML=True)``, checked against lme4;
* NumPyro SVI with ``AutoNormal``, run in its own process (:func:`worker_numpyro`, the ``numpyro`` helper
  mode of ``benchmark.py``) to the accuracy target or a wall-time cap.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.bench.accuracy import FACTORS, FORMULA, accuracy, lme4_fit, lme4_ranef, meets
from experiments.bench.harness import ROOT, last_json, log, run_measured, spread, worker

LME4_TIMING = ROOT / "experiments" / "lme4_timing.R"


def time_lme4_insteval(repeats: int, with_r: bool) -> dict:
    """lme4's wall time on InstEval: ``repeats`` fits in one R process, or the saved fit time without R."""
    saved = lme4_fit()
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


def time_mixedlm(df, ref, repeats: int) -> dict | None:
    """mixedlm's REML fit, first call and ``repeats`` timed ones, and its agreement with lme4 (``None`` when
    mixedlm is not installed)."""
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
    saved = lme4_fit()
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
    """NumPyro SVI in a fresh process (:func:`worker_numpyro`), on InstEval saved to a temporary ``.npz``."""
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
