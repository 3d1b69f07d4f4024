r"""Task weightings that read a task-by-task matrix: MoDo, SDMGrad and CR-MOGM (TorchJD's).

These set the weights of the loss terms, as ``jaxreg.weighting``'s rules do, but from an
``n x n`` matrix of inner products of the terms' gradients rather than from one
``CompositeOutput``: MoDo and SDMGrad read :math:`A = J_1 J_2^\top` of two independent
batches (``jr.aggregators.cross_gramian``), which one output does not hold. A
[`MatrixWeighting`][jaxreg.weighting.MatrixWeighting] is a pair of pure functions:

* ``state = weighting.init(num_tasks)``;
* ``weights, state = weighting.update(matrix, state)``, ``weights`` an ``[n]`` array:
  the loss weights of the next step (``objective(x, batch, weights=...)``), or the
  Gramian weights of an aggregator (``as_aggregator``).

The state is a ``NamedTuple`` of arrays with the same structure on every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.experimental import aggregating

from jaxreg._src.core import gather
from jaxreg._src.core.errors import ConfigError
from jaxreg._src.optim.aggregators import apply_weights, gramian


class MatrixWeighting(NamedTuple):
    """A task weighting on an ``n x n`` matrix: ``init(num_tasks)``, ``update(matrix, state)``.

    Attributes:
      init: ``init(num_tasks) -> state``.
      update: ``update(matrix, state) -> (weights, state)``, ``weights`` of shape ``[n]``.

    Example:
      >>> import jaxreg as jr
      >>> isinstance(jr.weighting.modo(), jr.weighting.MatrixWeighting)
      True
    """

    init: Callable[[int], Any]
    update: Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def project_simplex(y: jax.Array) -> jax.Array:
    r"""The Euclidean projection of ``y`` onto the probability simplex (sort-based):
    :math:`(y - \theta)^+` with :math:`\theta` such that the result sums to 1.

    ``y`` is first shifted by its maximum (the projection is invariant to adding a
    constant to every entry), so the threshold stays exact for entries of any size (at
    :math:`|y| \sim 10^{16}` unshifted, :math:`u_1 - (u_1 - 1)` rounds to 0 and every
    weight to 0, as in TorchJD 0.18).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> print(jr.weighting.project_simplex(jnp.array([1e20, 0.0])))
      [1. 0.]
    """
    n = y.shape[0]
    y = y - jnp.max(y)
    u = jnp.sort(y)[::-1]
    css = jnp.cumsum(u)
    k = jnp.arange(1, n + 1, dtype=y.dtype)
    cond = u - (css - 1.0) / k > 0
    rho = jnp.max(jnp.where(cond, jnp.arange(n), 0))
    theta = (css[rho] - 1.0) / (rho.astype(y.dtype) + 1.0)
    return jnp.maximum(y - theta, 0.0)


def _state_dtype():
    """float64 when x64 is enabled, else float32 (the states follow the solves)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _float(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


# ----------------------------------------------------------------------------- MoDo


class MoDoState(NamedTuple):
    r"""The state of ``modo``.

    Attributes:
      weights: ``[n]``, the task weights :math:`\lambda` (uniform after ``init``; float64
        when x64 is enabled, else float32).
    """

    weights: jax.Array


def modo(gamma: float = 0.1, rho: float = 0.1) -> MatrixWeighting:
    r"""MoDo (Chen et al. 2024, "Three-Way Trade-Off in Multi-Objective Learning").

    One projected gradient step on :math:`\tfrac12 \|\lambda^\top J\|^2 + \tfrac\rho2
    \|\lambda\|^2` over the simplex, with the gradient estimated from two independent
    batches (:math:`A = J_1 J_2^\top`, Eq. 2.9a):

    .. math:: \lambda \leftarrow \Pi_\Delta(\lambda - \gamma (A \lambda + \rho \lambda)).

    The weights are the new :math:`\lambda` (on the simplex), starting from :math:`1/n`.
    Use them on the mean of the two batches' losses (Eq. 2.9b) or on a third batch.

    Args:
      gamma: the step size of :math:`\lambda`, ``> 0``.
      rho: the :math:`\ell_2` regularisation, ``>= 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> weighting = jr.weighting.modo(gamma=0.1, rho=0.0)
      >>> a = jnp.array([[4.0, 0.0], [0.0, 1.0]])  # task 0 has the larger gradient
      >>> w, state = weighting.update(a, weighting.init(2))
      >>> [round(float(v), 4) for v in w]
      [0.425, 0.575]
    """
    if not gamma > 0:
        raise ConfigError(f"modo: gamma must be > 0, found {gamma!r}")
    if not rho >= 0:
        raise ConfigError(f"modo: rho must be >= 0, found {rho!r}")

    def init(num_tasks):
        return MoDoState(jnp.full((num_tasks,), 1.0 / num_tasks, _state_dtype()))

    def update(matrix, state):
        a = _float(matrix)
        lam = state.weights.astype(a.dtype)
        lam = project_simplex(lam - gamma * (a @ lam + rho * lam))
        return lam, MoDoState(lam.astype(state.weights.dtype))

    return MatrixWeighting(init, update)


# -------------------------------------------------------------------------- SDMGrad


class SDMGradState(NamedTuple):
    r"""The state of ``sdmgrad``.

    Attributes:
      weights: ``[n]``, the inner iterate :math:`w` on the simplex (uniform after
        ``init``; float64 when x64 is enabled, else float32).
    """

    weights: jax.Array


def sdmgrad(
    lr: float = 10.0,
    momentum: float = 0.5,
    iterations: int = 20,
    lambda_: float = 0.3,
    pref_vector: Any = None,
) -> MatrixWeighting:
    r"""SDMGrad (Xiao et al. 2023, "Direction-oriented Multi-objective Learning").

    The weights solve :math:`\min_{w\in\Delta} \tfrac12\|J^\top(w + \lambda\tilde
    w)\|^2` approximately, by ``iterations`` steps of projected SGD with momentum on
    :math:`A = J_1 J_2^\top / s^2` (two independent batches; :math:`s` the mean of
    :math:`\sqrt{A_{ii}^+}`, plus ``1e-8`` on :math:`s^2`, as the official code): with
    :math:`v \leftarrow \mu v + A(w + \lambda\tilde w)` (:math:`v` the first gradient
    at the first iteration), :math:`w \leftarrow \Pi_\Delta(w - \eta v)`. The
    iterate :math:`w` persists across calls; the weights are
    :math:`(w + \lambda\tilde w)/(1 + \lambda)` (on the simplex). :math:`\tilde w` is
    ``pref_vector`` (default :math:`1/n`: the direction is pulled to the mean gradient).

    Args:
      lr: the inner step size :math:`\eta > 0`.
      momentum: :math:`\mu` in [0, 1).
      iterations: the number of inner steps, ``>= 1``.
      lambda_: :math:`\lambda \ge 0`, the pull towards the preference direction.
      pref_vector: ``[n]`` preference :math:`\tilde w`, or ``None`` (uniform).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> weighting = jr.weighting.sdmgrad(lr=0.5, iterations=100, lambda_=0.0)
      >>> w, _ = weighting.update(jnp.array([[1.0, -1.0], [-1.0, 2.0]]), weighting.init(2))
      >>> [round(float(v), 3) for v in w]  # MGDA's weights (0.6, 0.4)
      [0.6, 0.4]
    """
    if not lr > 0:
        raise ConfigError(f"sdmgrad: lr must be > 0, found {lr!r}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"sdmgrad: momentum must be in [0, 1), found {momentum!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ConfigError(f"sdmgrad: iterations must be an int >= 1, found {iterations!r}")
    if not lambda_ >= 0:
        raise ConfigError(f"sdmgrad: lambda_ must be >= 0, found {lambda_!r}")

    def init(num_tasks):
        if pref_vector is not None and jnp.shape(pref_vector) != (num_tasks,):
            raise ConfigError(
                f"sdmgrad: pref_vector must have shape ({num_tasks},), "
                f"found {jnp.shape(pref_vector)}"
            )
        return SDMGradState(jnp.full((num_tasks,), 1.0 / num_tasks, _state_dtype()))

    def update(matrix, state):
        a = _float(matrix)
        n = a.shape[0]
        wt = (
            jnp.full((n,), 1.0 / n, a.dtype)
            if pref_vector is None
            else jnp.asarray(pref_vector, a.dtype)
        )
        scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(a), 0.0)))
        a = a / (scale**2 + 1e-8)
        w = state.weights.astype(a.dtype)
        grad = a @ (w + lambda_ * wt)
        w = project_simplex(w - lr * grad)

        def body(_, c):
            w, v = c
            v = momentum * v + a @ (w + lambda_ * wt)
            return project_simplex(w - lr * v), v

        w, _ = jax.lax.fori_loop(1, iterations, body, (w, grad))
        return (w + lambda_ * wt) / (1.0 + lambda_), SDMGradState(w.astype(state.weights.dtype))

    return MatrixWeighting(init, update)


# -------------------------------------------------------------------------- CR-MOGM


class CRMOGMState(NamedTuple):
    r"""The state of ``cr_mogm``.

    Attributes:
      weights: ``[n]``, the smoothed weights :math:`\lambda_{k-1}` (float64 when x64
        is enabled, else float32).
      started: bool scalar, whether :math:`\lambda_0` is set (``initial_weights`` given,
        or one update done).
      inner: the wrapped weighting's state (``()`` for a stateless function).
    """

    weights: jax.Array
    started: jax.Array
    inner: Any


def cr_mogm(weighting: Any, alpha: float = 0.9, initial_weights: Any = None) -> MatrixWeighting:
    r"""CR-MOGM (Zhou et al. 2022, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond"): an exponential moving average of another
    weighting's weights.

    .. math:: \lambda_k = \alpha \lambda_{k-1} + (1 - \alpha)\hat\lambda_k,

    :math:`\hat\lambda_k` the wrapped weighting's weights; :math:`\lambda_0` is
    ``initial_weights``, or :math:`\hat\lambda_1` (the first output is then
    :math:`\hat\lambda_1` whatever :math:`\alpha`). ``alpha = 0`` passes the weights
    through; ``alpha = 1`` freezes them at :math:`\lambda_0`. The paper's schedule
    (:math:`\alpha_k \to 1` as the learning rate decays) needs a new weighting per value.

    Args:
      weighting: a ``MatrixWeighting``, or a stateless Gramian weight function
        ``fn(matrix) -> weights`` (e.g. ``jr.aggregators.upgrad_weights``).
      alpha: the weight on the previous weights, in [0, 1].
      initial_weights: ``[n]`` weights :math:`\lambda_0`, or ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> smoothed = jr.weighting.cr_mogm(jr.aggregators.mgda_weights, alpha=0.5)
      >>> state = smoothed.init(2)
      >>> w, state = smoothed.update(jnp.array([[1.0, 0.0], [0.0, 1.0]]), state)
      >>> w, state = smoothed.update(jnp.array([[1.0, 0.0], [0.0, 4.0]]), state)
      >>> [round(float(v), 4) for v in w]  # (0.5, 0.5) and (0.8, 0.2) averaged
      [0.65, 0.35]
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"cr_mogm: alpha must be in [0, 1], found {alpha!r}")
    stateful = isinstance(weighting, MatrixWeighting)
    if not (stateful or callable(weighting)):
        raise ConfigError(
            f"cr_mogm: weighting must be a MatrixWeighting or a function, found {weighting!r}"
        )

    def init(num_tasks):
        if initial_weights is not None and jnp.shape(initial_weights) != (num_tasks,):
            raise ConfigError(
                f"cr_mogm: initial_weights must have shape ({num_tasks},), "
                f"found {jnp.shape(initial_weights)}"
            )
        started = initial_weights is not None
        lam = (
            jnp.asarray(initial_weights, _state_dtype())
            if started
            else jnp.zeros((num_tasks,), _state_dtype())
        )
        inner = weighting.init(num_tasks) if stateful else ()
        return CRMOGMState(lam, jnp.asarray(started), inner)

    def update(matrix, state):
        if stateful:
            hat, inner = weighting.update(matrix, state.inner)
        else:
            hat, inner = weighting(matrix), ()
        prev = jnp.where(state.started, state.weights.astype(hat.dtype), hat)
        lam = alpha * prev + (1.0 - alpha) * hat
        return lam, CRMOGMState(lam.astype(state.weights.dtype), jnp.asarray(True), inner)

    return MatrixWeighting(init, update)


# ------------------------------------------------------------------ as an aggregator


class WeightingAggregatorState(NamedTuple):
    """The state of ``as_aggregator``.

    Attributes:
      inner: the weighting's state.
      weights: ``[n]``, the last weights (float64 when x64 is enabled, else float32).
    """

    inner: Any
    weights: jax.Array


def as_aggregator(weighting: MatrixWeighting, num_tasks: int) -> aggregating.Aggregator:
    r"""An ``optax`` aggregator that weights the stacked gradients with a ``MatrixWeighting``.

    Each update forms the Gramian :math:`G` of the stacked gradients
    (``jr.aggregators.gramian``), calls ``weighting.update(G, state)`` and returns
    :math:`w^\top J`. MoDo and SDMGrad are meant for the cross-Gramian of two independent
    batches (``jr.aggregators.cross_gramian``); on one batch's Gramian their convergence
    guarantee does not hold (TorchJD's warning). For CR-MOGM around a Gramian weight
    function this is TorchJD's ``GramianWeightedAggregator(CRMOGMWeighting(...))``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> smoothed = jr.weighting.cr_mogm(jr.aggregators.upgrad_weights, alpha=0.5)
      >>> agg = jr.weighting.as_aggregator(smoothed, num_tasks=2)
      >>> update, state = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> print(state.weights)
      [1.   0.75]
    """
    if not isinstance(weighting, MatrixWeighting):
        raise ConfigError(
            f"as_aggregator: weighting must be a MatrixWeighting, found {type(weighting).__name__}"
        )

    def init(params):
        state = WeightingAggregatorState(
            weighting.init(num_tasks), jnp.zeros((num_tasks,), _state_dtype())
        )
        return gather.placed_like(state, params)

    def update(stacked, state, params=None, **extra):
        del params, extra
        w, inner = weighting.update(gramian(stacked), state.inner)
        return apply_weights(w, stacked), WeightingAggregatorState(
            inner, jnp.asarray(w, state.weights.dtype)
        )

    return aggregating.Aggregator(init, update)
