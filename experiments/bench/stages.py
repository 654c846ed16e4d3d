"""lmevi's fitting stages, one at a time, on the benchmark's model.

``lmevi.fit`` runs its stages inside one compiled loop; the scaling and profile parts time them apart.
:func:`structured_problem` builds what the compiled kernels of a fit of :data:`bench.accuracy.FORMULA`
take, as ``lmevi.fit`` builds it (the design in float64 in standardised units, rows and levels padded to
their buckets, the structured variational family with REML, the per-block cross-products, sigma estimated),
with the fitted parameters, and the ``jitted_*`` functions compile one stage each. Every
compiled stage takes ``(problem, params)``: the arrays go in as arguments (captured in a closure an array
would become a constant of the compiled program), the problem's structure is static.
"""

from __future__ import annotations

from experiments.bench.accuracy import FORMULA


def structured_problem(frame, model=None):
    """``(problem, params)``: the kernels' ``Problem`` of ``lmevi.fit(FORMULA, frame, q="structured")`` and
    the parameters that fit reaches (in the problem's units); ``model``: that fit's ``lmevi.build_model``,
    when the caller has built it already."""
    import lmevi

    if model is None:
        model = lmevi.build_model(FORMULA, frame, q="structured")
    params, _ = lmevi.fit_model(model, lmevi.fit_settings(method="cavi"))
    return model.problem, params


def jitted_sweep():
    """One coordinate-ascent sweep: block updates, then the M-step."""
    import jax

    from lmevi.q import cavi

    return jax.jit(cavi.sweep)


def jitted_block_updates():
    """The block updates of a sweep."""
    import jax

    from lmevi.q import cavi

    return jax.jit(cavi.update_blocks)


def jitted_m_step():
    """The M-step of a sweep (row moments, sigma, Sigma_k, ELBO)."""
    import jax

    from lmevi.q import cavi

    return jax.jit(cavi.m_step)


def jitted_row_moments():
    """Mean and variance under q of every row's random part."""
    import jax


    from lmevi.q import moments
    return jax.jit(lambda pr, p: moments.row_moments(pr.design, pr.spec, p.blocks, pr.block_data))


def jitted_elbo():
    """The closed-form ELBO."""
    import jax

    from lmevi.q import elbo as elbo_lib

    return jax.jit(elbo_lib.closed_form)


def jitted_elbo_and_grad():
    """The closed-form ELBO and its gradient in the parameters."""
    import jax

    from lmevi.q import elbo as elbo_lib

    return jax.jit(jax.value_and_grad(elbo_lib.closed_form, argnums=1))
