"""The families layer: the likelihood seam, as R's ``family`` objects and statsmodels' ``families``.

``base`` (the protocol every likelihood provides, and ``Generalized``, what follows from a log-density, a
variance function and a link), ``links`` (identity, log, logit, probit, cloglog, inverse, sqrt), one file per
family (``gaussian``, ``poisson``, ``binomial``), ``quadrature`` (Gauss-Hermite expectations) and
``registry`` (lme4's ``family=`` names). A new family is one file and one line in the registry; a new link is
one class in ``links``.

It may import the runtime layer only (and its own modules).
"""
