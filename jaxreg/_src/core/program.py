"""The compiled core of ``compose``: pure functions of a ``Plan`` and arrays.

``run`` is what [`jaxreg.Objective`][jaxreg.Objective] jits: weights (with schedules), then
either exactly one ``value_and_grad`` of the weighted sum (no diagnostics) or every
term's own gradient by groups (``jacobian``), then the packed output.

With a model stage (``plan.forward``) the forward runs once: terms on its outputs are
differentiated with respect to the outputs, and each output term's cotangent is pulled
back through the one saved forward; terms on the parameters are differentiated
directly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import axes
from jaxreg._src.core.errors import TermError
from jaxreg._src.core.linalg import cross_gram, to_logit_space, weighted_rows
from jaxreg._src.core.output import CompositeOutput, pack
from jaxreg._src.core.plan import Plan
from jaxreg._src.core.sequential import materialised_bytes, sequential
from jaxreg._src.core.stages import evaluate_terms, model_forward, stack_values
from jaxreg._src.core.strategy import auto_groups

__all__ = ["jacobian", "run", "value_and_grad"]


def run(plan: Plan, x: Any, batch: Any, w: jax.Array, step: Any) -> CompositeOutput:
    """The whole objective at ``x``: values, metrics, gradient(s) and the packed output.

    Args:
      plan: what to compute.
      x: the differentiated input (array or pytree).
      batch: what the terms read besides ``x``.
      w: ``[n]`` float32 weights; NaN where a term's schedule is evaluated at ``step``.
      step: the schedules' step (an int32 array), or ``None`` without schedules.
    """
    check_shard_map_axes(plan.axis_name)
    if plan.grad_space == "logits":
        check_logprobs_input(x)
    check_differentiable(x)
    with axes.reducing_over(plan.axis_name):
        w = resolve_weights(plan, w, step)
        if plan.needs_jacobian and use_sequential(plan, x):
            values, metrics, grad, gram, jac, aux = sequential(plan, x, batch, w)
        elif plan.needs_jacobian:
            values, metrics, grad, gram, jac, aux = jacobian(plan, x, batch, w)
        else:
            values, metrics, grad, aux = value_and_grad(plan, x, batch, w)
            gram = jac = None
        return _output(plan, values, metrics, grad, w, gram, jac, aux)


def use_sequential(plan: Plan, x: Any) -> bool:
    """Whether the per-term gradients are accumulated one at a time (trace time).

    ``grad_strategy="sequential"``, or ``"auto"`` with a ``memory_budget`` that the ``n``
    stacked gradients would exceed. ``term_grads=True`` returns every gradient, so it
    always materialises them.
    """
    if plan.term_grads:
        return False
    if plan.grad_strategy == "sequential":
        return True
    return (
        plan.grad_strategy == "auto"
        and plan.memory_budget is not None
        and materialised_bytes(len(plan.terms), x) > plan.memory_budget
    )


def resolve_weights(plan: Plan, w: jax.Array, step: Any) -> jax.Array:
    """Evaluates the schedules at ``step`` where ``w`` is NaN."""
    if not plan.scheduled:
        return w
    weights = []
    for i, term in enumerate(plan.terms):
        if term.scheduled:
            sched = jnp.asarray(term.weight(step)).astype(jnp.float32)  # type: ignore[operator]
            weights.append(jnp.where(jnp.isnan(w[i]), sched, w[i]))
        else:
            weights.append(w[i])
    return jnp.stack(weights)


def value_and_grad(plan: Plan, x: Any, batch: Any, w: jax.Array):
    """Exactly one ``value_and_grad`` of the weighted sum (one forward, one backward).

    Returns ``(values [n], metrics, grad, aux)``.
    """
    n = len(plan.terms)
    on_params = [i for i in range(n) if plan.reads_params[i]]
    on_outputs = [i for i in range(n) if not plan.reads_params[i]]

    def total(x):
        values: list[Any] = [None] * n
        metrics: list[Any] = [None] * n
        parts = [(on_params, x)]
        aux = None
        if plan.forward is not None:
            outputs, aux = model_forward(plan, x, batch)
            parts.append((on_outputs, outputs))
        else:
            parts.append((on_outputs, x))
        for indices, inputs in parts:
            if not indices:
                continue
            vals, mets = evaluate_terms(plan, indices, inputs, batch)
            for k, i in enumerate(indices):
                values[i], metrics[i] = vals[k], mets[k]
        stacked = stack_values(values)
        return jnp.dot(w.astype(stacked.dtype), stacked), (stacked, metrics, aux)

    (_, (values, metrics, aux)), grad = jax.value_and_grad(total, has_aux=True)(x)
    if plan.grad_space == "logits":
        grad = to_logit_space(grad, x)
    return values, metrics, grad, aux


def _rows(f, inputs: Any, size: int):
    """``f``'s values, its Jacobian's rows ``[size, ...inputs]`` and its metrics."""
    vals, pullback, mets = jax.vjp(f, inputs, has_aux=True)
    if size == 1:
        jac = jax.tree.map(lambda g: g[None], pullback(jnp.ones_like(vals))[0])
    else:
        jac = _batched_pullback(pullback, jnp.eye(size, dtype=vals.dtype), size)
    return vals, jac, mets


def _batched_pullback(pullback, rows: Any, size: int) -> Any:
    """``jax.vmap(pullback)(rows)[0]``, except on XLA:CPU: one pullback per row, stacked.

    XLA:CPU (jaxlib 0.10.2) miscompiles the batched backward of LayerNorm, softmax and
    log_softmax in float32: its YNNPACK reduce fusion of ``c + (x[None] * c).sum(-1)``
    gives every element past the first 32768 of ``c`` the reduction of an earlier row
    (docs/compose.md, "XLA:CPU and vmap"). A compiler option on jaxreg's own ``jit``
    would not reach a ``compose`` called inside the user's ``jit``, so on CPU the rows
    are pulled back one at a time, in the same program and through the one saved forward.
    """
    if jax.default_backend() != "cpu":
        return jax.vmap(pullback)(rows)[0]
    pulled = [pullback(jax.tree.map(lambda r, k=k: r[k], rows))[0] for k in range(size)]
    return jax.tree.map(lambda *g: jnp.stack(g), *pulled)


def _pull_rows(pullback, rows: Any, size: int) -> Any:
    """Pulls each row of ``rows`` back through ``pullback`` (the model's VJP)."""
    if size == 1:
        row = jax.tree.map(lambda r: r[0], rows)
        return jax.tree.map(lambda g: g[None], pullback(row)[0])
    return _batched_pullback(pullback, rows, size)


def jacobian(plan: Plan, x: Any, batch: Any, w: jax.Array):
    """Every term's own gradient by groups: one VJP each, ``vmap``-ed over groups > 1.

    Returns ``(values [n], metrics, grad, gram, jac, aux)``: ``gram`` is the full
    Gramian ``J J^T`` with ``grad_conflicts``, else its diagonal; ``jac`` the stacked
    rows in term order with ``term_grads``, else ``None``; ``grad = w^T J``; ``aux`` the
    model stage's aux output (or ``None``).
    """
    n = len(plan.terms)
    values: list[Any] = [None] * n
    metrics: list[Any] = [None] * n
    blocks = []  # (indices, stacked per-term gradients with a leading group axis)
    groups = plan.groups or auto_groups(
        n,
        x,
        lambda v: evaluate_terms(plan, range(n), v, batch)[0],
        forward=plan.forward is not None,
    )
    aux = None
    if plan.forward is not None:
        outputs, pull, aux = jax.vjp(lambda p: model_forward(plan, p, batch), x, has_aux=True)
    for group in groups:
        parts = [[i for i in group if plan.reads_params[i]]]
        parts.append([i for i in group if not plan.reads_params[i]])
        for k, indices in enumerate(parts):
            if not indices:
                continue
            through_model = k == 1 and plan.forward is not None
            inputs = outputs if through_model else x
            f = lambda v, indices=indices: evaluate_terms(plan, indices, v, batch)
            vals, jac, mets = _rows(f, inputs, len(indices))
            if through_model:
                jac = _pull_rows(pull, jac, len(indices))
            for r, i in enumerate(indices):
                values[i], metrics[i] = vals[r], mets[r]
            if plan.grad_space == "logits":
                # Every diagnostic (norms, Gramian, term_grads) and w @ J read the
                # projected rows: one elementwise pass XLA fuses with the backward.
                jac = to_logit_space(jac, x)
            blocks.append((tuple(indices), jac))
    values_arr = stack_values(values)

    grad = None
    for group, jac in blocks:
        wg = w[np.asarray(group)]
        part = jax.tree.map(lambda j, wg=wg: weighted_rows(wg, j), jac)
        grad = part if grad is None else jax.tree.map(jnp.add, grad, part)

    acc = jnp.float64 if values_arr.dtype == jnp.float64 else jnp.float32
    if plan.grad_conflicts:
        gram = jnp.zeros((n, n), acc)
        for a, (ga, ja) in enumerate(blocks):
            for gb, jb in blocks[a:]:
                block = _gram(ja, jb, acc)
                ia, ib = np.asarray(ga), np.asarray(gb)
                gram = gram.at[np.ix_(ia, ib)].set(block)
                gram = gram.at[np.ix_(ib, ia)].set(block.T)
    else:
        # Only the Gramian's diagonal (the squared norms) is needed, in term order.
        sq: list[Any] = [None] * n
        for group, jac in blocks:
            norms = _sq_norms(jac, acc)
            for k, i in enumerate(group):
                sq[i] = norms[k]
        gram = jnp.stack(sq)
    jac_full = None
    if plan.term_grads:
        # Rows in term order by slicing and concatenating: a gather (``[order]``)
        # costs XLA:CPU another pass over the whole Jacobian.
        where = {i: (b, k) for b, (group, _) in enumerate(blocks) for k, i in enumerate(group)}
        rows = [where[i] for i in range(n)]

        def stack(*leaves):
            if len(leaves) == 1 and [k for _, k in rows] == list(range(n)):
                return leaves[0]
            return jnp.concatenate([leaves[b][k : k + 1] for b, k in rows], axis=0)

        jac_full = jax.tree.map(stack, *(j for _, j in blocks))
    return values_arr, metrics, grad, gram, jac_full, aux


def _output(plan: Plan, values, metrics, grad, w, gram, jac, aux) -> CompositeOutput:
    dtype = values.dtype
    w = w.astype(dtype)
    norms = total_norm = cosines = None
    if gram is not None:
        norms = safe_sqrt(jnp.diagonal(gram) if gram.ndim == 2 else gram).astype(dtype)
        if plan.grad_conflicts:
            denom = jnp.outer(norms, norms).astype(gram.dtype)
            cosines = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1), 0)
            # A non-finite gradient gives a NaN cosine, never a plausible 0.
            finite = jnp.isfinite(gram) & jnp.isfinite(denom)
            cosines = jnp.where(finite, jnp.clip(cosines, -1, 1), jnp.nan)
    if not plan.track_grad_norms:
        norms = None
    else:
        total_norm = safe_sqrt(_tree_sq_norm(grad)).astype(dtype)
    return pack(
        names=plan.names,
        has_base=plan.has_base,
        values=values,
        weights=w,
        contributions=w * values,
        custom=metrics,
        differentiable=tuple(t.differentiable for t in plan.terms),
        grad=grad,
        norms=norms,
        total_norm=total_norm,
        grad_cosines=cosines,
        term_grads=jac,
        grad_space=plan.grad_space,
        aux=aux if plan.forward_has_aux else None,
    )


def _sq_norms(jac: Any, dtype) -> jax.Array:
    """``diag(J J^T)``: each stacked gradient's squared L2 norm over all leaves.

    Under ``axis_name`` a sharded leaf's part is psum-ed over the shards (``axes.total``).
    """
    leaves = jax.tree.leaves(jac)
    return axes.total(
        [jnp.sum(jnp.square(j.astype(dtype)).reshape(j.shape[0], -1), axis=1) for j in leaves],
        jnp.zeros((leaves[0].shape[0],), dtype),
    )


def _gram(ja: Any, jb: Any, dtype) -> jax.Array:
    """``J_a J_b^T`` summed over the leaves of two stacked-gradient pytrees."""
    blocks = []
    for a, b in zip(jax.tree.leaves(ja), jax.tree.leaves(jb), strict=True):
        if _explicitly_sharded(a) or _explicitly_sharded(b):
            # On a mesh with explicit axes (jax.make_mesh's default) neither the
            # flattening reshape nor a dot over the sharded axes has a sharding JAX can
            # infer: one reduction per pair, each a replicated scalar.
            a, b = a.astype(dtype), b.astype(dtype)
            pairs = [[jnp.sum(a[i] * b[j]) for j in range(b.shape[0])] for i in range(a.shape[0])]
            blocks.append(jnp.stack([jnp.stack(row) for row in pairs]))
            continue
        a = a.reshape(a.shape[0], -1).astype(dtype)
        b = b.reshape(b.shape[0], -1).astype(dtype)
        # One-by-one blocks are an elementwise product XLA fuses with its producers.
        one = a.shape[0] == b.shape[0] == 1
        blocks.append(jnp.sum(a * b).reshape(1, 1) if one else cross_gram(a, b))
    shape = (jax.tree.leaves(ja)[0].shape[0], jax.tree.leaves(jb)[0].shape[0])
    if len(blocks) == 1 and not axes.current():
        return blocks[0]
    return axes.total(blocks, jnp.zeros(shape, dtype))


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s type carries an explicit mesh sharding (``AxisType.Explicit``)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(p is not None for p in spec)


def _tree_sq_norm(tree: Any) -> jax.Array:
    return axes.total(
        [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)],
        jnp.zeros((), jnp.float32),
    )


def check_shard_map_axes(axis_name: tuple[str, ...] | None) -> None:
    """Checks, at trace time, that ``shard_map`` and ``compose(axis_name=...)`` agree.

    Without ``axis_name``, inside ``shard_map`` each shard would compute its own token
    means, norms and Gramian from its part of the batch: per-shard numbers that are not
    the global ones (a masked mean over unequal token counts, a norm of a partial
    gradient), and that a ``psum`` of the outputs does not repair. They are refused
    rather than returned silently mixed. With ``axis_name``, every named axis must be a
    manual axis of the ``shard_map`` being traced, with ``check_vma=True``.
    """
    manual = axes.shard_map_axes()
    if axis_name is None:
        if manual:
            suggestion = repr(manual[0]) if len(manual) == 1 else repr(manual)
            raise TermError(
                f"compose was called inside shard_map (manual mesh axes {list(manual)}) "
                "without axis_name: each shard would report its own token means, gradient "
                "norms and Gramian, which are not the global values and cannot be recovered "
                f"by a psum of the outputs. Compose with axis_name={suggestion} to get "
                "global values inside shard_map, or call the objective under jax.jit on "
                "globally sharded arrays (see docs/distributed.md)."
            )
        return
    missing = [a for a in axis_name if a not in manual]
    if missing:
        where = f"inside shard_map over {list(manual)}" if manual else "outside any shard_map"
        raise TermError(
            f"compose(..., axis_name={axis_name!r}): the objective was called {where}, "
            f"so the axes {missing} cannot be reduced over. Call it inside "
            "jax.shard_map(..., mesh=mesh) over those axes, or compose without axis_name "
            "(under jax.jit on global arrays the values are already global)."
        )
    if not axes.check_vma_enabled():
        raise TermError(
            f"compose(..., axis_name={axis_name!r}) needs shard_map's check_vma=True (the "
            "default): it reads which values vary across the shards from their types, and "
            "with check_vma=False the gradients of replicated parameters are not summed "
            "over the shards either."
        )


def check_differentiable(x: Any) -> None:
    """Raises unless every leaf of ``x`` is a floating array (trace time).

    ``compose`` differentiates every leaf of ``x``; an integer or boolean leaf (a step
    counter, an index table, a PRNG key) has no gradient, and JAX's own error about it
    (``float0``, ``allow_int``) does not say which leaf or what to do.
    """
    bad = [
        f"{jax.tree_util.keystr(path) or 'x'} ({leaf.dtype})"
        for path, leaf in jax.tree_util.tree_leaves_with_path(x)
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if bad:
        raise TermError(
            f"x: every leaf is differentiated and must be a floating array; found "
            f"non-floating leaves {bad}. Pass the floating leaves as x and the rest "
            "through batch or the forward's closure, e.g. "
            "params, static = eqx.partition(model, eqx.is_inexact_array), or "
            "graphdef, params, rest = nnx.split(model, nnx.Param, ...)."
        )


def check_logprobs_input(x: Any) -> None:
    """Raises unless ``x`` is one floating array with a vocabulary axis (trace time)."""
    if not isinstance(x, jax.Array | np.ndarray) or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TermError(
            "grad_space='logits': x must be one floating array of log-probabilities over the "
            f"whole vocabulary along its last axis; found {type(x).__name__} "
            f"{getattr(x, 'dtype', '')}. Use grad_space='x' for parameter pytrees."
        )
    if x.ndim < 1 or x.shape[-1] < 2:
        raise TermError(
            "grad_space='logits': x must have a vocabulary axis (last) of size >= 2, e.g. "
            f"[B, T, K] logprobs; found shape {tuple(x.shape)}."
        )


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` with a finite derivative at 0; NaN stays NaN.

    A squared norm that is NaN (a NaN in some gradient) must give a NaN norm, so that
    [`jaxreg.check_finite`][jaxreg.check_finite] names the term instead of reporting a norm of 0.
    """
    positive = x > 0
    root = jnp.sqrt(jnp.where(positive, x, 1))
    return jnp.where(positive, root, jnp.where(jnp.isnan(x), x, jnp.zeros_like(x)))
