"""A multi-process fit on one machine: rows in Parquet shards, one process per shard, JAX's multi-controller
runtime (``jax.distributed``) with CPU collectives through gloo; the same fit as one process holding all
the rows.

    python -m experiments.distributed                       # from the repository's root: InstEval, 2 processes
    python -m experiments.distributed --processes 4 --rows 1000000   # simulated InstEval-shaped rows

What it does:

1. writes the data as ``--processes`` Parquet files (pyarrow), rows dealt out in contiguous blocks, as a
   Spark or Dask job writing one file per partition would leave them;
2. starts one Python process per file (``--worker``). Each calls
   ``jax.distributed.initialize(coordinator, num_processes, process_id)``, reads only its own file with
   ``pandas.read_parquet`` and calls ``lmevi.fit(formula, its_rows, distributed=True)``. The levels of each
   grouping factor, the scales and q's blocks come from small summaries exchanged between the processes
   (:mod:`lmevi.runtime.collective`); the rows stay where they were read, sharded over the processes' devices, and
   XLA reduces per-level sums across processes inside the compiled fit;
3. fits the same rows in this process (one process, one device) and compares: estimates, the ELBO, every
   random effect, and the fitted values of each process's rows.

Writes ``results/distributed/distributed.json`` and ``distributed.md``.

On N hosts the same worker runs once per host with ``--coordinator`` set to host 0's address (or under a
cluster manager that ``jax.distributed.initialize()`` detects, such as SLURM); on GPU or TPU hosts JAX uses
the accelerators' own collectives (NCCL, ICI) and nothing here changes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from experiments.simulate import simulate_levels, simulate_rows

HERE = Path(__file__).resolve().parent
FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"
OUT = HERE.parent / "results" / "distributed"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2,
                   help="number of processes (1: one process reads every file, without jax.distributed)")
    p.add_argument("--files", type=int, default=0, help="Parquet files (default: one per process); process i "
                   "reads files i, i + processes, ...")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="precision of the fit")
    p.add_argument("--rows", type=int, default=0, help="simulated InstEval-shaped rows (0: InstEval itself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT, help="folder for distributed.json and distributed.md")
    p.add_argument("--malloc", choices=sorted(WORKER_MALLOC), default="default",
                   help="glibc malloc settings of the worker processes (see WORKER_MALLOC): 'default' leaves the "
                   "environment as it is; 'mmap' raises the mmap threshold, 'keep' also keeps freed memory")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the worker processes are stopped")
    p.add_argument("--no-single", action="store_true",
                   help="skip the one-process fit of all rows (for data too large for one process)")
    p.add_argument("--fits", type=int, default=2, help="fits per worker (the first compiles; the last is timed)")
    # worker mode, started by the main run
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--shard", type=Path, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shard_path(folder: Path, i: int) -> Path:
    return folder / f"part-{i:05d}.parquet"


def write_shards(rows: int, processes: int, seed: int, folder: Path) -> list[Path]:
    """The data as ``processes`` Parquet files of contiguous row blocks (``part-00000.parquet``, ...), as a Spark
    or Dask job writing one file per partition leaves them: InstEval (``rows == 0``; ``service`` as 0/1), or
    simulated InstEval-shaped rows (grouping columns as integer codes), made one file at a time so that no
    process ever holds all of them."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, processes + 1).astype(np.int64)
    if rows:
        levels = simulate_levels(rows, np.random.default_rng(seed))
        for i in range(processes):
            part = simulate_rows(levels, int(bounds[i + 1] - bounds[i]), np.random.default_rng([seed, i]))
            part["service"] = part["service"].astype(np.int8)  # 0/1: one byte a row, as a careful writer stores it
            pd.DataFrame(part).to_parquet(shard_path(folder, i), engine="pyarrow", index=False)
    else:
        import lmevi

        data = lmevi.load_insteval()
        data = data.assign(service=(data["service"].astype(str) == "1").astype(np.int64))
        bounds = np.linspace(0, len(data), processes + 1).astype(np.int64)
        for i in range(processes):
            data.iloc[bounds[i] : bounds[i + 1]][["y", "service", "s", "d", "dept"]].to_parquet(
                shard_path(folder, i), engine="pyarrow", index=False)
    return [shard_path(folder, i) for i in range(processes)]


def summary(m, with_rows: bool = True) -> dict:
    """What is compared: fixed effects, SDs, ELBO, every random effect (by level), this process's fitted
    values (``with_rows``)."""
    out = {"fixef": m.fixef().to_dict(), "sd": m.sd().to_dict(), "elbo": float(m.elbo), "steps": int(m.steps),
           "converged": bool(m.converged)}
    if with_rows:
        re = m.ranef()
        out["ranef"] = {f"{g}:{lvl}": float(v) for g, lvl, v in zip(re["grpvar"], re["grp"], re["condval"])}
        out["fitted"] = np.asarray(m.fitted, dtype=np.float64).tolist()
    return out


def read_rows(paths: list[Path]) -> pd.DataFrame:
    """Parquet files as one frame: pyarrow reads them as one table, handed to pandas column by column
    (``self_destruct``), so that the rows are in memory about once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pq.read_table([str(p) for p in paths]).to_pandas(self_destruct=True, split_blocks=True)
    # pyarrow's allocator keeps the memory of the buffers it has freed (2 GB at 1e8 rows); hand it back
    pa.default_memory_pool().release_unused()
    return frame


def worker(args) -> None:
    """One process of the job: its own Parquet files in, the fit of all files out (JSON)."""
    import jax

    distributed = args.processes > 1
    if distributed:
        jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.process_id)
    import lmevi

    start = time.perf_counter()
    rows = read_rows(args.shard)
    read = time.perf_counter() - start
    options = dict(distributed=distributed, progress=False, dtype=args.dtype, q="structured")
    m = lmevi.fit(FORMULA, rows, **options)
    first = again = time.perf_counter() - start - read
    for _ in range(args.fits - 1):
        start = time.perf_counter()
        m = lmevi.fit(FORMULA, rows, **options)
        again = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    out = summary(m, with_rows=not args.no_single) | {
        "rows": len(rows), "read_seconds": read, "fit_seconds_first": first, "fit_seconds": again,
        "q": m.options.q, "devices": len(jax.devices()), "peak_rss_gb": peak}
    args.result.write_text(json.dumps(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# glibc's malloc hands every block above 32 MB back to the kernel when freed (mmap threshold) and trims the
# heap above 128 kB; a fit of 1e7+ rows frees and re-allocates row-length temporaries every sweep, and each
# fresh page costs a fault and a zeroing in the kernel. Measured at 1e7 rows (one worker, 8 Parquet files,
# float32, two fits): repeated fit 10.5 s with glibc's defaults, 6.4 s with "mmap", 5.3 s with "keep" (first
# call 12.9 / 10.1 / 8.3 s, peak RSS 2.2 / 2.6 / 3.2 GB). At 1e8 rows "keep" held on to the Parquet read's
# and the design's temporaries: 22 GB of RSS within 2 minutes, before the fit began (stopped there). Only the
# worker processes this script starts get them; lmevi itself changes no process-wide setting.
WORKER_MALLOC = {
    "default": {},
    "mmap": {"MALLOC_MMAP_THRESHOLD_": "2000000000"},
    "keep": {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "20000000000",
             "MALLOC_TOP_PAD_": "536870912"},
}


def worker_env(args) -> dict:
    """The environment of the worker processes (``--malloc``)."""
    return dict(os.environ) | WORKER_MALLOC[args.malloc]


def run_job(shards: list[Path], folder: Path, args) -> list[dict]:
    """Start one worker per process (process i reads files i, i + processes, ...), wait for all, return their
    results in process order."""
    coordinator = f"localhost:{free_port()}"
    procs, results = [], []
    for i in range(args.processes):
        result = folder / f"result-{i}.json"
        mine = [str(p) for p in shards[i :: args.processes]]
        cmd = [sys.executable, "-m", "experiments.distributed", "--worker", "--coordinator", coordinator,
               "--processes", str(args.processes), "--process-id", str(i), "--dtype", args.dtype, "--shard", *mine,
               "--result", str(result), "--fits", str(args.fits)] + (["--no-single"] if args.no_single else [])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=worker_env(args), cwd=HERE.parent))
        results.append(result)
    logs = []
    deadline = time.monotonic() + args.timeout
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, log) in enumerate(zip(procs, logs)):
        if proc.returncode != 0:
            raise RuntimeError(f"process {i} failed (exit {proc.returncode}):\n{log[-3000:]}")
    return [json.loads(r.read_text()) for r in results]


def compare(job: list[dict], single: dict) -> dict:
    """Largest differences between every process's fit and the one-process fit."""
    def max_diff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max(abs(a[k] - b[k]) for k in a)

    fitted = np.concatenate([np.asarray(r["fitted"]) for r in job])
    return {
        "fixef": max(max_diff(r["fixef"], single["fixef"]) for r in job),
        "sd": max(max_diff(r["sd"], single["sd"]) for r in job),
        "elbo": max(abs(r["elbo"] - single["elbo"]) for r in job),
        "ranef": max(max_diff(r["ranef"], single["ranef"]) for r in job),
        "fitted": float(np.max(np.abs(fitted - np.asarray(single["fitted"])))),
        "same_in_every_process": all(r["sd"] == job[0]["sd"] and r["ranef"] == job[0]["ranef"] for r in job),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    import lmevi

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        shards = write_shards(args.rows, args.files or args.processes, args.seed, folder)
        write_seconds = time.perf_counter() - start
        start = time.perf_counter()
        job = run_job(shards, folder, args)
        job_seconds = time.perf_counter() - start
        single = diffs = None
        if not args.no_single:
            parts = [read_rows([p]) for p in shards]
            data = pd.concat(parts, ignore_index=True)
            for c in data.columns:  # a factor stays one (concat of unequal categories would give text)
                if isinstance(parts[0][c].dtype, pd.CategoricalDtype):
                    data[c] = union_categoricals([part[c] for part in parts])
            lmevi.fit(FORMULA, data, q="structured", progress=False, dtype=args.dtype)  # compile: the next are warm
            times = []
            for _ in range(3):  # the fastest of 3: the machine is still settling after the job
                start = time.perf_counter()
                m = lmevi.fit(FORMULA, data, q="structured", progress=False, dtype=args.dtype)
                times.append(time.perf_counter() - start)
            single = summary(m) | {"seconds": min(times)}
            diffs = compare(job, single)
    n_rows = sum(r["rows"] for r in job)
    out = {
        "data": f"{n_rows:,} simulated InstEval-shaped rows" if args.rows else "InstEval (all 73,421 rows)",
        "formula": FORMULA,
        "processes": args.processes,
        "files": len(shards),
        "dtype": args.dtype,
        "worker_malloc": WORKER_MALLOC[args.malloc],
        "devices": job[0]["devices"],
        "rows_per_process": [r["rows"] for r in job],
        "q": job[0]["q"],
        "rows": n_rows,
        "fits_per_process": args.fits,
        "parquet_write_seconds": write_seconds,
        "job_seconds_whole": job_seconds,
        "peak_rss_gb_per_process": [r["peak_rss_gb"] for r in job],
        "fit_seconds_per_process": [r["fit_seconds"] for r in job],
        "fit_seconds_first_call_per_process": [r["fit_seconds_first"] for r in job],
        "parquet_read_seconds_per_process": [r["read_seconds"] for r in job],
        "single_process_fit_seconds": None if single is None else single["seconds"],
        "steps": {"distributed": job[0]["steps"], "single": None if single is None else single["steps"]},
        "converged": job[0]["converged"],
        "max_abs_diff_vs_single": diffs,
        "sd": {"distributed": job[0]["sd"], "single": None if single is None else single["sd"]},
        "fixef": job[0]["fixef"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "distributed.md").write_text(report(out))
    print(report(out))
    return out


def report(out: dict) -> str:
    if out["max_abs_diff_vs_single"] is None:
        return report_alone(out)
    d = out["max_abs_diff_vs_single"]
    lines = [
        "# A multi-process fit against one process",
        "",
        f"{out['data']}, `{out['formula']}`, q = {out['q']}: {out['processes']} processes "
        f"({out['devices']} CPU devices in all), each reading its own of {out['files']} Parquet files "
        f"({', '.join(f'{r:,}' for r in out['rows_per_process'])} rows), collectives through gloo, {out['dtype']}.",
        "",
        "| largest difference from the one-process fit | |",
        "|---|---|",
        f"| fixed effects | {d['fixef']:.2e} |",
        f"| SDs (random effects and residual) | {d['sd']:.2e} |",
        f"| ELBO | {d['elbo']:.2e} |",
        f"| random effects (every level) | {d['ranef']:.2e} |",
        f"| fitted values (every row, from the process that holds it) | {d['fitted']:.2e} |",
        f"| every process has the same estimates | {d['same_in_every_process']} |",
        "",
        f"Steps: {out['steps']['distributed']} (distributed), {out['steps']['single']} (one process). "
        f"Fit seconds per process (warm): {', '.join(f'{s:.2f}' for s in out['fit_seconds_per_process'])}; "
        f"first call {', '.join(f'{s:.2f}' for s in out['fit_seconds_first_call_per_process'])}; one process "
        f"holding every row: {out['single_process_fit_seconds']:.2f} s. The whole job (start, import, "
        f"read, two fits): {out['job_seconds_whole']:.1f} s. Processes on one 2-core machine share its cores: "
        "this shows the mechanism and its agreement, not a speed-up.",
        "",
    ]
    return "\n".join(lines)


def report_alone(out: dict) -> str:
    sd = ", ".join(f"{k} {v:.4f}" for k, v in out["sd"]["distributed"].items())
    return "\n".join([
        f"# A multi-process fit: {out['data']}",
        "",
        f"`{out['formula']}`, q = {out['q']}: {out['processes']} processes ({out['devices']} CPU devices in all), "
        f"reading {out['files']} Parquet files ({', '.join(f'{r:,}' for r in out['rows_per_process'])} rows per "
        f"process), {out['dtype']}; no one-process fit of the same rows to compare with (`--no-single`).",
        "",
        f"- fit (the slowest process; the last of {out['fits_per_process']} fits in each): "
        f"{max(out['fit_seconds_per_process']):.1f} s; first call {max(out['fit_seconds_first_call_per_process']):.1f} s "
        f"(reading the Parquet file: {max(out['parquet_read_seconds_per_process']):.1f} s more)",
        f"- peak RSS per process: {', '.join(f'{g:.2f}' for g in out['peak_rss_gb_per_process'])} GB "
        f"(sum {sum(out['peak_rss_gb_per_process']):.1f} GB)",
        f"- whole job (processes started, imports, reads, fits): {out['job_seconds_whole']:.1f} s; writing the "
        f"Parquet files before it: {out['parquet_write_seconds']:.1f} s",
        f"- steps {out['steps']['distributed']}, converged {out['converged']}; SDs: {sd}",
        "",
    ])


if __name__ == "__main__":
    main()
