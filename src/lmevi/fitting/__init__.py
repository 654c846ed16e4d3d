"""The fitting layer: the stages between a formula and the estimates, as lme4's ``optimizeLmer``.

``build`` (``build_model``: design, q's layout, the one rule for ``q="auto"``; ``Problem``), ``control``
(``FitSettings``, lme4's ``lmerControl``), ``stage`` (``fit_model``: variational EM or lme4's criterion,
refusing settings a model cannot honour), ``loops`` (the compiled loops, SQUAREM), ``glmm`` (the
working-response step of a generalized model) and ``scaling`` (fitting in standardised units, reporting in
the data's).

It may import the runtime, frame, families, q and exact layers.
"""
