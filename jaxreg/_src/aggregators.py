"""Aggregators: combine stacked per-term gradients into one update direction.

Each aggregator is an ``optax.experimental.aggregating.Aggregator``: its ``update``
takes the per-term gradients stacked on a leading axis (``[n, *param_shape]`` leaves,
as ``compose(..., term_grads=True)`` returns them in ``out.term_grads``) and returns
one update shaped like the parameters, so it chains with ``optax.chain`` /
``aggregating.process``. Every method here needs only the Gramian
:math:`G = J J^\\top` of the ``n`` gradients (``n x n``): the weights are solved on
``G`` and the update is :math:`w^\\top J`, as TorchJD's weightings do — one pass
over the parameters to form ``G`` and one to combine. Jit the update together with the
objective (one training step): XLA then reads each term's gradient where it was
computed, without building the stacked array.

Example:
  >>> out = objective(params, batch)                 # compose(..., term_grads=True)
  >>> agg = jr.aggregators.upgrad()
  >>> state = agg.init(params)
  >>> update, state = agg.update(out.term_grads, state)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.experimental import aggregating

from jaxreg._src.linalg import cross_gram, weighted_rows

WeightFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


# Up to this many pairwise reductions (pairs of terms x leaves), the Gramian is one
# reduction per pair of rows. Inside one jit with the objective (a training step), XLA
# then reads each term's gradient where it was computed and never builds the stacked
# array, which a product of the stacked array with itself makes it materialise first:
# 8 terms over 1M parameters at batch 128 cost +10-16% over compose instead of +97%. (On
# an already stacked array, as in a separately jitted update, the blockwise product is
# faster: 2.9 ms against about 7 ms.) Compile time bounds the count: 360 reductions
# compile in about 1 s, 1000 in 6 s.
_PAIRWISE_MAX = 384


def gramian(stacked: Any) -> jax.Array:
    r"""The Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of stacked gradients."""
    acc = functools.reduce(
        jnp.promote_types, [x.dtype for x in jax.tree.leaves(stacked)], jnp.float32
    )
    leaves = [leaf.astype(acc) for leaf in jax.tree.leaves(stacked)]  # no-op for float32
    n = leaves[0].shape[0]
    if n * (n + 1) // 2 * len(leaves) <= _PAIRWISE_MAX:
        rows = [[leaf[i] for leaf in leaves] for i in range(n)]
        entries = {
            (i, j): sum(jnp.sum(a * b) for a, b in zip(rows[i], rows[j], strict=True))
            for i in range(n)
            for j in range(i, n)
        }
        return jnp.stack(
            [jnp.stack([entries[min(i, j), max(i, j)] for j in range(n)]) for i in range(n)]
        )
    flat = [leaf.reshape(n, -1) for leaf in leaves]
    return sum((cross_gram(f, f) for f in flat), start=jnp.zeros((n, n), acc))


def combine(weights: jax.Array, stacked: Any) -> Any:
    r"""The update :math:`\sum_i w_i g_i` (a pytree shaped like one gradient)."""
    return jax.tree.map(lambda g: weighted_rows(weights, g), stacked)


class WeightingState(NamedTuple):
    """State of a Gramian weighting: a PRNG key (used by PCGrad's random order)."""

    key: jax.Array


def from_weighting(weighting: WeightFn, seed: int = 0) -> aggregating.Aggregator:
    """An ``Aggregator`` from a function ``(G, key) -> (weights, key)`` on the Gramian."""

    def init(params):
        del params
        return WeightingState(jax.random.key(seed))

    def update(stacked, state, params=None, **extra):
        del params, extra
        w, key = weighting(gramian(stacked), state.key)
        return combine(w, stacked), WeightingState(key)

    return aggregating.Aggregator(init, update)


# --------------------------------------------------------------------- the methods


def weighted_sum(weights: Any = None) -> aggregating.Aggregator:
    r"""Plain weighted sum :math:`\sum_i w_i g_i` (``weights=None``: all ones)."""

    def weighting(g, key):
        n = g.shape[0]
        w = jnp.ones((n,), g.dtype) if weights is None else jnp.asarray(weights, g.dtype)
        return w, key

    return from_weighting(weighting)


def pcgrad_weights(g: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""PCGrad's weights on the Gramian (Yu et al. 2020, "Gradient Surgery").

    For each task :math:`i`, visiting the others in a random order, project
    :math:`g_i^{pc}` off :math:`g_j` when they conflict:
    :math:`g_i^{pc} \leftarrow g_i^{pc} - \frac{g_i^{pc}\cdot g_j}{\|g_j\|^2} g_j` if
    :math:`g_i^{pc}\cdot g_j < 0`. The update is :math:`\sum_i g_i^{pc}`. Tracked as
    coefficients :math:`g_i^{pc} = C_i J`, so only :math:`G` is needed.
    """
    n = g.shape[0]
    key, sub = jax.random.split(key)
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(sub, n))
    eye = jnp.eye(n, dtype=g.dtype)

    def project(i, order):
        def body(t, c):
            j = order[t]
            dot = c @ g[:, j]
            conflict = (j != i) & (dot < 0) & (g[j, j] > 0)
            return c - jnp.where(conflict, dot / jnp.where(g[j, j] > 0, g[j, j], 1.0), 0.0) * eye[j]

        return jax.lax.fori_loop(0, n, body, eye[i])

    coefficients = jax.vmap(project)(jnp.arange(n), orders)
    return coefficients.sum(0), key


def pcgrad(seed: int = 0) -> aggregating.Aggregator:
    """PCGrad (Yu et al. 2020): project away conflicting components, then sum.

    See :func:`pcgrad_weights`. The visiting order is random (``seed``), as published.
    """
    return from_weighting(pcgrad_weights, seed=seed)


def _min_norm_simplex(g: jax.Array, iterations: int) -> jax.Array:
    """Frank-Wolfe for :math:`\\min_{w \\in \\Delta} w^\\top G w` (Sener & Koltun 2018)."""
    n = g.shape[0]

    def body(_, w):
        gw = g @ w
        t = jnp.argmin(gw)
        a, b, c = w @ gw, gw[t], g[t, t]
        denom = a - 2 * b + c
        gamma = jnp.where(
            denom > 0, jnp.clip((a - b) / jnp.where(denom > 0, denom, 1.0), 0, 1), 0.0
        )
        return (1 - gamma) * w + gamma * jax.nn.one_hot(t, n, dtype=g.dtype)

    return jax.lax.fori_loop(0, iterations, body, jnp.full((n,), 1.0 / n, g.dtype))


def mgda(iterations: int = 250) -> aggregating.Aggregator:
    r"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the convex hull.

    :math:`w^* = \arg\min_{w \in \Delta_n} \|w^\top J\|^2`, solved on the Gramian with
    Frank-Wolfe and exact line search; the update is :math:`{w^*}^\top J`, a common
    descent direction of every term (zero at a Pareto-stationary point).
    """
    return from_weighting(lambda g, key: (_min_norm_simplex(g, iterations), key))


def _nonneg_qp(g: jax.Array, start: jax.Array, iterations: int) -> jax.Array:
    r""":math:`\arg\min_{v \ge \text{start}} v^\top G v` by projected gradient descent."""
    step = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(g)[-1], 1e-12)

    def body(_, v):
        return jnp.maximum(v - step * (g @ v), start)

    # Nesterov-free projected gradient; G is tiny (n x n), so many steps are cheap.
    return jax.lax.fori_loop(0, iterations, body, start)


def upgrad_weights(g: jax.Array, iterations: int = 500) -> jax.Array:
    r"""UPGrad's weights (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
    Optimization"): project each :math:`g_i` onto the dual cone
    :math:`\{x : \langle x, g_j\rangle \ge 0\ \forall j\}` and average the projections.

    The projection of :math:`g_i` is :math:`v_i^\top J` with
    :math:`v_i = \arg\min_{v \ge e_i} v^\top G v` (the dual of the projection problem).
    """
    n = g.shape[0]
    scale = jnp.maximum(jnp.trace(g) / n, jnp.finfo(g.dtype).tiny)
    gn = g / scale  # conditioning; the minimiser does not change
    v = jax.vmap(lambda e: _nonneg_qp(gn, e, iterations))(jnp.eye(n, dtype=g.dtype))
    return v.mean(0)


def upgrad(iterations: int = 500) -> aggregating.Aggregator:
    """UPGrad (Quinton & Rey 2024): average of the gradients projected onto the dual cone.

    The result has a non-negative inner product with every term's gradient (no term
    gets worse to first order), and equals the mean when nothing conflicts.
    """
    return from_weighting(lambda g, key: (upgrad_weights(g, iterations), key))


def _project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
    n = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u)
    k = jnp.arange(1, n + 1, dtype=v.dtype)
    rho = jnp.max(jnp.where(u - (css - 1) / k > 0, jnp.arange(n), 0))
    theta = (css[rho] - 1) / (rho + 1).astype(v.dtype)
    return jnp.maximum(v - theta, 0)


def cagrad_weights(g: jax.Array, c: float = 0.5, rescale: int = 1, iterations: int = 500):
    r"""CAGrad's weights (Liu et al. 2021, "Conflict-Averse Gradient Descent").

    With :math:`g_0` the mean gradient, solve
    :math:`w^* = \arg\min_{w\in\Delta} g_w^\top g_0 + c\|g_0\|\|g_w\|`
    (:math:`g_w = w^\top J`), then :math:`d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w`,
    divided by :math:`1 + c^2` (``rescale=1``, the paper's default), :math:`1 + c`
    (``rescale=2``) or not (``0``).
    """
    n = g.shape[0]
    mean = jnp.full((n,), 1.0 / n, g.dtype)
    g0_norm = jnp.sqrt(jnp.maximum(mean @ g @ mean, 0) + 1e-8)
    cn = c * g0_norm + 1e-8
    gb = g @ mean

    def objective(w):
        return w @ gb + cn * jnp.sqrt(jnp.maximum(w @ g @ w, 0) + 1e-8)

    step = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(g)[-1], 1e-12)

    def body(_, w):
        return _project_simplex(w - step * jax.grad(objective)(w))

    w = jax.lax.fori_loop(0, iterations, body, mean)
    gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0))
    weights = mean + cn / (gw_norm + 1e-8) * w
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    return weights / divisor


def cagrad(c: float = 0.5, rescale: int = 1, iterations: int = 500) -> aggregating.Aggregator:
    """CAGrad (Liu et al. 2021): the best worst-case improvement near the mean gradient.

    See :func:`cagrad_weights`. ``c`` in [0, 1) trades the mean's progress for the
    worst term's (``c = 0`` is the mean).
    """
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad: rescale must be 0, 1 or 2, found {rescale!r}")
    return from_weighting(lambda g, key: (cagrad_weights(g, c, rescale, iterations), key))


def nash_mtl_weights(g: jax.Array, iterations: int = 50, ridge: float = 1e-4) -> jax.Array:
    r"""Nash-MTL's weights (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game").

    The Nash bargaining solution :math:`\alpha > 0` with :math:`(G\alpha)_i = 1/\alpha_i`
    is the minimiser of the strictly convex
    :math:`f(\alpha) = \tfrac12 \alpha^\top G \alpha - \sum_i \log \alpha_i`,
    found here by damped Newton steps that keep :math:`\alpha > 0` (the paper solves
    a sequence of convex programs with CVXPY instead). ``ridge`` (relative to the mean
    squared gradient norm) is added to :math:`G`'s diagonal so that a solution exists
    when the gradients are linearly dependent.
    """
    n = g.shape[0]
    scale = jnp.maximum(jnp.trace(g) / n, jnp.finfo(g.dtype).tiny)
    # A small ridge keeps the solution finite when the gradients are linearly dependent
    # (e.g. exactly opposed at a Pareto-stationary point), where none exists.
    gn = g / scale + ridge * jnp.eye(n, dtype=g.dtype)

    def body(_, a):
        grad = gn @ a - 1.0 / a
        hess = gn + jnp.diag(1.0 / a**2)
        delta = jnp.linalg.solve(hess, grad)
        # Largest step in (0, 1] that keeps every alpha positive.
        ratio = jnp.where(delta > 0, 0.99 * a / jnp.where(delta > 0, delta, 1.0), jnp.inf)
        return a - jnp.minimum(1.0, jnp.min(ratio)) * delta

    a = jax.lax.fori_loop(0, iterations, body, jnp.ones((n,), g.dtype))
    a = jnp.where(jnp.all(jnp.isfinite(a)), a, jnp.ones_like(a))
    return a / jnp.sqrt(scale)  # alpha for G itself: G a = 1/a scales as 1/sqrt(scale)


def nash_mtl(iterations: int = 50, ridge: float = 1e-4) -> aggregating.Aggregator:
    r"""Nash-MTL (Navon et al. 2022): the Nash bargaining solution among the terms.

    See :func:`nash_mtl_weights`. The update's scale grows as the gradients shrink
    (:math:`\alpha \propto 1/\|g\|`): pair it with a scale-free optimizer such as Adam.
    """
    return from_weighting(lambda g, key: (nash_mtl_weights(g, iterations, ridge), key))
