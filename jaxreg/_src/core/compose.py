"""``compose``: one compiled program for the total loss, per-term metrics and gradients.

[`compose`][jaxreg.compose] validates its arguments into a frozen ``Plan``
and returns an [`Objective`][jaxreg.Objective]: a thin callable that turns per-call weights and
steps into arrays and runs the jitted ``run`` of the plan.
Host terms (``jaxreg._src.core.host``) and telemetry events
(``jaxreg._src.core.telemetry``) are handled by their own modules.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import host, program, telemetry
from jaxreg._src.core.errors import TermError
from jaxreg._src.core.output import CompositeOutput
from jaxreg._src.core.plan import GradSpace, GradStrategy, Plan, make_plan
from jaxreg._src.core.strategy import VMAP_MAX_WORK
from jaxreg._src.core.term import Term, check_weight, normalize_terms

__all__ = ["VMAP_MAX_WORK", "Objective", "compose"]


class Objective:
    """A composed objective: ``objective(x, batch, *, weights=None, step=None)``.

    Built by [`compose`][jaxreg.compose]. Calling it runs one compiled XLA program per
    ``(term structure, input shapes)``; weights and schedule steps are traced arrays, so
    changing them never recompiles (``trace_count`` counts the traces).

    Attributes:
      plan: the frozen ``Plan`` (terms and flags).
      names: the term names, the base first.
      terms, base, regularizers: the terms (``base`` is ``None`` without one).
      host_terms: the [`jaxreg.HostTerm`][jaxreg.HostTerm] among the regularizers.
      raises_on_nonfinite: whether each untraced call runs
        [`jaxreg.check_finite`][jaxreg.check_finite] (``compose(..., check_finite=True)``).
      trace_count: how many times the compiled program was traced.
      axis_name: the ``shard_map`` axes the numbers are made global over (a tuple), or
        ``None`` (``compose(..., axis_name=...)``).
    """

    def __init__(self, plan: Plan, *, raises_on_nonfinite: bool = False):
        self.plan = plan
        self.raises_on_nonfinite = raises_on_nonfinite
        self.trace_count = 0
        self.host_terms = tuple(t for t in plan.terms if isinstance(t, host.HostTerm))
        self._index = {name: i for i, name in enumerate(plan.names)}
        self._fixed = plan.fixed_weights
        self._default_w = jnp.asarray(self._fixed)
        self._default_step = jnp.zeros((), jnp.int32)
        self._cache_key: Any = None
        self._cache_value: Any = None
        # Untraced calls with host terms run a program of the other (device) terms only
        # and the host terms beside it; traced calls run them all in one program, the
        # host terms through jax.pure_callback.
        self.device_plan: Plan | None = plan
        self._jitted = jax.jit(functools.partial(self._traced, plan))
        self._device_jitted = self._jitted
        if self.host_terms:
            keep = [i for i, t in enumerate(plan.terms) if not isinstance(t, host.HostTerm)]
            self.device_plan = plan.restrict(keep) if keep else None
            self._device_index = np.asarray(keep, np.int32)
            if self.device_plan is not None:
                self._device_jitted = jax.jit(functools.partial(self._traced, self.device_plan))

    # The plan's fields, for reading an objective.
    names = property(lambda self: self.plan.names)
    terms = property(lambda self: self.plan.terms)
    base = property(lambda self: self.plan.terms[0] if self.plan.has_base else None)
    regularizers = property(lambda self: self.plan.terms[1 if self.plan.has_base else 0 :])
    track_grad_norms = property(lambda self: self.plan.track_grad_norms)
    term_grads = property(lambda self: self.plan.term_grads)
    grad_conflicts = property(lambda self: self.plan.grad_conflicts)
    grad_space = property(lambda self: self.plan.grad_space)
    axis_name = property(lambda self: self.plan.axis_name)

    def __repr__(self) -> str:
        plan = self.plan
        flags = [
            f for f in ("track_grad_norms", "term_grads", "grad_conflicts") if getattr(plan, f)
        ]
        extra = "" if plan.grad_space == "x" else f", grad_space={plan.grad_space!r}"
        if plan.forward is not None:
            extra += f", forward={getattr(plan.forward, '__name__', plan.forward)!r}"
        if plan.axis_name is not None:
            extra += f", axis_name={plan.axis_name!r}"
        return f"Objective(terms={list(plan.names)}, {', '.join(flags) or 'plain'}{extra})"

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
        if not (self.host_terms or self.raises_on_nonfinite or telemetry.has_handlers()):
            return self.compiled(x, batch, weights, step)  # the common, thin path
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))

        def call() -> CompositeOutput:
            if self.host_terms and not traced:
                return host.call_with_host_terms(self, x, batch, weights, step, data)
            return self.compiled(x, batch, weights, step)

        if traced:
            return call()
        return telemetry.instrument_compose(
            call, self.names, self.host_terms, raises_on_nonfinite=self.raises_on_nonfinite
        )

    def compiled(
        self, x: Any, batch: Any, weights: Any, step: Any, *, device_only: bool = False
    ) -> CompositeOutput:
        """Runs the compiled program; ``device_only``: of the JAX terms alone."""
        w = self._default_w if weights is None else self.weight_vector(weights)
        jitted = self._jitted
        if device_only and self.host_terms:
            w, jitted = w[self._device_index], self._device_jitted
        if not self.plan.scheduled:
            step = None
        elif step is None:
            step = self._default_step
        elif isinstance(step, numbers.Integral):
            step = np.int32(step)
        return jitted(x, batch, w, step)

    def _traced(self, plan: Plan, x, batch, w, step) -> CompositeOutput:
        self.trace_count += 1
        return program.run(plan, x, batch, w, step)

    def weight_vector(self, weights: Mapping[str, Any]) -> Any:
        """The ``[n]`` weight vector for per-call ``weights`` (NaN: evaluate the schedule)."""
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
    forward: Callable[[Any, Any], Any] | None = None,
    forward_has_aux: bool = False,
    memory_budget: int | None = None,
    axis_name: str | tuple[str, ...] | None = None,
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

    With a model stage, ``forward=apply_fn``, ``x`` is the parameters and the model runs
    once per call: terms read ``y = apply_fn(x, batch)`` (or, with
    ``Term(..., on="params")``, the parameters). Without diagnostics the call is one
    ``value_and_grad`` through one forward, as a hand-written step; with them, each
    output term's gradient with respect to ``y`` is pulled back through the one saved
    forward (one backward through the model per output term) and parameter penalties
    are differentiated on their own.

    Args:
      base: the base loss: a [`Term`][jaxreg.Term] (its weight is normally 1), a plain callable
        ``fn(x, batch)`` (named ``"base"``), or ``None``.
      regularizers: [`Term`][jaxreg.Term] objects, or SDK-style dicts ``{"name", "fn", "weight"}``.
        A term's default weight is its scale: losses reduce with ``"sum"`` over tokens
        and regularizers with ``"token_mean"`` (see each term's ``reduction``).
      track_grad_norms: report each term's gradient norm and the total gradient norm.
      term_grads: return each term's unweighted gradient, stacked (``out.term_grads``).
      grad_conflicts: return the pairwise cosine matrix of the terms' gradients.
      grad_strategy: how per-term gradients are computed when any of the above is set.
        ``"auto"`` (default): ``"per_term"``, except ``"vmap"`` when ``x`` is one array
        and the terms' forward work is tiny (at most ``VMAP_MAX_WORK`` element
        operations, read off their jaxpr at trace time: never a second compile); see
        ``jaxreg/_src/core/strategy.py`` for the cost model and its measurements.
        ``"per_term"``: one VJP per term in the same program; XLA shares the
        forward and fuses each backward with its norm reduction, and a term pays only
        for the backward of what it depends on. ``"vmap"``: one VJP of all terms,
        ``vmap``-ed over the cotangent basis (materialises the ``[n, ...]`` Jacobian).
        A list of groups of names, e.g. ``[("ce", "entropy")]``: one ``vmap``-ed VJP per
        group (terms not listed get their own), for terms sharing an expensive model.
        On XLA:CPU a ``vmap``-ed group's rows are pulled back one at a time (jaxlib
        0.10.2 miscompiles the batched backward of LayerNorm and softmax in float32;
        see "XLA:CPU and vmap" in docs/compose.md), so every strategy gives the same
        gradients as a loop of per-term ``jax.grad``.
        ``"sequential"``: a ``lax.scan`` over the terms computes one gradient at a time,
        keeping only the running total and the squared norms, and the Gramian by
        columns (:math:`G_{\cdot j} = J g_j`, one VJP and one JVP per term): extra memory
        of about two gradients whatever the number of terms (three with
        ``grad_conflicts``), for some more time. With ``term_grads=True`` every gradient
        is returned, so they are materialised one VJP per term.
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
      forward: a model stage ``forward(params, batch) -> outputs`` (any pytree, e.g.
        logits ``[B, K]``), shared by every term: terms read its output, except those
        declared ``Term(..., on="params")``, which read ``x``. Gradients stay with
        respect to ``x``. Not combinable with host terms or ``grad_space="logits"``.
      forward_has_aux: ``forward`` returns ``(outputs, aux)``, and ``aux`` (not
        differentiated) comes back as ``out.aux``: a model's updated state, such as
        BatchNorm statistics, from the same forward the terms read.
      memory_budget: bytes that the ``n`` stacked per-term gradients (``n`` times the
        size of ``x``) may take: above it, ``grad_strategy="auto"`` uses
        ``"sequential"``. ``None`` (default): no budget.
      axis_name: call the objective inside ``jax.shard_map`` over these mesh axes (a
        name or a tuple of names) and get global numbers: a term's value or metric that
        varies across the shards is taken as the shard's share of a sum and ``psum``-ed
        (the library's token means divide the psum of the numerators by the psum of the
        token counts); squared norms, the Gramian and cosines sum every shard's block of
        a sharded input's gradient; gradients of replicated parameters are already
        summed by JAX (``check_vma=True``, ``shard_map``'s default, is required).
        ``grad`` and ``term_grads`` keep the layout of ``x`` (a sharded input's gradient
        stays sharded); every scalar is replicated, so return the output with
        ``out_specs=P()`` for the scalars and cosines and the spec of ``x`` for ``grad``
        (docs/distributed.md). Without it, ``compose`` inside ``shard_map`` raises.

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

      A model stage: the MLP runs once, the penalty reads the parameters.

      >>> def apply(params, batch):
      ...     return jnp.tanh(batch["x"] @ params["w"])
      >>> mse = jr.Term("mse", lambda y, b: jnp.mean((y - b["y"]) ** 2))
      >>> decay = jr.Term("l2", lambda p, b: jnp.sum(p["w"] ** 2), weight=1e-2, on="params")
      >>> objective = jr.compose(mse, [decay], forward=apply, track_grad_norms=True)
      >>> params = {"w": jnp.ones((3, 2))}
      >>> out = objective(params, {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))})
      >>> out.grad["w"].shape
      (3, 2)
    """
    base_term, regs = normalize_terms(base, regularizers)
    plan = make_plan(
        base_term,
        regs,
        track_grad_norms=track_grad_norms,
        term_grads=term_grads,
        grad_conflicts=grad_conflicts,
        grad_strategy=grad_strategy,
        grad_space=grad_space,
        forward=forward,
        forward_has_aux=forward_has_aux,
        memory_budget=memory_budget,
        axis_name=axis_name,
        host_types=(host.HostTerm,),
    )
    return Objective(plan, raises_on_nonfinite=check_finite)
