"""Smoke test of ``python -m experiments.benchmark``: the quick run, in a fresh process from the repository's
root, writes every output with numbers that follow from each other. The harness's own helpers are checked in
fresh processes too (``python -c``), so that this test imports nothing from ``experiments``."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def _last_json(text: str):
    return json.loads(text.strip().splitlines()[-1])


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    _run(["-m", "experiments.benchmark", "--quick", "--out", str(out)])
    return out, json.loads((out / "benchmark.json").read_text())


def test_quick_run_writes_all_outputs(quick_run):
    out, _ = quick_run
    for name in ("benchmark.json", "benchmark.md", "insteval.csv", "targets.csv", "scaling.csv", "profile.csv",
                 "scaling.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_quick_run_json_keys_and_numbers(quick_run):
    out, _ = quick_run
    data = json.loads((out / "benchmark.json").read_text())
    assert {"insteval", "scaling", "machine", "targets", "profile"} <= set(data)
    ins = data["insteval"]
    for key in ("lme4_seconds", "ours_warm_seconds", "ours_cold_seconds", "speedup_vs_lme4",
                "speedup_cold_vs_lme4", "tutorial_seconds_per_step"):
        assert _positive(ins[key]), (key, ins[key])
    # mixedlm and NumPyro are skipped in the quick run: their entries are null, never a made-up number
    for key in ("mixedlm_seconds", "speedup_vs_mixedlm", "numpyro_seconds", "speedup_vs_numpyro"):
        assert ins[key] is None, (key, ins[key])
    assert math.isclose(ins["speedup_vs_lme4"], ins["lme4_seconds"] / ins["ours_warm_seconds"], rel_tol=1e-9)
    assert ins["lme4_source"] in ("saved", "measured")
    # the recommended fit reached the accuracy target it was timed at
    acc = ins["lmevi"]["float64"]["accuracy_at_target"]
    assert acc["s"] >= 0.999 and acc["d"] >= 0.99
    assert [row["n_obs"] for row in data["scaling"]] == [1_000, 10_000]
    for row in data["scaling"]:
        for key in ("seconds_per_eval", "seconds_per_sweep", "fit_seconds", "peak_rss_gb"):
            assert _positive(row[key]), (key, row[key])
        # the design stage's time is the median of several builds, not one sample
        assert 0 < row["design_seconds_min"] <= row["design_seconds"] <= row["design_seconds_max"]
    assert data["machine"]["cores"] >= 1 and data["machine"]["jax"]
    by_label = {t["target"]: t for t in data["targets"]}
    for t in data["targets"]:
        assert t["status"] in ("pass", "not yet", "not measured"), t
        # a target is "not measured" exactly where it has no value
        assert (t["status"] == "not measured") == (t["value"] is None), t
    # the quick run's sizes (1e3, 1e4) measure none of the 1e6- and 1e7-row targets
    for label in ("1e6 rows: one sweep <= 20 ms", "1e7 rows peak RSS <= 4 GB"):
        assert by_label[label]["status"] == "not measured", label
    # the speed targets ("warm >= 20x faster than lme4", ...): each value is the InstEval part's ratio, and the
    # status is "pass" exactly where that ratio reaches the factor the label states
    speed = {"warm >= 20x faster than lme4": "speedup_vs_lme4", "cold >= 3x faster than lme4": "speedup_cold_vs_lme4",
             "warm >= 5x faster than mixedlm": "speedup_vs_mixedlm", "warm >= 5x faster than NumPyro": "speedup_vs_numpyro"}
    for label, key in speed.items():
        t, v = by_label[label], ins[key]
        need = float(re.search(r">= (\d+)x", label).group(1))
        assert t["value"] == v, label
        assert t["status"] == ("not measured" if v is None else "pass" if v >= need else "not yet"), label


def test_a_sleeping_helper_counts_as_hung_and_a_busy_one_does_not():
    """The scaling part's deadlock watchdog: a process that uses no CPU for ``idle_timeout`` seconds is killed
    and marked hung; one that computes is left alone (1 s windows; each command lasts at most ~3 s)."""
    code = """
import json
from experiments.bench.harness import run_measured
slept = run_measured(["sleep", "30"], idle_timeout=1.0)
busy = run_measured(["python3", "-c", "import time\\nt = time.time()\\nwhile time.time() - t < 2.5: pass"],
                    idle_timeout=1.0)
print(json.dumps({k: {f: r[f] for f in ("hung", "timed_out", "wall_seconds", "returncode")}
                  for k, r in (("slept", slept), ("busy", busy))}))
"""
    got = _last_json(_run(["-c", code], timeout=120).stdout)
    slept, busy = got["slept"], got["busy"]
    assert slept["hung"] and slept["timed_out"] and slept["wall_seconds"] < 10
    assert not busy["hung"] and busy["returncode"] == 0


def test_lme4_extrapolation_uses_the_last_two_sizes_and_never_grows_slower_than_linear():
    code = """
import json
from experiments.bench.scaling import predict_lme4
cases = [[[10_000, 0.4]], [[10_000, 0.4], [100_000, 120.0]], [[10_000, 1.0], [100_000, 2.0]]]
print(json.dumps([predict_lme4([tuple(p) for p in c], 1_000_000) for c in cases]))
"""
    one, steep, flat = _last_json(_run(["-c", code], timeout=120).stdout)
    assert one is None
    # 0.4 s -> 120 s over a factor of 10 in rows: exponent log10(300) ~ 2.48
    assert math.isclose(steep, 120.0 * 300.0, rel_tol=1e-9)
    # faster than linear growth is read as linear
    assert math.isclose(flat, 20.0, rel_tol=1e-9)


def test_gpu_script_runs_on_whatever_device_and_records_the_target(tmp_path):
    """``python -m experiments.benchmark_gpu`` runs end to end on the default device (here the CPU) at a tiny size: the
    untimed run that warms the cache, the timed first call, the side-by-side first calls, and a record whose
    target row is that first call. The target size is shrunk to the tiny one so that every part runs."""
    _run(["-m", "experiments.benchmark_gpu", "--sizes", "2e3", "--warm-from", "2e3", "--target-rows", "2e3",
          "--repeats", "1", "--skip-insteval", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu.json").read_text())
    (row,) = res["scaling"]
    assert row["cache_warm_at_first_call"] is True and _positive(row["fit_seconds_first_call_warming_run"])
    assert all(_positive(v) for v in res["first_call_variants"].values())
    assert res["settings"]["target_rows"] == 2_000
    md = (tmp_path / "gpu.md").read_text()
    # the target row of the report is the first call at the target size, as measured
    assert "first call in a fresh process (warm compilation cache)" in md
    assert f"| {row['fit_seconds_first_call']:.2f} s |" in md
