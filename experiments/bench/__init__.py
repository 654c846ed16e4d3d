"""The parts of the benchmark run by ``experiments/benchmark.py``.

* :mod:`bench.harness`: measured subprocesses (wall time, peak RSS, a watchdog for hung ones), the
  helper processes that re-run ``benchmark.py --worker ...``, timing summaries, the machine description
  and the log;
* :mod:`bench.accuracy`: the InstEval model, lme4's reference conditional modes and the accuracy target
  every method is timed to;
* :mod:`bench.insteval_race`: the InstEval timings of lmevi (recommended and tutorial configurations,
  structured against mean-field q) and the summary of the whole InstEval part;
* :mod:`bench.baselines`: lme4 through ``Rscript``, mixedlm and NumPyro on InstEval;
* :mod:`bench.scaling`: simulated InstEval-shaped data and the timings at growing row counts;
* :mod:`bench.stages`: lmevi's fitting stages called one at a time (design, structured q, sweep, ELBO);
* :mod:`bench.profile`: the profile of one coordinate-ascent sweep;
* :mod:`bench.writing`: tables, the markdown report, the scaling plot and the output files.

Importing the package switches JAX to 64-bit types: the scaling and profile parts call lmevi's stages
directly, outside the 64-bit scope of ``lmevi.fit``.
"""

import jax

jax.config.update("jax_enable_x64", True)
