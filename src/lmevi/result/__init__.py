"""The result layer: a fitted model in lme4's words, and the questions asked after the fit.

``fitresult`` (``FitResult``, ``make_result``, ``run_stages``), ``summary``, ``predict``, ``checks``
(convergence and singular fits), ``export`` (ArviZ), ``compare`` (``anova`` of nested fits) and the inference
after the fit: tests with Satterthwaite's and Kenward-Roger's degrees of freedom, F tests, profile and
bootstrap intervals, simulation and marginal means. A new test or interval is one module here and one method or
function that calls it.

It may import every layer below it (runtime, frame, families, q, exact, fitting); ``api`` and ``cli`` import it.
"""
