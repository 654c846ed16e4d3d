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

    python -m experiments.benchmark                 # from the repository's root: full run, about half an hour
    python -m experiments.benchmark --quick --out /tmp/bench   # smoke run, under a minute

The quick run uses InstEval with the saved lme4 time, float64 only, one repeat, no mixedlm or NumPyro,
and simulated sizes 1e3 and 1e4; its numbers only check the code path.

This script parses the command line and runs the parts, or one helper mode (``--worker``) in a fresh
process; the parts themselves are in :mod:`experiments.bench` (see ``bench/__init__.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from experiments.bench.baselines import worker_numpyro
from experiments.bench.harness import ROOT, log, machine_info, r_available
from experiments.bench.insteval_race import insteval_part, worker_cold
from experiments.bench.profile import profile_part, worker_profile
from experiments.bench.scaling import scaling_part, sharded_part, slopes as scaling_slopes, worker_scale
from experiments.bench.writing import jsonable, plot_scaling, write_outputs

WORKERS = {"cold": worker_cold, "numpyro": worker_numpyro, "scale": worker_scale, "profile": worker_profile}


def parse_args(argv):
    """The command line; ``--quick`` shrinks repeats, sizes and caps to a smoke run."""
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
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    p.add_argument("--q", default="structured", help=argparse.SUPPRESS)
    p.add_argument("--num-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=250, help=argparse.SUPPRESS)
    p.add_argument("--lme4-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--n-obs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--csv", help=argparse.SUPPRESS)
    p.add_argument("--light", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-backend-thread", action="store_true", help=argparse.SUPPRESS)
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
    """Run the benchmark and write its outputs, returning the JSON result; with ``--worker``, run one helper
    mode instead."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window: this process's choice, made when it runs, not at import
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
    slopes = scaling_slopes(scal, lo, hi)
    plot_scaling(scal, slopes, out_dir / "scaling.png", lo, hi)
    prof = profile_part(args)
    sharded = None if args.quick else sharded_part()
    return write_outputs(out_dir, args, ins, scal, slopes, lo, hi, prof, machine, start, sharded)


def run_worker(args) -> None:
    """One helper mode (``--worker``), started by the main run in a fresh process; prints one JSON line."""
    if args.one_core and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX starts its thread pools
    out = WORKERS[args.worker](args)
    print(json.dumps(jsonable(out)), flush=True)


if __name__ == "__main__":
    main()
