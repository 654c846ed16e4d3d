"""The exact layer: lme4's profiled ML/REML criterion by blocked elimination (Bates et al. 2015; MixedModels.jl).

``structure`` (cross-products that do not depend on theta), ``covfactors`` (lme4's ``theta`` and the
``Lambda_k`` it makes), ``criterion`` (the criterion with its custom gradients, on JAX or NumPy), ``estimates``
(conditional modes, beta, sigma and their covariances at a theta), ``hostlapack`` (the hybrid path: the
host's LAPACK for the dense block), ``evaluate`` (the criterion as functions of a NumPy theta), ``optimise``
(BOBYQA, Newton, L-BFGS-B: ``fit_exact``) and ``devfun`` (lme4's ``devfun``, public).

It may import the runtime, frame and families layers; not q, its sibling.
"""
