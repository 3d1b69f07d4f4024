"""Adaptive term weighting: stateful rules that read an output and set the next weights.

A weighting is a [`Weighting`][jaxreg.weighting.Weighting] ``(init, update)`` in the optax style:

* ``state = weighting.init(out)`` from a first [`CompositeOutput`][jaxreg.CompositeOutput];
* ``weights, state = weighting.update(out, state)`` after each step, where ``weights``
  is a ``{name: scalar array}`` dict for the next call,
  ``objective(x, batch, weights=weights)`` — a traced argument, so it never recompiles.

Everything is ``jax.numpy``: ``update`` can live inside the user's jitted step.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxreg as jr
  >>> objective = jr.compose(
  ...     jr.Term("fit", lambda x, batch: 3 * x[0]),      # |grad| = 3
  ...     [jr.Term("pen", lambda x, batch: x[1] ** 2)],   # |grad| = 4 at x[1] = 2
  ...     track_grad_norms=True,
  ... )
  >>> weighting = jr.weighting.balance_grad_norms({"pen": 0.2})
  >>> x = jnp.array([0.0, 2.0])
  >>> out = objective(x)
  >>> state = weighting.init(out)
  >>> for step in range(3):
  ...     weights, state = weighting.update(out, state)
  ...     out = objective(x, weights=weights)      # traced weights: no recompilation
  >>> round(float(weights["pen"]), 4)              # 0.2 * (3 / 0.8) / 4
  0.1875
  >>> pen = out.regularizers["pen"]                # 20% of the weighted grad norms
  >>> round(float(pen.grad_norm_weighted / (3 + pen.grad_norm_weighted)), 4)
  0.2
  >>> objective.trace_count
  1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxreg._src.core.output import CompositeOutput


class Weighting(NamedTuple):
    """A pair of pure functions ``init(out) -> state`` and ``update(out, state)``."""

    init: Callable[[CompositeOutput], Any]
    update: Callable[[CompositeOutput, Any], tuple[dict[str, jax.Array], Any]]


def _names(out: CompositeOutput, names: Sequence[str] | None) -> tuple[str, ...]:
    all_names = out.term_names
    if names is None:
        return tuple(all_names)
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise ValueError(f"weighting: unknown term(s) {unknown}; the terms are {list(all_names)}")
    return tuple(names)


def _field(out: CompositeOutput, names, field: str) -> jax.Array:
    terms = out.terms
    values = []
    for n in names:
        v = getattr(terms[n], field)
        if v is None:
            raise ValueError(
                f"weighting: term {n!r} has no {field}; compose with track_grad_norms=True"
            )
        values.append(jnp.asarray(v, jnp.float32))
    return jnp.stack(values)


def _as_dict(names, w) -> dict[str, jax.Array]:
    return {n: w[i] for i, n in enumerate(names)}


# ------------------------------------------------------------- balance_grad_norms


class BalanceState(NamedTuple):
    step: jax.Array
    norms: jax.Array  # bias-corrected EMA of the unweighted grad norms, all terms


def balance_grad_norms(shares: Mapping[str, float], *, decay: float = 0.9) -> Weighting:
    r"""Sets each named term's weight so its weighted grad norm is a chosen share.

    With :math:`n_i` the (exponentially averaged) norm of term :math:`i`'s gradient, the
    terms in ``shares`` get :math:`w_i = s_i T / n_i` where :math:`T` is the sum of all
    weighted grad norms, :math:`T = \sum_{j \notin S} w_j n_j / (1 - \sum_{i\in S} s_i)`
    (the other terms, e.g. the base loss, keep their weights). When every term has a
    share, the shares must sum to 1 and :math:`T` is the current sum.

    This is what tuning regularizer weights by hand aims at: "KL should be 20% of the
    gradient, entropy 5%", whatever the scales of the losses.

    Args:
      shares: ``{name: share}``, shares in (0, 1).
      decay: EMA decay of the norms (0: use each step's norms as they are).
    """
    for name, s in shares.items():
        if not 0 < s < 1:
            raise ValueError(f"balance_grad_norms: share of {name!r} must be in (0, 1), found {s}")
    total_share = sum(shares.values())
    if total_share > 1 + 1e-6:
        raise ValueError(f"balance_grad_norms: shares sum to {total_share} > 1")

    def init(out):
        names = out.term_names
        missing = [n for n in shares if n not in names]
        if missing:
            raise ValueError(f"balance_grad_norms: unknown term(s) {missing}; terms: {list(names)}")
        return BalanceState(jnp.zeros((), jnp.int32), jnp.zeros((len(names),), jnp.float32))

    def update(out, state):
        names = out.term_names
        norms = _field(out, names, "grad_norm")
        weights = _field(out, names, "weight")
        count = state.step + 1
        ema = decay * state.norms + (1 - decay) * norms
        avg = ema / (1 - decay ** count.astype(jnp.float32)) if decay > 0 else norms
        in_s = jnp.array([n in shares for n in names])
        s = jnp.array([shares.get(n, 0.0) for n in names], jnp.float32)
        others = jnp.sum(jnp.where(in_s, 0.0, weights * avg))
        if len(shares) == len(names):
            total = jnp.sum(weights * avg)
        else:
            total = others / (1.0 - total_share)
        safe = jnp.where(avg > 0, avg, 1.0)
        new = jnp.where(in_s & (avg > 0), s * total / safe, weights)
        return _as_dict(names, new), BalanceState(count, ema)

    return Weighting(init, update)


# ------------------------------------------------------------- gradnorm


class GradNormState(NamedTuple):
    weights: jax.Array
    initial: jax.Array  # L_i(0)


def gradnorm(
    names: Sequence[str] | None = None, *, alpha: float = 1.5, learning_rate: float = 0.025
) -> Weighting:
    r"""GradNorm (Chen et al. 2018): equalise weighted grad norms, scaled by training rates.

    With :math:`G_i = w_i \|\nabla L_i\|`, :math:`\bar G` their mean, the relative inverse
    training rate :math:`r_i = \tilde L_i / \operatorname{mean}_j \tilde L_j`,
    :math:`\tilde L_i = L_i(t) / L_i(0)`, one gradient step on
    :math:`\sum_i |G_i - \bar G r_i^\alpha|` (target held constant) updates the
    weights, which are then clipped at 0 and renormalised to their initial sum.
    Here :math:`\|\nabla L_i\|` is the gradient norm with respect to ``x`` (the paper
    uses the last shared layer).
    """

    def init(out):
        ns = _names(out, names)
        return GradNormState(_field(out, ns, "weight"), _field(out, ns, "value"))

    def update(out, state):
        ns = _names(out, names)
        norms = _field(out, ns, "grad_norm")
        values = _field(out, ns, "value")
        g = state.weights * norms
        ratio = values / jnp.where(state.initial != 0, state.initial, 1.0)
        r = ratio / jnp.mean(ratio)
        target = jax.lax.stop_gradient(jnp.mean(g) * r**alpha)
        w = jnp.maximum(state.weights - learning_rate * jnp.sign(g - target) * norms, 0.0)
        total = jnp.sum(state.weights)
        w = w * total / jnp.maximum(jnp.sum(w), 1e-12)
        return _as_dict(ns, w), GradNormState(w, state.initial)

    return Weighting(init, update)


# ------------------------------------------------------------- uncertainty


class UncertaintyState(NamedTuple):
    log_var: jax.Array


def uncertainty(names: Sequence[str] | None = None, *, learning_rate: float = 0.01) -> Weighting:
    r"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018).

    Learns :math:`s_i = \log\sigma_i^2` by gradient descent on
    :math:`\sum_i e^{-s_i} L_i + s_i` and weights each loss by :math:`e^{-s_i}` (the
    stationary point is :math:`s_i = \log L_i`: each weighted loss tends to 1).
    """

    def init(out):
        return UncertaintyState(jnp.zeros((len(_names(out, names)),), jnp.float32))

    def update(out, state):
        ns = _names(out, names)
        values = _field(out, ns, "value")
        grad = 1.0 - jnp.exp(-state.log_var) * values
        s = state.log_var - learning_rate * grad
        return _as_dict(ns, jnp.exp(-s)), UncertaintyState(s)

    return Weighting(init, update)


# ------------------------------------------------------------- dwa


class DWAState(NamedTuple):
    step: jax.Array
    previous: jax.Array  # [2, n]: L(t-1), L(t-2)


def dwa(names: Sequence[str] | None = None, *, temperature: float = 2.0) -> Weighting:
    r"""Dynamic Weight Average (Liu, Johns & Davison 2019).

    :math:`w_i(t) = n\,\frac{\exp(r_i/T)}{\sum_j \exp(r_j/T)}` with
    :math:`r_i = L_i(t-1)/L_i(t-2)`: terms whose loss falls slowly get more weight.
    Weights are 1 until two losses have been seen.
    """

    def init(out):
        n = len(_names(out, names))
        return DWAState(jnp.zeros((), jnp.int32), jnp.ones((2, n), jnp.float32))

    def update(out, state):
        ns = _names(out, names)
        values = _field(out, ns, "value")
        previous = jnp.stack([values, state.previous[0]])
        count = state.step + 1
        r = previous[0] / jnp.where(previous[1] != 0, previous[1], 1.0)
        w = len(ns) * jax.nn.softmax(r / temperature)
        w = jnp.where(count >= 2, w, jnp.ones_like(w))
        return _as_dict(ns, w), DWAState(count, previous)

    return Weighting(init, update)


# ------------------------------------------------------------- famo


class FAMOState(NamedTuple):
    logits: jax.Array
    opt_state: Any
    previous: jax.Array  # D(t-1)
    step: jax.Array


def famo(
    names: Sequence[str] | None = None,
    *,
    learning_rate: float = 0.025,
    gamma: float = 0.001,
    min_losses: Any = 0.0,
) -> Weighting:
    r"""FAMO (Liu et al. 2023, "Fast Adaptive Multitask Optimization").

    Minimises :math:`\sum_i z_i \log D_i / c` with :math:`z = \mathrm{softmax}(\xi)`,
    :math:`D_i = L_i - L_i^* + 10^{-8}` and :math:`c = \sum_i z_i / D_i`, i.e. weights
    :math:`w_i = z_i / (c D_i)` on the raw losses. After each step the logits move to
    favour the terms whose log loss fell least: with
    :math:`\delta_i = \log D_i(t-1) - \log D_i(t)`,
    :math:`\xi \leftarrow \mathrm{AdamW}(\xi, J_{\mathrm{softmax}}(\xi)^\top\delta)`
    with learning rate ``learning_rate`` and weight decay ``gamma``, as the official code.
    """
    opt = optax.adamw(learning_rate, weight_decay=gamma)

    def init(out):
        n = len(_names(out, names))
        logits = jnp.zeros((n,), jnp.float32)
        return FAMOState(
            logits, opt.init(logits), jnp.ones((n,), jnp.float32), jnp.zeros((), jnp.int32)
        )

    def update(out, state):
        ns = _names(out, names)
        d = _field(out, ns, "value") - jnp.asarray(min_losses, jnp.float32) + 1e-8
        delta = jnp.log(state.previous) - jnp.log(d)
        _, vjp = jax.vjp(jax.nn.softmax, state.logits)
        (direction,) = vjp(delta)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
            updates, opt_state = opt.update(direction, state.opt_state, state.logits)
        moved = optax.apply_updates(state.logits, updates)
        first = state.step == 0
        logits = jnp.where(first, state.logits, moved)
        opt_state = jax.tree.map(lambda a, b: jnp.where(first, a, b), state.opt_state, opt_state)
        z = jax.nn.softmax(logits)
        c = jnp.sum(z / d)
        w = z / (c * d)
        return _as_dict(ns, w), FAMOState(logits, opt_state, d, state.step + 1)

    return Weighting(init, update)
