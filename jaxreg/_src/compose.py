"""``compose``: one compiled program for the total loss, per-term metrics and gradients."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.output import CompositeOutput, TermOutput
from jaxreg._src.terms import Term, TermError, check_weight, normalize_terms

GradStrategy = Literal["per_term", "vmap"] | Sequence[Sequence[str]]


class Objective:
    """A composed objective: ``objective(x, batch, *, weights=None, step=None)``.

    Built by :func:`compose`. Calling it runs one compiled XLA program per
    ``(term structure, input shapes)``; weights and schedule steps are traced arrays, so
    changing them never recompiles (:attr:`trace_count` counts the traces).
    """

    def __init__(
        self,
        base: Term | None,
        regularizers: tuple[Term, ...],
        *,
        track_grad_norms: bool,
        term_grads: bool,
        grad_conflicts: bool,
        grad_strategy: GradStrategy,
    ):
        self.base = base
        self.regularizers = regularizers
        self.terms: tuple[Term, ...] = ((base,) if base is not None else ()) + regularizers
        self.names = tuple(t.name for t in self.terms)
        self.track_grad_norms = track_grad_norms
        self.term_grads = term_grads
        self.grad_conflicts = grad_conflicts
        self.groups = _groups(grad_strategy, self.names)
        self.trace_count = 0
        self._index = {name: i for i, name in enumerate(self.names)}
        fixed = np.array([0.0 if t.scheduled else t.weight for t in self.terms], np.float32)
        self._default = (fixed, np.zeros(len(fixed), bool))
        self._default_step = np.zeros((), np.int32)
        self._cache_key: Any = None
        self._cache_value: Any = None
        self._jitted = jax.jit(self._run)

    def __repr__(self) -> str:
        flags = [
            f for f in ("track_grad_norms", "term_grads", "grad_conflicts") if getattr(self, f)
        ]
        return f"Objective(terms={list(self.names)}, {', '.join(flags) or 'plain'})"

    def __call__(
        self,
        x: Any,
        batch: Any = None,
        *,
        weights: Mapping[str, Any] | None = None,
        step: Any = None,
    ) -> CompositeOutput:
        """Evaluates the objective and its gradient at ``x``.

        Args:
          x: the differentiated input: an array (e.g. logprobs ``[B, T]``) or any pytree
            (e.g. model parameters).
          batch: anything else the terms read (a :class:`jaxreg.Batch`, a dict, ...).
          weights: per-call weights ``{name: weight}`` overriding the terms' own (or their
            schedules) for the named terms; Python floats or traced arrays.
          step: the step at which schedules are evaluated (an int or int array; default 0).

        Returns:
          A :class:`CompositeOutput`.
        """
        w, use = self._default if weights is None else self._weights(weights)
        if step is None:
            step = self._default_step
        elif isinstance(step, numbers.Integral):
            step = np.int32(step)
        return self._jitted(x, batch, w, use, step)

    def _weights(self, weights: Mapping[str, Any]) -> tuple[Any, Any]:
        if not isinstance(weights, Mapping):
            raise TermError(f"weights must be a dict {{name: weight}}; found {type(weights)}.")
        unknown = [k for k in weights if k not in self._index]
        if unknown:
            raise TermError(
                f"weights: unknown term(s) {unknown}; this objective's terms are "
                f"{list(self.names)}."
            )
        concrete = all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in weights.values()
        )
        if concrete:
            key = tuple(weights.items())
            if key == self._cache_key:
                return self._cache_value
        fixed, use = self._default
        if concrete:
            w, use = fixed.copy(), use.copy()
            for name, value in weights.items():
                w[self._index[name]] = check_weight(name, value)
                use[self._index[name]] = True
            self._cache_key, self._cache_value = key, (w, use)
            return w, use
        # Traced or array weights (e.g. inside a user's jit): assemble with jnp.
        parts = [fixed[i] for i in range(len(fixed))]
        use = use.copy()
        for name, value in weights.items():
            i = self._index[name]
            if not isinstance(value, jax.core.Tracer):
                check_weight(name, value)
            parts[i] = jnp.asarray(value, jnp.float32)
            use[i] = True
        return jnp.stack([jnp.asarray(p, jnp.float32) for p in parts]), use

    # ---------------------------------------------------------------- compiled path

    def _run(self, x, batch, w, use, step) -> CompositeOutput:
        self.trace_count += 1
        weights = []
        for i, term in enumerate(self.terms):
            if term.scheduled:
                sched = jnp.asarray(term.weight(step)).astype(jnp.float32)  # type: ignore[operator]
                weights.append(jnp.where(use[i], w[i], sched))
            else:
                weights.append(w[i])
        w = jnp.stack(weights)
        need_jacobian = self.track_grad_norms or self.term_grads or self.grad_conflicts
        if need_jacobian:
            values, metrics, grad, gram, jac = self._jacobian(x, batch, w)
        else:
            values, metrics, grad = self._value_and_grad(x, batch, w)
            gram = jac = None
        return self._output(values, metrics, grad, w, gram, jac)

    def _evaluate(self, indices, x, batch):
        values, metrics = [], []
        for i in indices:
            value, custom = self.terms[i].evaluate(x, batch)
            values.append(value)
            metrics.append(custom)
        dtype = jnp.float64 if any(v.dtype == jnp.float64 for v in values) else jnp.float32
        return jnp.stack([v.astype(dtype) for v in values]), metrics

    def _value_and_grad(self, x, batch, w):
        """Exactly one ``value_and_grad`` of the weighted sum."""

        def total(x):
            values, metrics = self._evaluate(range(len(self.terms)), x, batch)
            return jnp.dot(w.astype(values.dtype), values), (values, metrics)

        (_, (values, metrics)), grad = jax.value_and_grad(total, has_aux=True)(x)
        return values, metrics, grad

    def _jacobian(self, x, batch, w):
        """Per-term gradients by group: one VJP each, ``vmap``-ed over groups of size > 1."""
        n = len(self.terms)
        values: list[Any] = [None] * n
        metrics: list[Any] = [None] * n
        blocks = []  # (indices, stacked per-term gradients with a leading group axis)
        for group in self.groups:
            f = lambda x, group=group: self._evaluate(group, x, batch)
            vals, pullback, mets = jax.vjp(f, x, has_aux=True)
            if len(group) == 1:
                jac = jax.tree.map(lambda g: g[None], pullback(jnp.ones_like(vals))[0])
            else:
                jac = jax.vmap(pullback)(jnp.eye(len(group), dtype=vals.dtype))[0]
            for k, i in enumerate(group):
                values[i], metrics[i] = vals[k], mets[k]
            blocks.append((group, jac))
        dtype = jnp.float64 if any(v.dtype == jnp.float64 for v in values) else jnp.float32
        values_arr = jnp.stack([v.astype(dtype) for v in values])

        grad = None
        for group, jac in blocks:
            wg = w[np.asarray(group)]
            part = jax.tree.map(lambda j, wg=wg: _weighted(wg, j), jac)
            grad = part if grad is None else jax.tree.map(jnp.add, grad, part)

        gram = jnp.zeros((n, n), jnp.float32 if dtype == jnp.float32 else dtype)
        for a, (ga, ja) in enumerate(blocks):
            for gb, jb in blocks[a:]:
                block = _gram(ja, jb, gram.dtype)
                ia, ib = np.asarray(ga), np.asarray(gb)
                gram = gram.at[np.ix_(ia, ib)].set(block)
                gram = gram.at[np.ix_(ib, ia)].set(block.T)

        jac_full = None
        if self.term_grads:
            order = np.argsort(np.concatenate([np.asarray(g) for g, _ in blocks]))
            jac_full = jax.tree.map(
                lambda *leaves: jnp.concatenate(leaves, axis=0)[order],
                *(j for _, j in blocks),
            )
        return values_arr, metrics, grad, gram, jac_full

    def _output(self, values, metrics, grad, w, gram, jac) -> CompositeOutput:
        w = w.astype(values.dtype)
        contributions = w * values
        norms = total_norm = cosines = None
        if gram is not None:
            diag = jnp.diagonal(gram)
            norms = _safe_sqrt(diag).astype(values.dtype)
            if self.track_grad_norms:
                total_norm = _safe_sqrt(_tree_sq_norm(grad)).astype(values.dtype)
            if self.grad_conflicts:
                denom = jnp.outer(norms, norms).astype(gram.dtype)
                cosines = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1), 0)
        if not self.track_grad_norms:
            norms = None

        outputs = []
        for i, term in enumerate(self.terms):
            outputs.append(
                TermOutput(
                    value=values[i],
                    weight=w[i],
                    contribution=contributions[i],
                    custom=metrics[i],
                    grad_norm=None if norms is None else norms[i],
                    grad_norm_weighted=None if norms is None else w[i] * norms[i],
                    name=term.name,
                )
            )
        base = outputs[0] if self.base is not None else None
        regs = outputs[1:] if self.base is not None else outputs
        reg_total = (
            jnp.sum(contributions[1:] if self.base is not None else contributions)
            if regs
            else jnp.zeros((), values.dtype)
        )
        return CompositeOutput(
            loss_total=jnp.sum(contributions),
            grad=grad,
            regularizer_total=reg_total,
            base_loss=base,
            regularizers={t.name: t for t in regs},
            total_grad_norm=total_norm,
            grad_cosines=cosines,
            term_grads=jac,
            term_names=self.names,
        )


def _weighted(w: jax.Array, jac: jax.Array) -> jax.Array:
    """``w @ J`` for one leaf: ``J`` is ``[n, ...]``."""
    out = jnp.tensordot(w.astype(jac.dtype), jac, axes=1)
    return out


def _gram(ja: Any, jb: Any, dtype) -> jax.Array:
    """``J_a J_b^T`` summed over the leaves of two stacked-gradient pytrees."""
    total = None
    for a, b in zip(jax.tree.leaves(ja), jax.tree.leaves(jb), strict=True):
        a = a.reshape(a.shape[0], -1).astype(dtype)
        b = b.reshape(b.shape[0], -1).astype(dtype)
        block = jnp.einsum("ik,jk->ij", a, b, precision=jax.lax.Precision.HIGHEST)
        total = block if total is None else total + block
    if total is None:
        return jnp.zeros((jax.tree.leaves(ja)[0].shape[0],) * 2, dtype)
    return total


def _tree_sq_norm(tree: Any) -> jax.Array:
    return sum(
        (jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)),
        start=jnp.zeros((), jnp.float32),
    )


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` with a finite derivative at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def _groups(strategy: GradStrategy, names: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    n = len(names)
    if strategy == "per_term":
        return tuple((i,) for i in range(n))
    if strategy == "vmap":
        return (tuple(range(n)),)
    if isinstance(strategy, str) or not isinstance(strategy, Sequence):
        raise TermError(
            "grad_strategy must be 'per_term', 'vmap' or a list of groups of term names; "
            f"found {strategy!r}."
        )
    index = {name: i for i, name in enumerate(names)}
    groups, seen = [], set()
    for group in strategy:
        if isinstance(group, str):
            group = (group,)
        ids = []
        for name in group:
            if name not in index:
                raise TermError(
                    f"grad_strategy: unknown term {name!r}; terms are {list(names)}."
                )
            if name in seen:
                raise TermError(f"grad_strategy: term {name!r} is in more than one group.")
            seen.add(name)
            ids.append(index[name])
        if ids:
            groups.append(tuple(ids))
    groups.extend((i,) for i, name in enumerate(names) if name not in seen)
    return tuple(groups)


def compose(
    base: Term | Callable[..., Any] | None,
    regularizers: Sequence[Term | Mapping[str, Any]] | Term = (),
    *,
    track_grad_norms: bool = False,
    term_grads: bool = False,
    grad_conflicts: bool = False,
    grad_strategy: GradStrategy = "per_term",
) -> Objective:
    r"""Composes a base loss and weighted regularizers into one compiled objective.

    .. math::

       L(x) = w_0\, b(x) + \sum_i w_i\, r_i(x), \qquad
       \nabla L = w^\top J, \quad J_{i\cdot} = \nabla_x r_i(x)

    Without gradient tracking the objective is exactly one ``jax.value_and_grad`` of
    the weighted sum. With ``track_grad_norms``, ``term_grads`` or ``grad_conflicts``,
    every term's own gradient is computed in the same program (one VJP per term, or
    one ``vmap``-ed VJP per group of terms, see ``grad_strategy``); norms and cosines come
    from the Gramian :math:`G = J J^\top` and the total gradient is :math:`w^\top J`,
    with no extra backward pass.

    Args:
      base: the base loss: a :class:`Term` (its weight is normally 1), a plain callable
        ``fn(x, batch)`` (named ``"base"``), or ``None``.
      regularizers: :class:`Term` objects, or SDK-style dicts ``{"name", "fn", "weight"}``.
      track_grad_norms: report each term's gradient norm and the total gradient norm.
      term_grads: return each term's unweighted gradient, stacked (``out.term_grads``).
      grad_conflicts: return the pairwise cosine matrix of the terms' gradients.
      grad_strategy: how per-term gradients are computed when any of the above is set.
        ``"per_term"`` (default): one VJP per term in the same program; XLA shares the
        forward and fuses each backward with its norm reduction, and a term pays only
        for the backward of what it depends on. ``"vmap"``: one VJP of all terms,
        ``vmap``-ed over the cotangent basis (materialises the ``[n, ...]`` Jacobian).
        A list of groups of names, e.g. ``[("ce", "entropy")]``: one ``vmap``-ed VJP per
        group (terms not listed get their own), for terms sharing an expensive model.

    Returns:
      An :class:`Objective`, called as ``objective(x, batch, *, weights=None, step=None)``
      and returning a :class:`CompositeOutput`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> nll = jr.Term("nll", lambda x, b: -jnp.mean(x))
      >>> l2 = jr.Term("l2", lambda x, b: jnp.sum(x ** 2), weight=0.5)
      >>> objective = jr.compose(nll, [l2], track_grad_norms=True)
      >>> out = objective(jnp.array([-1.0, -2.0, -3.0]))
      >>> round(out.to_dict()["loss_total"], 3)
      9.0
    """
    base_term, regs = normalize_terms(base, regularizers)
    return Objective(
        base_term,
        regs,
        track_grad_norms=track_grad_norms,
        term_grads=term_grads,
        grad_conflicts=grad_conflicts,
        grad_strategy=grad_strategy,
    )
