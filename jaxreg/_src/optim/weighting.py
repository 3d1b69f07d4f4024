r"""Adaptive term weighting: stateful rules that read an output and set the next weights.

In jaxreg, a *weighting* always means this: the weights of the loss terms of a composed
objective, adapted during training (GradNorm, uncertainty weighting, DWA, FAMO,
``balance_grad_norms``). The weights that gradient aggregators solve for on a
Gramian are a different thing, in ``aggregators`` (``*_weights``,
``from_gramian_weights``).

A weighting is a [`Weighting`][jaxreg.weighting.Weighting] ``(init, update)`` in the optax style:

* ``state = weighting.init(out)`` from a first [`CompositeOutput`][jaxreg.CompositeOutput];
* ``weights, state = weighting.update(out, state)`` after each step, where ``weights``
  is a ``{name: scalar array}`` dict for the next call,
  ``objective(x, batch, weights=weights)`` — a traced argument, so it never recompiles.

Each rule's state is a ``NamedTuple`` of arrays (``BalanceGradNormsState``,
``GradNormState``, ``UncertaintyState``, ``DWAState``,
``FAMOState``), with the same structure on every step. Everything is
``jax.numpy``: ``update`` can live inside the user's jitted step.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxreg as jr
  >>> objective = jr.compose(
  ...     jr.Term("fit", lambda x, batch: jnp.sum((x - 1.0) ** 2)),
  ...     [jr.Term("l2", jr.regularizers.l2, weight=1.0)],
  ...     track_grad_norms=True,
  ... )
  >>> weighting = jr.weighting.balance_grad_norms({"l2": 0.25}, decay=0.0)
  >>> x = jnp.full(3, 2.0)
  >>> out = objective(x, None)
  >>> state = weighting.init(out)
  >>> weights, state = weighting.update(out, state)
  >>> out = objective(x, None, weights=weights)
  >>> t = out.terms
  >>> share = t["l2"].weight * t["l2"].grad_norm
  >>> round(float(share / (share + t["fit"].weight * t["fit"].grad_norm)), 4)
  0.25
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxreg._src.core.errors import ConfigError
from jaxreg._src.core.output import CompositeOutput


class Weighting(NamedTuple):
    """An adaptive weighting of loss terms: a pair of pure functions, as optax's transforms.

    Attributes:
      init: ``init(out) -> state``, from a first ``CompositeOutput``.
      update: ``update(out, state) -> (weights, state)``, with ``weights`` a
        ``{term name: scalar array}`` dict for the objective's next call
        (``objective(x, batch, weights=weights)``).

    Example:
      >>> import jaxreg as jr
      >>> weighting = jr.weighting.dwa(temperature=2.0)
      >>> isinstance(weighting, jr.weighting.Weighting)
      True
    """

    init: Callable[[CompositeOutput], Any]
    update: Callable[[CompositeOutput, Any], tuple[dict[str, jax.Array], Any]]


def _names(out: CompositeOutput, names: Sequence[str] | None) -> tuple[str, ...]:
    all_names = out.term_names
    if names is None:
        return tuple(all_names)
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise ConfigError(f"weighting: unknown term(s) {unknown}; the terms are {list(all_names)}")
    return tuple(names)


def _field(out: CompositeOutput, names, field: str) -> jax.Array:
    terms = out.terms
    values = []
    for n in names:
        v = getattr(terms[n], field)
        if v is None:
            raise ConfigError(
                f"weighting: term {n!r} has no {field}; compose with track_grad_norms=True"
            )
        values.append(jnp.asarray(v, jnp.float32))
    return jnp.stack(values)


def _as_dict(names, w) -> dict[str, jax.Array]:
    return {n: w[i] for i, n in enumerate(names)}


# ------------------------------------------------------------- balance_grad_norms


class BalanceGradNormsState(NamedTuple):
    r"""The state of ``balance_grad_norms``.

    Attributes:
      step: int32 scalar, the number of updates so far.
      norms: float32 ``[n]``, the exponential moving average of every term's unweighted
        gradient norm, in the order of ``out.term_names`` (not yet bias-corrected:
        ``update`` divides by :math:`1 - \mathrm{decay}^{\mathrm{step}}`).
    """

    step: jax.Array
    norms: jax.Array


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

    Returns:
      A ``Weighting`` whose state is a ``BalanceGradNormsState``.
    """
    for name, s in shares.items():
        if not 0 < s < 1:
            raise ConfigError(f"balance_grad_norms: share of {name!r} must be in (0, 1), found {s}")
    total_share = sum(shares.values())
    if total_share > 1 + 1e-6:
        raise ConfigError(f"balance_grad_norms: shares sum to {total_share} > 1")

    def init(out):
        names = out.term_names
        missing = [n for n in shares if n not in names]
        if missing:
            raise ConfigError(
                f"balance_grad_norms: unknown term(s) {missing}; terms: {list(names)}"
            )
        return BalanceGradNormsState(
            jnp.zeros((), jnp.int32), jnp.zeros((len(names),), jnp.float32)
        )

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
        return _as_dict(names, new), BalanceGradNormsState(count, ema)

    return Weighting(init, update)


# ------------------------------------------------------------- gradnorm


class GradNormState(NamedTuple):
    """The state of ``gradnorm``.

    Attributes:
      weights: float32 ``[n]``, the current weights of the weighted terms (in the order
        of ``names``, or of ``out.term_names``).
      initial: float32 ``[n]``, each term's value :math:`L_i(0)` when ``init`` was
        called, the reference of the training rates.
    """

    weights: jax.Array
    initial: jax.Array


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

    Returns:
      A ``Weighting`` whose state is a ``GradNormState``.
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
    r"""The state of ``uncertainty``.

    Attributes:
      log_var: float32 ``[n]``, the learned :math:`s_i = \log\sigma_i^2` (the weights
        are :math:`e^{-s_i}`); zeros after ``init``.
    """

    log_var: jax.Array


def uncertainty(names: Sequence[str] | None = None, *, learning_rate: float = 0.01) -> Weighting:
    r"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018).

    Learns :math:`s_i = \log\sigma_i^2` by gradient descent on
    :math:`\sum_i e^{-s_i} L_i + s_i` and weights each loss by :math:`e^{-s_i}` (the
    stationary point is :math:`s_i = \log L_i`: each weighted loss tends to 1).

    Returns:
      A ``Weighting`` whose state is an ``UncertaintyState``.
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
    """The state of ``dwa``.

    Attributes:
      step: int32 scalar, the number of updates so far.
      previous: float32 ``[2, n]``, the last two values of each term,
        :math:`L(t-1)` then :math:`L(t-2)` (ones after ``init``).
    """

    step: jax.Array
    previous: jax.Array


def dwa(names: Sequence[str] | None = None, *, temperature: float = 2.0) -> Weighting:
    r"""Dynamic Weight Average (Liu, Johns & Davison 2019).

    :math:`w_i(t) = n\,\frac{\exp(r_i/T)}{\sum_j \exp(r_j/T)}` with
    :math:`r_i = L_i(t-1)/L_i(t-2)`: terms whose loss falls slowly get more weight.
    Weights are 1 until two losses have been seen.

    Returns:
      A ``Weighting`` whose state is a ``DWAState``.
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
    r"""The state of ``famo``.

    Attributes:
      logits: float32 ``[n]``, the logits :math:`\xi` of the task distribution
        :math:`z = \mathrm{softmax}(\xi)`.
      opt_state: the state of the AdamW optimizer that moves the logits.
      previous: float32 ``[n]``, :math:`D_i(t-1) = L_i - L_i^* + 10^{-8}` at the last
        update (ones after ``init``).
      step: int32 scalar, the number of updates so far.
    """

    logits: jax.Array
    opt_state: Any
    previous: jax.Array
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

    Returns:
      A ``Weighting`` whose state is a ``FAMOState``.
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
