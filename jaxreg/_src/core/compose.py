"""``compose``: one compiled program for the total loss, per-term metrics and gradients."""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import guards, telemetry
from jaxreg._src.core.host import HostTerm, merge_host_results, run_all
from jaxreg._src.core.linalg import cross_gram, to_logit_space, weighted_rows
from jaxreg._src.core.output import CompositeOutput, Layout
from jaxreg._src.core.term import Term, TermError, check_weight, normalize_terms

GradStrategy = Literal["auto", "per_term", "vmap"] | Sequence[Sequence[str]]
GradSpace = Literal["x", "logits"]
GRAD_SPACES = ("x", "logits")

# "auto" uses one vmap-ed VJP for a single array x of at most this many elements (the
# per-call cost of the per-term program's extra kernels dominates there: 1.02-1.10x the
# floor instead of 1.50-1.61x at [8, 512]) and per-term VJPs otherwise (1.0-1.4x against
# 1.5-2.2x at [32, 2048] and up; parameter pytrees always go per term).
AUTO_VMAP_MAX_ELEMENTS = 1 << 14


class Objective:
    """A composed objective: ``objective(x, batch, *, weights=None, step=None)``.

    Built by [`compose`][jaxreg.compose]. Calling it runs one compiled XLA program per
    ``(term structure, input shapes)``; weights and schedule steps are traced arrays, so
    changing them never recompiles (``trace_count`` counts the traces).
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
        check_finite: bool = False,
        grad_space: GradSpace = "x",
    ):
        if grad_space not in GRAD_SPACES:
            raise TermError(f"grad_space must be one of {list(GRAD_SPACES)}; found {grad_space!r}.")
        self.grad_space = grad_space
        self.check_finite = check_finite
        self.base = base
        self.regularizers = regularizers
        self.terms: tuple[Term, ...] = ((base,) if base is not None else ()) + regularizers
        self.names = tuple(t.name for t in self.terms)
        self.track_grad_norms = track_grad_norms
        self.term_grads = term_grads
        self.grad_conflicts = grad_conflicts
        self.grad_strategy = grad_strategy
        self.groups = _groups("per_term" if grad_strategy == "auto" else grad_strategy, self.names)
        self.trace_count = 0
        self._index = {name: i for i, name in enumerate(self.names)}
        self._scheduled = any(t.scheduled for t in self.terms)
        # A NaN weight tells the compiled program to evaluate that term's schedule.
        fixed = np.array([np.nan if t.scheduled else t.weight for t in self.terms], np.float32)
        self._fixed = fixed
        self._default_w = jnp.asarray(fixed)
        self._default_step = jnp.zeros((), jnp.int32)
        self._cache_key: Any = None
        self._cache_value: Any = None
        self._jitted = jax.jit(self._run)
        self.host_terms = tuple(t for t in regularizers if isinstance(t, HostTerm))
        self._device: Objective | None = None
        if isinstance(base, HostTerm):
            raise TermError(f"HostTerm {base.name!r}: the base loss must be a JAX term.")
        if self.host_terms:
            if term_grads or grad_conflicts:
                raise TermError(
                    f"host terms {[t.name for t in self.host_terms]}: term_grads and "
                    "grad_conflicts need every term's gradient inside one program; use "
                    "track_grad_norms (supported) or make the terms JAX functions."
                )
            device_regs = tuple(t for t in regularizers if not isinstance(t, HostTerm))
            if base is not None or device_regs:
                self._device = Objective(
                    base,
                    device_regs,
                    track_grad_norms=track_grad_norms,
                    term_grads=False,
                    grad_conflicts=False,
                    grad_strategy=grad_strategy,
                    grad_space=grad_space,
                )

    def __repr__(self) -> str:
        flags = [
            f for f in ("track_grad_norms", "term_grads", "grad_conflicts") if getattr(self, f)
        ]
        space = "" if self.grad_space == "x" else f", grad_space={self.grad_space!r}"
        return f"Objective(terms={list(self.names)}, {', '.join(flags) or 'plain'}{space})"

    def __call__(
        self,
        x: Any,
        batch: Any = None,
        *,
        weights: Mapping[str, Any] | None = None,
        step: Any = None,
        data: Any = None,
    ) -> CompositeOutput:
        """Evaluates the objective and its gradient at ``x``.

        Args:
          x: the differentiated input: an array (e.g. logprobs ``[B, T]``) or any pytree
            (e.g. model parameters).
          batch: anything else the terms read (a [`jaxreg.Batch`][jaxreg.Batch], a dict, ...).
          weights: per-call weights ``{name: weight}`` overriding the terms' own (or their
            schedules) for the named terms; Python floats or traced arrays.
          step: the step at which schedules are evaluated (an int or int array; default 0).
          data: the raw data of the batch (e.g. the list of datums), passed to host terms
            as their third argument; JAX terms never see it.

        Returns:
          A [`CompositeOutput`][jaxreg.CompositeOutput].
        """
        if not (self.host_terms or self.check_finite or telemetry.has_handlers()):
            return self._call_jitted(x, batch, weights, step)  # the common, thin path
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))
        if traced or not telemetry.active(*_COMPOSE_EVENTS):
            out = self._call(x, batch, weights, step, data, traced)
            if self.check_finite and not traced:
                guards.check_finite(out)
            return out
        started = telemetry.now()
        telemetry.execute(
            ("jaxreg", "compose", "start"), {"system_time": time.time()}, {"terms": self.names}
        )
        try:
            out = self._call(x, batch, weights, step, data, traced)
            d = guards.check_finite(out) if self.check_finite else out.to_dict()  # one transfer
        except Exception as e:
            telemetry.execute(
                ("jaxreg", "compose", "exception"),
                {"duration": telemetry.now() - started},
                {"terms": self.names, "error": f"{type(e).__name__}: {e}"},
            )
            raise
        _emit_stop(self, out, d, telemetry.now() - started)
        return out

    def _call(self, x, batch, weights, step, data, traced) -> CompositeOutput:
        if self.host_terms and not traced:
            return self._call_with_host_terms(x, batch, weights, step, data)
        return self._call_jitted(x, batch, weights, step)

    def _call_jitted(self, x, batch, weights, step) -> CompositeOutput:
        w = self._default_w if weights is None else self._weights(weights)
        if not self._scheduled:
            step = None
        elif step is None:
            step = self._default_step
        elif isinstance(step, numbers.Integral):
            step = np.int32(step)
        return self._jitted(x, batch, w, step)

    def _call_with_host_terms(self, x, batch, weights, step, data) -> CompositeOutput:
        """Dispatches the compiled part, runs the host terms meanwhile, then merges."""
        host_names = {t.name for t in self.host_terms}
        if weights is not None:
            self._weights(weights)  # validates names and values
        device_weights = (
            None if weights is None else {k: v for k, v in weights.items() if k not in host_names}
        )
        device_out = None
        if self._device is not None:
            # _call, not __call__: the outer call emits the telemetry events.
            device_out = self._device._call_jitted(x, batch, device_weights or None, step)
        x_host = np.asarray(x)
        batch_host = jax.tree.map(np.asarray, batch)
        results = run_all(list(self.host_terms), x_host, batch_host, data)
        host_weights = {
            t.name: float((weights or {}).get(t.name, t.weight)) for t in self.host_terms
        }
        if telemetry.active(("jaxreg", "term", "exception")):
            for r in results:
                if not r.ok:
                    telemetry.execute(
                        ("jaxreg", "term", "exception"),
                        {"duration": r.seconds},
                        {"name": r.name, "error": r.error},
                    )
        return merge_host_results(self, device_out, results, host_weights, x)

    def _weights(self, weights: Mapping[str, Any]) -> Any:
        if not isinstance(weights, Mapping):
            raise TermError(
                f"weights must be a dict {{name: weight}}; found {type(weights).__name__}."
            )
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
            w = self._fixed.copy()
            for name, value in weights.items():
                w[self._index[name]] = check_weight(name, value)
            self._cache_key, self._cache_value = key, jnp.asarray(w)
            return self._cache_value
        # Array or traced weights (e.g. inside a user's jit): assemble with jnp.
        parts = [jnp.asarray(v, jnp.float32) for v in self._fixed]
        for name, value in weights.items():
            if not isinstance(value, jax.core.Tracer):
                check_weight(name, value)
            parts[self._index[name]] = jnp.asarray(value).astype(jnp.float32)
        return jnp.stack(parts)

    # ---------------------------------------------------------------- compiled path

    def _run(self, x, batch, w, step) -> CompositeOutput:
        self.trace_count += 1
        if self.grad_space == "logits":
            _check_logprobs_input(x)
        if self._scheduled:
            weights = []
            for i, term in enumerate(self.terms):
                if term.scheduled:
                    sched = jnp.asarray(term.weight(step)).astype(jnp.float32)  # type: ignore[operator]
                    weights.append(jnp.where(jnp.isnan(w[i]), sched, w[i]))
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
        if self.grad_space == "logits":
            grad = to_logit_space(grad, x)
        return values, metrics, grad

    def _jacobian(self, x, batch, w):
        """Per-term gradients by group: one VJP each, ``vmap``-ed over groups of size > 1."""
        n = len(self.terms)
        values: list[Any] = [None] * n
        metrics: list[Any] = [None] * n
        blocks = []  # (indices, stacked per-term gradients with a leading group axis)
        groups = self.groups
        small = isinstance(x, jax.Array | np.ndarray) and x.size <= AUTO_VMAP_MAX_ELEMENTS
        if self.grad_strategy == "auto" and small and n > 1:
            groups = (tuple(range(n)),)
        for group in groups:
            f = lambda x, group=group: self._evaluate(group, x, batch)
            vals, pullback, mets = jax.vjp(f, x, has_aux=True)
            if len(group) == 1:
                jac = jax.tree.map(lambda g: g[None], pullback(jnp.ones_like(vals))[0])
            else:
                jac = jax.vmap(pullback)(jnp.eye(len(group), dtype=vals.dtype))[0]
            for k, i in enumerate(group):
                values[i], metrics[i] = vals[k], mets[k]
            if self.grad_space == "logits":
                # Every diagnostic (norms, Gramian, term_grads) and w @ J read the
                # projected rows: one elementwise pass XLA fuses with the backward.
                jac = to_logit_space(jac, x)
            blocks.append((group, jac))
        dtype = jnp.float64 if any(v.dtype == jnp.float64 for v in values) else jnp.float32
        values_arr = jnp.stack([v.astype(dtype) for v in values])

        grad = None
        for group, jac in blocks:
            wg = w[np.asarray(group)]
            part = jax.tree.map(lambda j, wg=wg: weighted_rows(wg, j), jac)
            grad = part if grad is None else jax.tree.map(jnp.add, grad, part)

        acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
        if self.grad_conflicts:
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
        if self.term_grads:
            # Rows in term order by slicing and concatenating: a gather (``[order]``)
            # costs XLA:CPU another pass over the whole Jacobian.
            where = {i: (b, k) for b, (group, _) in enumerate(blocks) for k, i in enumerate(group)}
            rows = [where[i] for i in range(n)]

            def stack(*leaves):
                if len(leaves) == 1 and [k for _, k in rows] == list(range(n)):
                    return leaves[0]
                return jnp.concatenate([leaves[b][k : k + 1] for b, k in rows], axis=0)

            jac_full = jax.tree.map(stack, *(j for _, j in blocks))
        return values_arr, metrics, grad, gram, jac_full

    def _output(self, values, metrics, grad, w, gram, jac) -> CompositeOutput:
        dtype = values.dtype
        w = w.astype(dtype)
        contributions = w * values
        norms = total_norm = cosines = None
        if gram is not None:
            norms = _safe_sqrt(jnp.diagonal(gram) if gram.ndim == 2 else gram).astype(dtype)
            if self.grad_conflicts:
                denom = jnp.outer(norms, norms).astype(gram.dtype)
                cosines = jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1), 0)
                # A non-finite gradient gives a NaN cosine, never a plausible 0.
                finite = jnp.isfinite(gram) & jnp.isfinite(denom)
                cosines = jnp.where(finite, jnp.clip(cosines, -1, 1), jnp.nan)
        track = self.track_grad_norms
        if track:
            total_norm = _safe_sqrt(_tree_sq_norm(grad)).astype(dtype)
        layout = Layout(
            names=self.names,
            has_base=self.base is not None,
            custom=tuple(tuple(m) for m in metrics),
            norms=track,
            differentiable=tuple(t.differentiable for t in self.terms),
            grad_space=self.grad_space,
        )
        start = 1 if self.base is not None else 0
        if total_norm is None:
            total_norm = jnp.zeros((), dtype)
        totals = jnp.stack([jnp.sum(contributions), jnp.sum(contributions[start:]), total_norm])
        fields = [values, w, contributions] + ([norms, w * norms] if track else [])
        custom = [jnp.asarray(v).astype(dtype) for m in metrics for v in m.values()]
        parts = [totals, *fields] + ([jnp.stack(custom)] if custom else [])
        scalars = jnp.concatenate(parts)
        return CompositeOutput(
            grad=grad, scalars=scalars, grad_cosines=cosines, term_grads=jac, layout=layout
        )


_COMPOSE_EVENTS = (
    ("jaxreg", "compose", "start"),
    ("jaxreg", "compose", "stop"),
    ("jaxreg", "compose", "exception"),
    ("jaxreg", "term", "stop"),
)


def _emit_stop(objective: Objective, out: CompositeOutput, d: dict, duration: float) -> None:
    measurements = {
        "duration": duration,
        "loss_total": d["loss_total"],
        "regularizer_total": d["regularizer_total"],
    }
    if "total_grad_norm" in d:
        measurements["total_grad_norm"] = d["total_grad_norm"]
    telemetry.execute(
        ("jaxreg", "compose", "stop"),
        measurements,
        {"terms": objective.names, "n_terms": len(objective.names)},
    )
    if not telemetry.active(("jaxreg", "term", "stop")):
        return
    host = {t.name for t in objective.host_terms}
    entries = dict(d["regularizers"])
    if "base_loss" in d and out.base_loss is not None:
        base = d["loss_total"] - d["regularizer_total"]
        entries = {out.base_loss.name: {**d["base_loss"], "contribution": base}, **entries}
    for name, e in entries.items():
        m = {k: e[k] for k in ("value", "weight", "contribution", "grad_norm") if k in e}
        telemetry.execute(
            ("jaxreg", "term", "stop"),
            m,
            {"name": name, "host": name in host, "differentiable": e.get("differentiable", True)},
        )


def _sq_norms(jac: Any, dtype) -> jax.Array:
    """``diag(J J^T)``: each stacked gradient's squared L2 norm over all leaves."""
    leaves = jax.tree.leaves(jac)
    return sum(
        (jnp.sum(jnp.square(j.astype(dtype)).reshape(j.shape[0], -1), axis=1) for j in leaves),
        start=jnp.zeros((leaves[0].shape[0],), dtype),
    )


def _gram(ja: Any, jb: Any, dtype) -> jax.Array:
    """``J_a J_b^T`` summed over the leaves of two stacked-gradient pytrees."""
    total = None
    for a, b in zip(jax.tree.leaves(ja), jax.tree.leaves(jb), strict=True):
        a = a.reshape(a.shape[0], -1).astype(dtype)
        b = b.reshape(b.shape[0], -1).astype(dtype)
        # One-by-one blocks are an elementwise product XLA fuses with its producers.
        one = a.shape[0] == b.shape[0] == 1
        block = jnp.sum(a * b).reshape(1, 1) if one else cross_gram(a, b)
        total = block if total is None else total + block
    if total is None:
        return jnp.zeros((jax.tree.leaves(ja)[0].shape[0],) * 2, dtype)
    return total


def _tree_sq_norm(tree: Any) -> jax.Array:
    return sum(
        (jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)),
        start=jnp.zeros((), jnp.float32),
    )


def _check_logprobs_input(x: Any) -> None:
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


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` with a finite derivative at 0; NaN stays NaN.

    A squared norm that is NaN (a NaN in some gradient) must give a NaN norm, so that
    [`jaxreg.check_finite`][jaxreg.check_finite] names the term instead of reporting a norm of 0.
    """
    positive = x > 0
    root = jnp.sqrt(jnp.where(positive, x, 1))
    return jnp.where(positive, root, jnp.where(jnp.isnan(x), x, jnp.zeros_like(x)))


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
                raise TermError(f"grad_strategy: unknown term {name!r}; terms are {list(names)}.")
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
    grad_strategy: GradStrategy = "auto",
    check_finite: bool = False,
    grad_space: GradSpace = "x",
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
      base: the base loss: a [`Term`][jaxreg.Term] (its weight is normally 1), a plain callable
        ``fn(x, batch)`` (named ``"base"``), or ``None``.
      regularizers: [`Term`][jaxreg.Term] objects, or SDK-style dicts ``{"name", "fn", "weight"}``.
      track_grad_norms: report each term's gradient norm and the total gradient norm.
      term_grads: return each term's unweighted gradient, stacked (``out.term_grads``).
      grad_conflicts: return the pairwise cosine matrix of the terms' gradients.
      grad_strategy: how per-term gradients are computed when any of the above is set.
        ``"auto"`` (default): ``"vmap"`` when ``x`` is one array of at most
        ``AUTO_VMAP_MAX_ELEMENTS`` (2^14) elements, where fewer kernels matter most,
        else ``"per_term"`` (decided at trace time from the static shape).
        ``"per_term"``: one VJP per term in the same program; XLA shares the
        forward and fuses each backward with its norm reduction, and a term pays only
        for the backward of what it depends on. ``"vmap"``: one VJP of all terms,
        ``vmap``-ed over the cotangent basis (materialises the ``[n, ...]`` Jacobian).
        A list of groups of names, e.g. ``[("ce", "entropy")]``: one ``vmap``-ed VJP per
        group (terms not listed get their own), for terms sharing an expensive model.
      check_finite: after each (untraced) call, raise
        [`jaxreg.NonFiniteError`][jaxreg.NonFiniteError] naming the terms whose value, gradient or
        metrics are not finite. It brings the scalars to the host once per call (a sync); the remote
        path always checks.
      grad_space: the space every reported gradient is in. ``"x"`` (default): gradients
        with respect to ``x`` itself. ``"logits"``: ``x`` is an array of log-probabilities
        over the **whole** vocabulary along its last axis (``[B, T, K]`` from ``[T, K]``
        targets spanning the vocabulary, or a classifier's ``log_softmax`` ``[B, K]``).
        Each term's gradient is then mapped to the logits ``z`` with
        ``x = z - logsumexp(z)``,

        .. math:: \nabla_z = g - e^{x} \textstyle\sum_k g_k ,

        before norms, cosines, ``term_grads`` and the total ``grad``. The dropped part,
        along ``p = e^x``, is removed by the model's own backward through
        ``log_softmax``, so the parameter update is unchanged; only what is reported
        changes (a KL at 0 has norm 0, a constant NLL cotangent no longer shows a
        constant norm). Not exact when the last axis is a subset of the vocabulary
        (top-K targets): there ``sum_k p_k < 1`` and the probabilities outside the subset,
        which the projection needs, are unknown; keep ``"x"`` then.

    Returns:
      An [`Objective`][jaxreg.Objective], called as ``objective(x, batch, *, weights=None,
      step=None)`` and returning a [`CompositeOutput`][jaxreg.CompositeOutput].

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxreg as jr
      >>> nll = jr.Term("nll", lambda x, b: -jnp.mean(x))
      >>> l2 = jr.Term("l2", lambda x, b: jnp.sum(x ** 2), weight=0.5)
      >>> objective = jr.compose(nll, [l2], track_grad_norms=True)
      >>> out = objective(jnp.array([-1.0, -2.0, -3.0]))
      >>> round(out.to_dict()["loss_total"], 3)
      9.0

      Full-distribution logprobs, gradients reported in logit space:

      >>> x = jax.nn.log_softmax(jnp.array([[0.5, -1.0, 2.0]]))
      >>> ent = jr.Term("ent", lambda x, b: jnp.sum(jnp.exp(x) * x))
      >>> out = jr.compose(ent, track_grad_norms=True, grad_space="logits")(x)
      >>> out.grad_space
      'logits'
    """
    base_term, regs = normalize_terms(base, regularizers)
    return Objective(
        base_term,
        regs,
        track_grad_norms=track_grad_norms,
        term_grads=term_grads,
        grad_conflicts=grad_conflicts,
        grad_strategy=grad_strategy,
        check_finite=check_finite,
        grad_space=grad_space,
    )
