"""The parts of the benchmark run by ``python -m experiments.benchmark``.

* :mod:`bench.harness`: measured subprocesses (wall time, peak RSS, a watchdog for hung ones), the
  helper processes that re-run ``benchmark.py --worker ...``, timing summaries, the machine description
  and the log;
* :mod:`bench.accuracy`: the InstEval model, lme4's reference conditional modes and the accuracy target
  every method is timed to;
* :mod:`bench.insteval_race`: the InstEval timings of lmevi (recommended and tutorial configurations,
  structured against mean-field q) and the summary of the whole InstEval part;
* :mod:`bench.baselines`: lme4 through ``Rscript``, mixedlm and NumPyro on InstEval;
* :mod:`bench.scaling`: the timings at growing row counts;
* :mod:`bench.stages`: lmevi's fitting stages called one at a time (design, structured q, sweep, ELBO);
* :mod:`bench.profile`: the profile of one coordinate-ascent sweep;
* :mod:`bench.writing`: tables, the markdown report, the scaling plot and the output files.

Importing the package changes no global setting: the scaling and profile parts, which call lmevi's stages
directly, outside the 64-bit scope of ``lmevi.fit``, run their own calls in 64-bit
(``lmevi.runtime.precision.x64``), and the entry scripts choose matplotlib's backend in their ``main``.
"""
