"""Smoke test of experiments/latency.py: a quick run without R writes the JSON and the report with sane numbers."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "latency.py"


def _load():
    spec = importlib.util.spec_from_file_location("lmevi_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    # one corpus model (two fits) keeps the run to a few fresh processes
    result = _load().main(["--quick", "--skip-r", "--models", "dyestuff", "--out", str(out)])
    return out, result


def test_quick_run_writes_json_and_report(quick_run):
    out, result = quick_run
    data = json.loads((out / "latency.json").read_text())
    assert data == result
    md = (out / "latency.md").read_text()
    assert "| measurement | lmevi | lme4 | mixedlm | lmevi / lme4 | target | status |" in md
    assert "LMEVI_CACHE_DIR=off" in md


def test_quick_run_keys_and_numbers(quick_run):
    out, _ = quick_run
    data = json.loads((out / "latency.json").read_text())
    assert {"import_seconds", "sleepstudy", "corpus", "insteval_fresh_process", "test_suite_seconds",
            "machine"} <= set(data)
    assert _positive(data["import_seconds"])

    ss = data["sleepstudy"]
    for key in ("fresh_process_empty_cache", "fresh_process_warm_cache", "in_process_new_size",
                "in_process_new_structure"):
        assert _positive(ss[key]), (key, ss[key])
    assert "lme4_fresh_process" in ss and ss["lme4_fresh_process"] is None  # --skip-r: null, never made up
    assert [s["n_rows"] for s in ss["in_process"]["lmevi"]["new_sizes"]] == [170]
    assert ss["in_process"]["lmevi"]["cache_dir"] is None  # the in-process child ran with the cache off
    # the fit printed sleepstudy's SDs, near lme4's REML ones (24.74, 5.92, 25.59)
    assert abs(ss["in_process"]["lmevi"]["sd"]["Residual"] - 25.59) < 0.5

    co = data["corpus"]
    assert co["fits"] == 2 and co["models"] == 1
    for key in ("lmevi_seconds_warm_cache", "lmevi_seconds_empty_cache"):
        assert _positive(co[key]), (key, co[key])
    assert co["lme4_seconds"] is None and co["ratio"] is None
    assert co["lmevi_failures"] == 0
    assert isinstance(co["lmevi_warnings"], int) and co["lmevi_warnings"] >= 0
    assert [(f["name"], f["kind"]) for f in co["per_fit"]] == [("dyestuff", "reml"), ("dyestuff", "ml")]
    assert math.isclose(co["lmevi_seconds_warm_cache"], sum(f["lmevi_seconds_warm_cache"] for f in co["per_fit"]))

    ie = data["insteval_fresh_process"]
    assert {"lmevi_seconds", "lme4_seconds", "mixedlm_seconds"} <= set(ie)
    assert ie["lmevi_seconds"] is None and ie["notes"]  # not run by --quick, and the report says so
    assert data["test_suite_seconds"] is None

    m = data["machine"]
    assert m["cores"] >= 1 and m["python"] and m["jax"]


def test_quick_run_target_status_follows_the_numbers(quick_run):
    out, _ = quick_run
    data = json.loads((out / "latency.json").read_text())
    by_key = {t["key"]: t for t in data["targets"]}
    new_size = data["sleepstudy"]["in_process_new_size"]
    assert by_key["new_size"]["status"] == ("met" if new_size <= 0.05 else "not met")
    warm = data["sleepstudy"]["fresh_process_warm_cache"]
    assert by_key["sleepstudy_warm"]["status"] == ("met" if warm <= 1.5 else "not met")
    for key in ("sleepstudy_vs_lme4", "corpus_ratio", "insteval_warm", "test_suite"):
        assert by_key[key]["status"] == "not measured", key
