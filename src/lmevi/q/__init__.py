"""The q layer: variational families over the random effects, and the log joint they approximate.

``protocol`` (what a q family provides; ``VIParams``), ``registry`` (q's names, ``lmevi.fit(q=...)``),
``variational`` (the block-Gaussian family: the structured and mean-field layouts' kernels), ``layout`` (its
NumPy choice of blocks), ``model`` (the log joint and ``ModelParams``), ``elbo`` (the closed-form and Monte
Carlo ELBO) and ``cavi`` (the block-Gaussian family's closed-form coordinate ascent). A new q is one module
implementing the protocol and one line in the registry; the stages above reach it only through the protocol.

It may import the runtime, frame and families layers; not exact, its sibling.
"""
