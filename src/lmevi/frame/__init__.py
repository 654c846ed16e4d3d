"""The frame layer: from an lme4 formula and a DataFrame to immutable arrays, as lme4's ``lFormula``.

``formula`` (the formula's parts), ``rsyntax`` (R's expressions in formulaic), ``labels`` (the level labels
lme4 prints), ``design`` (the design stage: ``Design``, ``DesignInfo``; no dense Z anywhere), ``matrix``
(model matrices), ``newdata`` (new rows in a fitted design's encoding, for ``predict`` and ``emmeans``) and
``data`` (lme4's InstEval and the tutorial's split).

It may import the runtime layer only.
"""
