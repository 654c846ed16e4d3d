"""Smoke test of ``python -m experiments.latency``: a quick run without R, in a fresh process from the
repository's root, writes the JSON and the report with numbers that follow from each other."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LME4_SLEEPSTUDY = ROOT / "results" / "lme4" / "corpus" / "sleepstudy"
ARGS = ["--quick", "--skip-r", "--models", "dyestuff"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    # one corpus model (two fits) keeps the run to a few fresh processes
    res = subprocess.run([sys.executable, "-m", "experiments.latency", *ARGS, "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out, json.loads((out / "latency.json").read_text())


def test_quick_run_writes_json_and_report(quick_run):
    out, data = quick_run
    assert data["settings"]["argv"] == [*ARGS, "--out", str(out)]
    md = (out / "latency.md").read_text()
    assert "| measurement | lmevi | lme4 | mixedlm | lmevi / lme4 | target | status |" in md
    assert "LMEVI_CACHE_DIR=off" in md
    assert f"Written by `python -m experiments.latency {' '.join(data['settings']['argv'])}`" in md


def test_quick_run_keys_and_numbers(quick_run):
    _, data = quick_run
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
    # The child's default fit of sleepstudy (REML, lme4's exact criterion) against lme4's saved sigma: lmevi's
    # exact fits match lme4 to about 1e-8 relative where both reach the optimum; 1e-6 leaves room for lme4's own
    # stopping rule (its optimizer's tolerance on the criterion) and fails on any real difference of the fit.
    sigma = json.loads((LME4_SLEEPSTUDY / "fit_reml.json").read_text())["sigma"]
    sigma = sigma[0] if isinstance(sigma, list) else sigma
    assert ss["in_process"]["lmevi"]["sd"]["Residual"] == pytest.approx(sigma, rel=1e-6)

    co = data["corpus"]
    assert co["fits"] == 2 and co["models"] == 1
    for key in ("lmevi_seconds_warm_cache", "lmevi_seconds_empty_cache"):
        assert _positive(co[key]), (key, co[key])
    assert co["lme4_seconds"] is None and co["ratio"] is None
    assert co["lmevi_failures"] == 0
    # the warning count is the sum of the per-fit counts and of the counts by category
    assert co["lmevi_warnings"] == sum(f["lmevi_warnings"] for f in co["per_fit"])
    assert co["lmevi_warnings"] == sum(co["lmevi_warnings_by_category"].values())
    assert [(f["name"], f["kind"]) for f in co["per_fit"]] == [("dyestuff", "reml"), ("dyestuff", "ml")]
    assert math.isclose(co["lmevi_seconds_warm_cache"], sum(f["lmevi_seconds_warm_cache"] for f in co["per_fit"]))

    ie = data["insteval_fresh_process"]
    assert {"lmevi_seconds", "lme4_seconds", "mixedlm_seconds"} <= set(ie)
    assert ie["lmevi_seconds"] is None and ie["notes"]  # not run by --quick, and the report says so
    assert data["test_suite_seconds"] is None

    m = data["machine"]
    assert m["cores"] >= 1 and m["python"] and m["jax"]


def test_quick_run_target_status_follows_the_numbers(quick_run):
    _, data = quick_run
    by_key = {t["key"]: t for t in data["targets"]}
    new_size = data["sleepstudy"]["in_process_new_size"]
    assert by_key["new_size"]["status"] == ("met" if new_size <= 0.05 else "not met")
    warm = data["sleepstudy"]["fresh_process_warm_cache"]
    assert by_key["sleepstudy_warm"]["status"] == ("met" if warm <= 1.5 else "not met")
    for key in ("sleepstudy_vs_lme4", "corpus_ratio", "insteval_warm", "test_suite"):
        assert by_key[key]["status"] == "not measured", key
