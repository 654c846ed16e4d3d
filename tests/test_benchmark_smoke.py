"""Smoke test of experiments/benchmark.py: the quick run writes every output with sane numbers."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"
sys.path.insert(0, str(SCRIPT.parent))
from bench.harness import run_measured  # noqa: E402
from bench.scaling import predict_lme4  # noqa: E402


def _load():
    spec = importlib.util.spec_from_file_location("lmevi_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    result = _load().main(["--quick", "--out", str(out)])
    return out, result


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
        assert ins[key] is None or _positive(ins[key]), (key, ins[key])
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
    assert all(t["status"] in ("pass", "not yet", "not measured") for t in data["targets"])


def test_a_sleeping_helper_counts_as_hung_and_a_busy_one_does_not():
    """The scaling part's deadlock watchdog: a process that uses no CPU for ``idle_timeout`` seconds is killed
    and marked hung; one that computes is left alone (1 s windows; each command lasts at most ~3 s)."""
    slept = run_measured(["sleep", "30"], idle_timeout=1.0)
    assert slept["hung"] and slept["timed_out"] and slept["wall_seconds"] < 10
    busy = run_measured(["python3", "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass"],
                              idle_timeout=1.0)
    assert not busy["hung"] and busy["returncode"] == 0


def test_lme4_extrapolation_uses_the_last_two_sizes_and_never_grows_slower_than_linear():
    assert predict_lme4([(10_000, 0.4)], 1_000_000) is None
    # 0.4 s -> 120 s over a factor of 10 in rows: exponent log10(300) ~ 2.48
    assert math.isclose(predict_lme4([(10_000, 0.4), (100_000, 120.0)], 1_000_000), 120.0 * 300.0, rel_tol=1e-9)
    # faster than linear growth is read as linear
    assert math.isclose(predict_lme4([(10_000, 1.0), (100_000, 2.0)], 1_000_000), 20.0, rel_tol=1e-9)


def test_gpu_script_runs_on_whatever_device_and_records_the_target(tmp_path, monkeypatch):
    """experiments/benchmark_gpu.py runs end to end on the default device (here the CPU) at a tiny size: the
    untimed run that warms the cache, the timed first call, the side-by-side first calls, and a record whose
    target row is that first call. The target size is shrunk to the tiny one so that every part runs."""
    spec = importlib.util.spec_from_file_location("lmevi_benchmark_gpu", SCRIPT.parent / "benchmark_gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(gpu, "TARGET_ROWS", 2_000)
    res = gpu.main(["--sizes", "2e3", "--warm-from", "2e3", "--repeats", "1", "--skip-insteval",
                    "--out", str(tmp_path)])
    (row,) = res["scaling"]
    assert row["cache_warm_at_first_call"] is True and _positive(row["fit_seconds_first_call_warming_run"])
    assert all(_positive(v) for v in res["first_call_variants"].values())
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu.target_row(saved)["seconds"] == row["fit_seconds_first_call"]
    assert "first call in a fresh process (warm compilation cache)" in (tmp_path / "gpu.md").read_text()
