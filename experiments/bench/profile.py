"""Profile of one coordinate-ascent sweep: what limits the speed.

:func:`worker_profile` (the ``profile`` helper mode of ``benchmark.py``) times the stages of one sweep
at the fitted parameters on simulated InstEval-shaped data, and alternatives for its passes over the
rows (scatter-adds, gathers, one-hot products, a plain elementwise pass); :func:`profile_summary` puts the
measurements into a few sentences.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from experiments.bench.accuracy import FACTORS
from experiments.bench.harness import log, time_call, worker
from experiments.bench.stages import (jitted_block_updates, jitted_elbo, jitted_m_step, jitted_row_moments, jitted_sweep,
                                      structured_problem)
from experiments.simulate import simulate
from lmevi.runtime.precision import x64


def profile_part(args) -> dict:
    """The sweep profile at ``--profile-size`` rows, in a fresh process (the quick run: in this one, light)."""
    log(f"profile of one sweep at {args.profile_size:,} rows ...")
    if args.quick:  # in this process: the quick run checks the code path, not the memory of one size
        return worker_profile(argparse.Namespace(n_obs=args.profile_size, seed=args.seed, repeats=1, light=True))
    return worker("profile", "--n-obs", str(args.profile_size), "--seed", str(args.seed),
                  "--repeats", str(max(args.repeats, 5)), *(["--light"] if args.quick else []))


@x64  # the stages are called directly, outside the 64-bit scope of ``lmevi.fit``: 64-bit for this call only
def worker_profile(args) -> dict:
    """Time the pieces of one coordinate-ascent sweep, and alternatives for its passes over the rows.

    Pieces are timed as separately jitted functions at the fitted parameters (median of ``--repeats`` calls
    after a compiling one); inside the sweep XLA fuses some of them, so they need not add up to the sweep.
    """
    import jax
    import jax.numpy as jnp

    import lmevi

    warnings.simplefilter("ignore", lmevi.ConvergenceWarning)
    df, _ = simulate(args.n_obs, args.seed)
    reps = args.repeats
    problem, params = structured_problem(df)
    design = problem.design
    n, y = args.n_obs, design.y  # the arrays have the fit's padding rows besides
    pieces = []

    def jit(fn, *static):
        # arrays go in as arguments: captured in a closure they would become constants of the program
        return jax.jit(fn, static_argnums=static)

    def add(key, name, compiled, *a, note=""):
        ms = 1e3 * time_call(compiled, *a, repeats=reps)
        pieces.append({"key": key, "piece": name, "ms": ms, "note": note})

    add("sweep", "one sweep (block updates + M-step)", jitted_sweep(), problem, params)
    if not args.light:
        add("updates", "block updates", jitted_block_updates(), problem, params)
        add("mstep", "M-step (row moments, sigma, Sigma_k, ELBO)", jitted_m_step(), problem, params)
        add("moments", "row moments (mean and variance of every row)", jitted_row_moments(), problem, params)
        add("elbo", "closed-form ELBO", jitted_elbo(), problem, params)
    for k, name in enumerate(FACTORS):
        term = design.terms[k]
        g, J = term.index, term.n_levels
        order = np.argsort(np.asarray(g), kind="stable")
        gs, ys = jnp.asarray(np.asarray(g)[order]), y[order]
        add(f"seg_{name}", f"segment_sum over {name} ({J:,} levels)",
            jit(lambda r, g, J: jax.ops.segment_sum(r, g, J), 2), y, g, J, note="rows in data order")
        add(f"segsorted_{name}", f"segment_sum over {name}, rows sorted, indices_are_sorted=True",
            jit(lambda r, g, J: jax.ops.segment_sum(r, g, J, indices_are_sorted=True), 2), ys, gs, J)
        add(f"bincount_{name}", f"jnp.bincount over {name}",
            jit(lambda r, g, J: jnp.bincount(g, weights=r, length=J), 2), y, g, J)
        add(f"gather_{name}", f"gather b[{name}] to the rows", jit(lambda b, g: b[g]),
            jnp.linspace(0.0, 1.0, J, dtype=y.dtype), g)
    dept = design.terms[2]
    onehot = jax.nn.one_hot(dept.index, dept.n_levels, dtype=y.dtype)
    add("onehot_dept", f"one-hot matmul over dept, (n_obs x {dept.n_levels})^T r", jit(lambda oh, r: oh.T @ r),
        onehot, y, note="alternative to its segment_sum")
    # the sweep no longer builds the small block's one-hot design W (departments' indicators and X); its
    # products are timed here as the alternative that the gathers and segment sums replaced
    W = jnp.concatenate([onehot, design.X], axis=1)
    pw = W.shape[1]
    add("W_mean", f"W @ m_w, one-hot W ({n:,} x {pw})", jit(lambda W, v: W @ v), W, jnp.ones(pw, y.dtype),
        note="former mean of the small block (departments and beta)")
    add("Wt_r", f"W^T r, one-hot W ({n:,} x {pw})", jit(lambda W, r: W.T @ r), W, y,
        note="former right-hand side of the small block")
    add("W_var", f"row sums of squares of W @ U, U ({pw} x {pw})",
        jit(lambda W, U: jnp.sum((W @ U) ** 2, axis=-1)), W, jnp.eye(pw, dtype=y.dtype),
        note="former variance of the small block")
    add("stream", "one elementwise pass, sum((y - r)^2)", jit(lambda y, r: jnp.sum((y - r) ** 2)), y, y * 0.5,
        note="memory-bandwidth floor of a pass over the rows")
    if not args.light:
        order = np.argsort(df["s"].cat.codes.to_numpy(), kind="stable")
        sorted_problem, _ = structured_problem(df.iloc[order].reset_index(drop=True))
        add("sweep_sorted", "one sweep, rows sorted by student", jitted_sweep(), sorted_problem, params,
            note="same sweep; only the row order differs")
    return {"n_obs": n, "pieces": pieces, "summary": profile_summary(n, pieces, pw)}


def profile_summary(n: int, pieces: list[dict], pw: int) -> str:
    """A few sentences on what one sweep spends its time on, from the measured pieces."""
    ms = {p["key"]: p["ms"] for p in pieces}
    parts = [f"At {n:,} simulated rows one sweep takes {ms['sweep']:.3g} ms"]
    if "updates" in ms:
        parts[0] += (f" (block updates {ms['updates']:.3g} ms, M-step {ms['mstep']:.3g} ms, each compiled on its "
                     f"own); the sweep needs only the sum of the rows' variances, from per-level tables, while "
                     f"computing every row's mean and variance on its own takes {ms['moments']:.3g} ms")
    seg = sum(ms[f"seg_{f}"] for f in FACTORS)
    gat = sum(ms[f"gather_{f}"] for f in FACTORS)
    parts.append(
        f"Per pass over the rows, the three scatter-adds (segment_sum) take {seg:.3g} ms "
        f"(students {ms['seg_s']:.3g}, instructors {ms['seg_d']:.3g}, departments {ms['seg_dept']:.3g}), the three "
        f"gathers {gat:.3g} ms; the one-hot products with W ({pw} columns) that the sweep no longer makes would take {ms['W_mean']:.3g} ms for the mean, "
        f"{ms['Wt_r']:.3g} ms for W^T r and {ms['W_var']:.3g} ms for the variance, against {ms['stream']:.3g} ms for a plain elementwise pass"
    )
    parts.append(
        f"Alternatives: sorted rows with indices_are_sorted=True {ms['segsorted_s']:.3g} ms for the students' "
        f"segment_sum, jnp.bincount {ms['bincount_s']:.3g} ms, and for the 14 departments a one-hot matmul "
        f"{ms['onehot_dept']:.3g} ms against {ms['seg_dept']:.3g} ms"
        + (f"; the whole sweep on rows sorted by student takes {ms['sweep_sorted']:.3g} ms"
           if "sweep_sorted" in ms else "")
    )
    top = sorted((p for p in pieces if p["key"] not in ("sweep", "updates", "mstep", "moments", "elbo",
                                                            "sweep_sorted")), key=lambda p: -p["ms"])[:3]
    parts.append("The costliest single pieces: " + "; ".join(f"{p['piece']} {p['ms']:.3g} ms" for p in top))
    return ". ".join(parts) + "."
