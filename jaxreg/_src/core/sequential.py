r"""``grad_strategy="sequential"``: per-term diagnostics whose memory does not grow with ``n``.

The materialised strategies (``"per_term"``, ``"vmap"``) hold every term's gradient at
once: ``n`` copies of ``x`` (or of the parameters). Here a ``lax.scan`` over the terms
computes one term's gradient per iteration (``lax.switch`` picks the term's VJP), adds
``w_i g_i`` to the running total and keeps only its squared norm, so the extra memory is
the running total and one gradient, whatever the number of terms.

The Gramian is built by columns without holding the gradients: column ``j`` of
:math:`G = J J^\top` is :math:`J g_j`, the directional derivatives of all terms along
term ``j``'s gradient: per term, one JVP of the model (``jax.linearize`` once, outside
the loop) and each term's own JVP in turn:

.. math:: G_{ij} = \langle \nabla r_i, g_j \rangle = \partial_t\, r_i(x + t\, g_j)|_{t=0}.

With ``grad_space="logits"`` the rows are :math:`P g_i` (``to_logit_space``), so the
direction is :math:`P^\top P g_j` and :math:`G_{ij} = \langle P g_i, P g_j \rangle`.

With a model stage the forward runs once, linearised: its transpose pulls each output
term's cotangent back (one VJP per term) and the linear map itself pushes ``g_j`` to the
outputs for the JVP column, both from the same saved residuals.

Values and metrics are evaluated once outside the loop (the loop needs only gradients,
and a ``switch`` needs every branch to return the same structure).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import axes
from jaxreg._src.core.linalg import to_logit_space
from jaxreg._src.core.plan import Plan
from jaxreg._src.core.stages import model_forward, stack_values

__all__ = ["materialised_bytes", "sequential"]


def materialised_bytes(n_terms: int, x: Any) -> int:
    """Bytes of the ``n`` stacked per-term gradients the materialised strategies hold."""
    return n_terms * sum(
        int(np.prod(np.shape(leaf))) * jnp.result_type(leaf).itemsize for leaf in jax.tree.leaves(x)
    )


def _logit_adjoint(v: jax.Array, logprobs: jax.Array) -> jax.Array:
    """``P^T v`` for the logit-space map ``P g = g - p * sum(g)``: ``v - sum(p * v)``."""
    p = jnp.exp(logprobs).astype(v.dtype)
    return v - jnp.sum(p * v, axis=-1, keepdims=True)


def _vdot(a: Any, b: Any, dtype) -> jax.Array:
    """``<a, b>`` over all leaves; under ``axis_name`` a sharded leaf's part is psum-ed."""
    return axes.total(
        [
            jnp.sum(u.astype(dtype) * v.astype(dtype))
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        ],
        jnp.zeros((), dtype),
    )


def sequential(plan: Plan, x: Any, batch: Any, w: jax.Array):
    """Values, metrics, ``w^T J`` and the Gramian (or its diagonal), one term at a time.

    Returns ``(values [n], metrics, grad, gram, None, aux)`` like ``program.jacobian``.
    """
    n = len(plan.terms)
    model = plan.forward is not None
    aux = None
    outputs = None
    if model:
        outputs, lin_model, aux = jax.linearize(
            lambda p: model_forward(plan, p, batch), x, has_aux=True
        )
        transpose = jax.linear_transpose(lin_model, x)
    values: list[Any] = [None] * n
    metrics: list[Any] = [None] * n

    def inputs_of(i: int, x_: Any, outputs_: Any) -> Any:
        return x_ if (not model or plan.reads_params[i]) else outputs_

    for i, term in enumerate(plan.terms):
        values[i], metrics[i] = term.evaluate(inputs_of(i, x, outputs), batch)
    values_arr = stack_values(values)
    acc = jnp.float64 if values_arr.dtype == jnp.float64 else jnp.float32

    def branch(i: int):
        term = plan.terms[i]

        def grad_i(_):
            through_model = model and not plan.reads_params[i]
            inputs = outputs if through_model else x
            g = jax.grad(lambda v: term.evaluate(v, batch)[0].astype(acc))(inputs)
            if through_model:
                (g,) = transpose(g)
            if plan.grad_space == "logits":
                g = to_logit_space(g, x)
            return jax.tree.map(lambda a, ref: a.astype(jnp.result_type(ref)), g, x)

        return grad_i

    branches = [branch(i) for i in range(n)]

    if plan.grad_conflicts:

        def directional(i: int):
            term = plan.terms[i]
            through_model = model and not plan.reads_params[i]

            def jvp_i(tangents):
                d, dout = tangents
                inputs, tangent = (outputs, dout) if through_model else (x, d)
                return jax.jvp(
                    lambda v: term.evaluate(v, batch)[0].astype(acc), (inputs,), (tangent,)
                )[1]

            return jvp_i

        jvps = [directional(i) for i in range(n)]

        def column(g: Any) -> jax.Array:
            # The model's JVP once; then each term's JVP in turn (a loop, so that no
            # two terms' temporaries are alive together).
            d = _logit_adjoint(g, x) if plan.grad_space == "logits" else g
            dout = lin_model(d) if model else None

            def one(k, col):
                return col.at[k].set(jax.lax.switch(k, jvps, (d, dout)))

            return jax.lax.fori_loop(0, n, one, jnp.zeros((n,), acc))

    def body(carry, i):
        grad, sq = carry
        g = jax.lax.switch(i, branches, None)
        wi = w[i]
        grad = jax.tree.map(lambda a, b: a + wi.astype(b.dtype) * b, grad, g)
        if plan.grad_conflicts:
            return (grad, sq.at[:, i].set(column(g))), None
        return (grad, sq.at[i].set(_vdot(g, g, acc))), None

    zeros = jax.tree.map(jnp.zeros_like, x)
    init_sq = jnp.zeros((n, n) if plan.grad_conflicts else (n,), acc)
    (grad, gram), _ = jax.lax.scan(body, (zeros, init_sq), jnp.arange(n, dtype=jnp.int32))
    if plan.grad_conflicts:
        gram = (gram + gram.T) / 2
    return values_arr, metrics, grad, gram, None, aux
