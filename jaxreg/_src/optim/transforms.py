"""Regularizers as an optax transform: ``optax.chain(jr.transforms.regularize(...), ...)``.

``regularize`` adds penalty *gradients* to the incoming updates, so it must come before
the transform that turns gradients into steps (``adam``, ``sgd``, ...). Placed after it,
it adds the raw gradient to the final step: ascent on the penalty, with step size 1.
The state carries a small probe that recognises this case (see
[`RegularizeState`][jaxreg.transforms.RegularizeState]); [`metrics`][jaxreg.transforms.metrics]
warns when it fires, and [`regularized`][jaxreg.transforms.regularized] builds the right order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxreg._src.core import gather
from jaxreg._src.core.compose import compose
from jaxreg._src.core.errors import JaxregError
from jaxreg._src.core.output import CompositeOutput
from jaxreg._src.core.term import normalize_terms

PROBE_SIZE = 16
"""Elements per parameter leaf that the order check follows (the first ones, flattened)."""

MISPLACED_AFTER = 2
"""Consecutive telling steps after which ``metrics`` reports a misplaced transform."""


class TransformError(JaxregError, ValueError):
    """A jaxreg optax transform was given updates, parameters or a state it cannot use."""


class RegularizeOrderWarning(UserWarning):
    """``regularize`` runs after the transform that scales gradients into steps."""


@jax.tree_util.register_pytree_node_class
class TermNames(tuple):
    """The term names of a ``RegularizeState``: static (no array leaves), so the
    state stays a valid JAX and optax state while [`metrics`][jaxreg.transforms.metrics] can
    label its values."""

    def tree_flatten(self):
        return (), tuple(self)

    @classmethod
    def tree_unflatten(cls, aux, children):
        del children
        return cls(aux)


class RegularizeState(NamedTuple):
    """What ``regularize`` measured on its last update, one entry per term (in order).

    Attributes:
      step: the number of updates so far (the step its schedules are evaluated at).
      value: each term's unweighted value.
      weight: each term's weight (after schedules).
      contribution: ``weight * value``.
      grad_norm: the norm of each term's own gradient (NaN unless tracked).
      misplaced: how many consecutive updates found the parameters moved by exactly the
        updates this transform returned the step before, i.e. no transform after it
        scaled them: it sits after the optimizer (see [`regularize`][jaxreg.transforms.regularize]).
          0 when the
        order is right (and when ``check_order=False``).
      probe_params: the first ``PROBE_SIZE`` elements of each floating parameter leaf
        (the order check's memory; a few numbers per leaf).
      probe_predicted: what ``probe_params`` become if this transform's updates are
        applied unchanged.
      names: the terms' names (static).
    """

    step: jax.Array
    value: jax.Array
    weight: jax.Array
    contribution: jax.Array
    grad_norm: jax.Array
    misplaced: jax.Array
    probe_params: tuple[jax.Array, ...]
    probe_predicted: tuple[jax.Array, ...]
    names: TermNames = TermNames()


def _is_float(a: Any) -> bool:
    return a is not None and jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _probe(a: jax.Array) -> jax.Array:
    return jnp.ravel(a)[:PROBE_SIZE]


def _applied(p: jax.Array, u: jax.Array) -> jax.Array:
    """``p + u`` as ``optax.apply_updates`` computes it (promoted, cast back to p's dtype)."""
    dtype = jnp.promote_types(p.dtype, u.dtype)
    return (p.astype(dtype) + u.astype(dtype)).astype(p.dtype)


@jax.tree_util.register_pytree_node_class
class _Split:
    """The batch plus the non-floating parameter leaves, passed beside the floating ones.

    The objective differentiates only the floating leaves; each term function gets the
    whole parameter pytree back (``rebuild``), integer leaves included.
    """

    def __init__(self, batch, others, treedef, positions):
        self.batch, self.others, self.treedef, self.positions = batch, others, treedef, positions

    def tree_flatten(self):
        return (self.batch, self.others), (self.treedef, self.positions)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def rebuild(self, floats: list[Any]) -> Any:
        leaves, f, o = [], iter(floats), iter(self.others)
        for i in range(self.treedef.num_leaves):
            leaves.append(next(f) if i in self.positions else next(o))
        return self.treedef.unflatten(leaves)


def _on_floats(fn):
    def term(floats, split: _Split):
        return fn(split.rebuild(floats), split.batch)

    return term


def regularize(
    terms: Sequence[Any], *, track_grad_norms: bool = True, check_order: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the gradients of weighted parameter penalties to the incoming gradients.

    .. math:: g \leftarrow g + \sum_i w_i \nabla_\theta r_i(\theta)

    **Put it first**, before the transform that turns gradients into steps:
    ``optax.chain(regularize(terms), optax.adam(lr))``, or
    ``regularized(optax.adam(lr), terms)``. After ``adam`` (or ``sgd``...) the incoming
    updates are already steps :math:`-\eta\,\hat g`, and adding :math:`+\nabla r` to
    them climbs the penalty: with an L2 weight of 0.05, a weight of 2.0 becomes 13.46
    in 20 steps. The state recognises that order (the parameters then move by exactly
    what this transform returned) and [`metrics`][jaxreg.transforms.metrics] warns; so does
    ``update`` when it runs outside ``jit``. Between ``optax.scale_by_adam()`` and
    ``optax.scale_by_learning_rate(lr)`` it adds a decoupled penalty (AdamW style): not
    flagged.

    The terms are [`jaxreg.Term`][jaxreg.Term] s (or ``{"name", "fn", "weight"}`` dicts) whose
    function takes the parameters: ``fn(params, batch)`` with ``batch`` the ``batch=``
    extra argument of ``update`` (``None`` if not given). Weights may be optax schedules,
    evaluated at the transform's own step count. Integer and boolean parameter leaves (a
    step counter) are not differentiated and their updates pass through unchanged; the
    term functions still see them. The state keeps each term's last value, weight,
    contribution and grad norm (as ``optax.monitor`` keeps measurements).

    Args:
      terms: the penalties.
      track_grad_norms: also measure each term's gradient norm (one more VJP per term).
      check_order: follow ``PROBE_SIZE`` elements per parameter leaf to recognise a
        transform placed after the optimizer (a few elementwise operations per step).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import jaxreg as jr
      >>> wd = 1e-2
      >>> opt = optax.chain(
      ...     jr.transforms.regularize([jr.Term("l2", jr.regularizers.l2, weight=wd / 2)]),
      ...     optax.sgd(0.1),
      ... )   # the same updates as optax.chain(optax.add_decayed_weights(wd), sgd)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.zeros(2)}, state, params)
      >>> updates["w"].tolist()  # -0.1 * wd * w
      [-0.0010000000474974513, 0.0020000000949949026]
      >>> jr.transforms.metrics(state)["l2"]["value"]
      5.0
    """
    _, regs = normalize_terms(None, terms)
    names = TermNames(t.name for t in regs)
    n = len(regs)
    objective = compose(None, regs, track_grad_norms=track_grad_norms)
    split_objectives: dict[Any, Any] = {}

    def split_objective(key):
        if key not in split_objectives:
            lifted = [dataclasses.replace(t, fn=_on_floats(t.fn)) for t in regs]
            split_objectives[key] = compose(None, lifted, track_grad_norms=track_grad_norms)
        return split_objectives[key]

    def probes(params):
        if not check_order:
            return ()
        return tuple(_probe(a) for a in jax.tree.leaves(params) if _is_float(a))

    def init(params):
        zeros = jnp.zeros((n,), jnp.float32)
        first = tuple(jnp.zeros_like(p) for p in probes(params))
        state = RegularizeState(
            jnp.zeros((), jnp.int32),
            zeros,
            zeros,
            zeros,
            jnp.full((n,), jnp.nan, jnp.float32),
            jnp.zeros((), jnp.int32),
            first,
            first,
            names,
        )
        return gather.placed_like(state, params)  # committed: the first step keeps its trace

    def update(updates, state, params=None, **extra_args):
        if isinstance(updates, CompositeOutput):
            raise TransformError(
                "regularize: updates is a CompositeOutput (the whole output of a jaxreg "
                "objective); pass its gradient: optimizer.update(out.grad, state, params)."
            )
        if params is None:
            raise TransformError(
                "regularize: update(updates, state, params) needs the parameters; "
                f"terms {list(names)} are functions of them"
            )
        leaves, treedef = jax.tree.flatten(params)
        try:
            incoming = treedef.flatten_up_to(updates)
        except (ValueError, TypeError):
            raise TransformError(
                f"regularize: updates must have the structure of params "
                f"{treedef}; found {jax.tree.structure(updates)}. Pass the gradient "
                "(out.grad), shaped like the parameters."
            ) from None
        positions = tuple(i for i, a in enumerate(leaves) if _is_float(a))
        batch = extra_args.get("batch")
        if len(positions) == len(leaves):
            out = objective(params, batch, step=state.step)
            grads = jax.tree.leaves(out.grad)
        else:
            others = [a for i, a in enumerate(leaves) if i not in positions]
            floats = [leaves[i] for i in positions]
            split = _Split(batch, others, treedef, positions)
            out = split_objective((treedef, positions))(floats, split, step=state.step)
            grads = list(out.grad)
        new, emitted = list(incoming), {}
        for i, g in zip(positions, grads, strict=True):
            if _is_float(new[i]):
                # The probe is sliced from the addends, not from the sum: slicing the sum
                # would keep XLA from fusing it into the next transform (a full extra pass).
                emitted[i] = _probe(new[i]) + _probe(g).astype(new[i].dtype)
                new[i] = new[i] + g.astype(new[i].dtype)
            else:  # no incoming update for this leaf (None, or float0 from allow_int)
                emitted[i] = _probe(g)
                new[i] = g
        terms = [out.regularizers[name] for name in names]

        def stack(field):
            return jnp.stack([jnp.asarray(getattr(t, field)).astype(jnp.float32) for t in terms])

        misplaced, probe_params, probe_predicted = _check_order(state, leaves, emitted, positions)
        norms = stack("grad_norm") if track_grad_norms else state.grad_norm
        new_state = RegularizeState(
            state.step + 1,
            stack("value"),
            stack("weight"),
            stack("contribution"),
            norms,
            misplaced,
            probe_params,
            probe_predicted,
            names,
        )
        if check_order and not isinstance(misplaced, jax.core.Tracer):
            _warn_if_misplaced(misplaced, names)
        return treedef.unflatten(new), new_state

    def _check_order(state, leaves, emitted, positions):
        if not check_order:
            return state.misplaced, (), ()
        now = tuple(_probe(leaves[i]) for i in positions)
        predicted = tuple(_applied(now[k], emitted[i]) for k, i in enumerate(positions))
        if not now:
            return state.misplaced, now, predicted
        telling, matches = [], []
        for p_now, p_prev, p_pred in zip(
            now, state.probe_params, state.probe_predicted, strict=True
        ):
            moved = p_pred != p_prev  # the old updates would have changed these elements
            close = jnp.abs(p_now - p_pred) <= 1e-3 * jnp.abs(p_pred - p_prev)
            telling.append(jnp.any(moved))
            matches.append(jnp.all(close | ~moved))
        telling_step = jnp.any(jnp.stack(telling))
        hit = telling_step & jnp.all(jnp.stack(matches))
        misplaced = jnp.where(hit, state.misplaced + 1, jnp.where(telling_step, 0, state.misplaced))
        return misplaced.astype(jnp.int32), now, predicted

    return optax.GradientTransformationExtraArgs(init, update)


def regularized(
    optimizer: optax.GradientTransformation,
    terms: Sequence[Any],
    *,
    track_grad_norms: bool = True,
    check_order: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` with the penalties' gradients added to its input: the safe order.

    The same as ``optax.chain(regularize(terms, ...), optimizer)``.

    Example:
      >>> import optax
      >>> import jaxreg as jr
      >>> opt = jr.transforms.regularized(
      ...     optax.adam(1e-3), [jr.Term("l2", jr.regularizers.l2, weight=5e-3)]
      ... )
    """
    return optax.chain(
        regularize(terms, track_grad_norms=track_grad_norms, check_order=check_order),
        optimizer,
    )


def _warn_if_misplaced(misplaced: Any, names: Sequence[str]) -> None:
    count = int(jax.device_get(misplaced))
    if count >= MISPLACED_AFTER:
        warnings.warn(
            f"jr.transforms.regularize (terms {list(names)}): for {MISPLACED_AFTER} or more "
            "updates in a row the parameters moved by exactly the updates it returned, so "
            "it runs after the "
            "optimizer's scaling (e.g. optax.chain(optax.adam(lr), regularize(...))): its "
            "penalty gradients are added to the final steps unscaled and with the wrong "
            "sign, which pushes the parameters up the penalty. Put it first: "
            "optax.chain(jr.transforms.regularize(...), optax.adam(lr)), or use "
            "jr.transforms.regularized(optax.adam(lr), terms).",
            RegularizeOrderWarning,
            stacklevel=3,
        )


def _find_states(state: Any) -> list[RegularizeState]:
    found = jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, RegularizeState))
    return [s for s in found if isinstance(s, RegularizeState)]


def metrics(state: Any, names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """``{name: {"value", "weight", "contribution", "grad_norm"}}`` from a state (host).

    Args:
      state: the state of [`regularize`][jaxreg.transforms.regularize], or of any optimizer that
        contains it: an ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``... Every
        [`RegularizeState`][jaxreg.transforms.RegularizeState] found in it is read (term names must
        then be distinct).
      names: the terms' names; by default those the state holds. Given, they must be
        as many as the terms of the (single) regularize state.

    Returns:
      One dict per term. Warns
      ([`RegularizeOrderWarning`][jaxreg.transforms.RegularizeOrderWarning]) when the state shows
      that [`regularize`][jaxreg.transforms.regularize] runs after the optimizer's scaling.

    Raises:
      TransformError: no [`RegularizeState`][jaxreg.transforms.RegularizeState] in ``state``,
        duplicate names, or ``names`` of the wrong length.
    """
    states = _find_states(state)
    if not states:
        raise TransformError(
            f"metrics: found no RegularizeState in the state given (a "
            f"{type(state).__name__}); pass the state of jr.transforms.regularize, or of an "
            "optimizer built with it (e.g. optax.chain(jr.transforms.regularize(...), ...))."
        )
    if names is not None:
        if len(states) != 1 or len(names) != len(states[0].value):
            sizes = [len(s.value) for s in states]
            raise TransformError(
                f"metrics: names must list the terms of one regularize state; found "
                f"{len(names)} names for {len(states)} state(s) with {sizes} terms."
            )
        labels = [list(names)]
    else:
        labels = [list(s.names) or [str(i) for i in range(len(s.value))] for s in states]
    fields = ("value", "weight", "contribution", "grad_norm")
    result: dict[str, dict[str, float]] = {}
    for s, labelled in zip(states, labels, strict=True):
        host = jax.device_get(s)
        _warn_if_misplaced(host.misplaced, labelled)
        for i, name in enumerate(labelled):
            if name in result:
                raise TransformError(
                    f"metrics: the term name {name!r} appears in two regularize states; "
                    "give the terms distinct names."
                )
            result[name] = {f: float(getattr(host, f)[i]) for f in fields}
    return result
