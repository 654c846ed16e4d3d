"""The lmevi parts of the benchmark on a GPU, where one is at hand (optional; nothing else needs a GPU).

Runs, on whatever device JAX picks by default (a CUDA GPU when ``jax[cuda]`` is installed):

* InstEval, the recommended configuration to the accuracy target of ``benchmark.py`` (student
  correlation >= 0.999, instructor correlation >= 0.99 with lme4's REML modes), warm and cold, float64
  and float32, and the default converged fit;
* the scaling part of ``benchmark.py`` on its simulated InstEval-shaped data at ``--sizes`` rows.

lme4, mixedlm and NumPyro are not run: they belong to the side-by-side CPU run of ``benchmark.py``, so no
ratio is formed here across machines. Writes ``gpu.json`` and ``gpu.md`` to ``--out``
(default ``results/benchmark/gpu/``).

    python experiments/benchmark_gpu.py --repeats 5 --sizes 1e5,1e6,1e7,3e7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window
# the ``bench`` package (the parts of ``benchmark.py``) lives next to this script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.accuracy import lme4_ranef  # noqa: E402
from bench.harness import ROOT, log, machine_info, worker  # noqa: E402
from bench.insteval_race import time_ours  # noqa: E402
from bench.scaling import scale_row  # noqa: E402
from bench.writing import jsonable  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmark" / "gpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                   default=[100_000, 1_000_000, 10_000_000])
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
    df = lmevi.load_insteval()
    ours = time_ours(df, lme4_ranef(), args.repeats, args.cold_repeats, quick=False)
    rows = []
    for n in args.sizes:
        log(f"scaling: {n:,} rows ...")
        res = worker("scale", "--n-obs", str(n), "--seed", str(args.seed), "--repeats", str(args.repeats))
        rows.append(scale_row(res))
    result = jsonable({"machine": machine, "insteval": ours, "scaling": rows,
                             "settings": {"repeats": args.repeats, "cold_repeats": args.cold_repeats,
                                          "sizes": args.sizes, "seed": args.seed},
                             "total_seconds": time.perf_counter() - start})
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


def markdown(res: dict) -> str:
    ins, m = res["insteval"], res["machine"]
    L = [f"## lmevi on {m['device']} (jax {m['jax']})", "",
         "InstEval, `y ~ service + (1|s) + (1|d) + (1|dept)`, recommended configuration; medians "
         f"of {res['settings']['repeats']} warm and {res['settings']['cold_repeats']} cold runs.", "",
         "| precision | steps to target | warm to target (s) | cold to target (s) | converged steps | converged warm (s) "
         "| converged cold (s) |", "|---|---|---|---|---|---|---|"]
    for dtype, o in ins.items():
        L.append(f"| {dtype} | {o['steps_to_target']} | {o['warm_seconds']['median']:.3f} | "
                 f"{o['cold_seconds']['median']:.2f} | {o['converged_steps']} | "
                 f"{o['converged_warm_seconds']['median']:.3f} | {o['converged_cold_seconds']['median']:.2f} |")
    L += ["", "Simulated InstEval-shaped data (float64):", "",
          "| rows | steps | fit warm (s) | fit first call (s) | per sweep (ms) | ELBO+grad (ms) | host peak RSS (GB) |",
          "|---|---|---|---|---|---|---|"]
    for r in res["scaling"]:
        L.append(f"| {r['n_obs']:,} | {r['steps']} | {r['fit_seconds']:.3g} | {r['fit_seconds_first_call']:.3g} | "
                 f"{r['seconds_per_sweep'] * 1e3:.3g} | {r['seconds_per_eval'] * 1e3:.3g} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(L)


if __name__ == "__main__":
    main()
