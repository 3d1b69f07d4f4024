r"""Aggregators: combine stacked per-term gradients into one update direction.

Each aggregator is an ``optax.experimental.aggregating.Aggregator``: its ``update``
takes the per-term gradients stacked on a leading axis (``[n, *param_shape]`` leaves,
as ``compose(..., term_grads=True)`` returns them in ``out.term_grads``) and returns
one update shaped like the parameters, so it chains with ``optax.chain`` /
``aggregating.process``. Jit the update together with the objective (one training
step): XLA then reads each term's gradient where it was computed, without building the
stacked array.

Every method here needs only the Gramian :math:`G = J J^\top` of the ``n`` gradients
(``n x n``), as TorchJD's weightings do: one pass over the parameters to form ``G``,
a small solve for the weights ``w``, and one pass to form the update :math:`w^\top J`.
The three steps are public, and one convention holds for each:

* ``gramian`` ``(stacked) -> G``.
* The Gramian weight functions ``<method>_weights(gramian, *, <options>,
  with_residual=False) -> weights``: ``pcgrad_weights``, ``mgda_weights``,
  ``upgrad_weights``, ``cagrad_weights``, ``nash_mtl_weights``. The
  Gramian is the only positional argument; the options are keyword-only, with the
  names and defaults of the aggregator of the same name; ``with_residual=True``
  returns ``(weights, residual)``, the residual of the method's optimality conditions
  (0 for PCGrad, which solves no problem). Randomness comes in as a required
  ``key=``, which is used and not returned, as ``jax.random`` functions do.
* ``apply_weights`` ``(weights, stacked) ->`` :math:`w^\top J`.

``from_gramian_weights`` makes an aggregator from any ``GramianWeightFn``
``fn(gramian, key) -> (weights, residual)``; the aggregators here are built with it
and share its state, ``AggregatorState``. (Adaptive weights on the *losses*, such
as GradNorm or FAMO, are a different thing: ``weighting``.)

Example:
  >>> import jax.numpy as jnp
  >>> import jaxreg as jr
  >>> term_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # 2 terms, stacked
  >>> agg = jr.aggregators.upgrad()
  >>> update, state = agg.update(term_grads, agg.init(None))
  >>> print(update["w"])
  [0.25 0.75]
  >>> g = jr.aggregators.gramian(term_grads)  # the same in three steps
  >>> w = jr.aggregators.upgrad_weights(g)
  >>> print(w, jr.aggregators.apply_weights(w, term_grads)["w"])
  [1.   0.75] [0.25 0.75]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from optax.experimental import aggregating

from jaxreg._src.core import gather
from jaxreg._src.core.errors import ConfigError
from jaxreg._src.core.linalg import cross_gram, weighted_rows
from jaxreg._src.optim import gram_solvers

GramianWeightFn: TypeAlias = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]
"""``fn(gramian, key) -> (weights, residual)``: a weight rule on the ``n x n`` Gramian.

``key`` is a fresh PRNG key each step (ignore it if the rule is deterministic);
``weights`` has shape ``[n]``; ``residual`` is a scalar (``0.0`` when there is no
optimality condition to report), kept as float32 in ``AggregatorState``. See
``from_gramian_weights``.
"""


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
    r"""The Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of stacked gradients.

    Args:
      stacked: a pytree whose leaves are ``[n, ...]``: row ``i`` of every leaf together
        is gradient :math:`g_i`.

    Returns:
      The ``n x n`` Gramian, in the widest float dtype among the leaves and float32.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> print(jr.aggregators.gramian({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}))
      [[ 1. -1.]
       [-1.  2.]]
    """
    # The widest float among the leaves and float32 (no promotion: strict mode allows none).
    dtypes = [jnp.dtype(jnp.float32), *(jnp.dtype(x.dtype) for x in jax.tree.leaves(stacked))]
    acc = max(dtypes, key=lambda t: jnp.finfo(t).bits)
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


def apply_weights(weights: jax.Array, stacked: Any) -> Any:
    r"""The update :math:`w^\top J = \sum_i w_i g_i` from weights and stacked gradients.

    Args:
      weights: ``[n]``, e.g. from a Gramian weight function (``*_weights``).
      stacked: a pytree of ``[n, ...]`` leaves (row ``i`` is gradient :math:`g_i`).

    Returns:
      A pytree shaped like one gradient (the leaves without their leading axis), in the
      leaves' dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> stacked = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
      >>> print(jr.aggregators.apply_weights(jnp.array([1.0, 0.75]), stacked)["w"])
      [0.25 0.75]
    """
    return jax.tree.map(lambda g: weighted_rows(weights, g), stacked)


class AggregatorState(NamedTuple):
    """The state of every aggregator of ``aggregators``.

    ``init`` returns it and ``update`` returns the next one; it has the same structure
    and dtypes on every step, so it can be carried through ``lax.scan``.

    Attributes:
      key: the PRNG key; each ``update`` splits it and hands one half to the weight
        function (PCGrad's random visiting order; unused by the other methods).
      residual: float32 scalar, the residual of the last weight problem's optimality
        conditions (0 for the methods without one; see each ``*_weights`` function for
        its definition). Solved problems read 1e-12 or less in float64; in float32,
        about 1e-7 on well conditioned gradients and up to about 1e-3 on nearly
        dependent ones.

    Example:
      >>> import jaxreg as jr
      >>> state = jr.aggregators.mgda().init(None)
      >>> state.residual.dtype, state.residual.shape
      (dtype('float32'), ())
    """

    key: jax.Array
    residual: Any = np.zeros((), np.float32)


def _solve_dtype(g: jax.Array) -> jax.Array:
    """The Gramian in float64 when x64 is enabled (the ``n x n`` solves cost nothing)."""
    return g.astype(jax.dtypes.canonicalize_dtype(jnp.float64))


def from_gramian_weights(fn: GramianWeightFn, seed: int = 0) -> aggregating.Aggregator:
    r"""An ``Aggregator`` from a weight rule on the Gramian.

    Each ``update(stacked, state)`` forms :math:`G` (``gramian``), splits the
    state's key, calls ``fn(G, key)`` for ``(weights, residual)`` (a
    ``GramianWeightFn``) and returns :math:`w^\top J` (``apply_weights``) with
    the next ``AggregatorState``.

    Args:
      fn: ``fn(gramian, key) -> (weights, residual)``.
      seed: the seed of the state's PRNG key.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> def normalised(g, key):  # each gradient scaled to unit norm, then summed
      ...     return 1.0 / jnp.sqrt(jnp.diagonal(g)), 0.0
      >>> agg = jr.aggregators.from_gramian_weights(normalised)
      >>> update, state = agg.update({"w": jnp.array([[3.0, 0.0], [0.0, -2.0]])}, agg.init(None))
      >>> print(update["w"])
      [ 1. -1.]
    """

    def init(params):
        state = AggregatorState(jax.random.key(seed), jnp.zeros((), jnp.float32))
        return gather.placed_like(state, params)  # committed: the first step keeps its trace

    def update(stacked, state, params=None, **extra):
        del params, extra
        key, sub = jax.random.split(state.key)
        weights, residual = fn(gramian(stacked), sub)
        return apply_weights(weights, stacked), AggregatorState(
            key, jnp.asarray(residual, jnp.float32)
        )

    return aggregating.Aggregator(init, update)


def _iterations(iterations: int | None, name: str) -> int | None:
    if iterations is not None and iterations < 1:
        raise ConfigError(
            f"{name}: iterations must be a positive int or None, found {iterations!r}"
        )
    return iterations


def _zero_residual(weights: jax.Array) -> jax.Array:
    return jnp.zeros((), weights.dtype)


def _check_pref(pref_vector: Any, name: str) -> np.ndarray | None:
    """A constructor's ``pref_vector``: ``None`` or a finite 1-D vector (kept on the host)."""
    if pref_vector is None:
        return None
    p = np.asarray(pref_vector, np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ConfigError(
            f"{name}: pref_vector must be a non-empty 1-D vector (one weight per term), "
            f"found shape {p.shape}"
        )
    if not np.all(np.isfinite(p)):
        raise ConfigError(f"{name}: pref_vector must be finite, found {p.tolist()}")
    return p


def _pref_weights(pref_vector: Any, n: int, dtype: Any, name: str, default: Any) -> Any:
    """``pref_vector`` as ``[n]`` weights of ``dtype`` (``default`` when it is ``None``)."""
    if pref_vector is None:
        return default
    p = jnp.asarray(pref_vector, dtype)
    if p.shape != (n,):
        raise ConfigError(
            f"{name}: pref_vector must have one entry per term, expected shape ({n},), "
            f"found {p.shape}"
        )
    return p


# --------------------------------------------------------------------- the methods


def weighted_sum(weights: Any = None) -> aggregating.Aggregator:
    r"""The weighted sum :math:`\sum_i w_i g_i` with fixed weights (``None``: all ones).

    No weight problem is solved (the state's ``residual`` stays 0); this is the plain
    objective's gradient, as a baseline for the other aggregators.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.weighted_sum([0.5, 0.5])
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> print(update["w"])
      [0.  0.5]
    """

    def fixed(g, key):
        del key
        n = g.shape[0]
        w = jnp.ones((n,), g.dtype) if weights is None else jnp.asarray(weights, g.dtype)
        return w, _zero_residual(w)

    return from_gramian_weights(fixed)


def pcgrad_weights(gramian: jax.Array, *, key: jax.Array, with_residual: bool = False) -> Any:
    r"""PCGrad's weights on the Gramian (Yu et al. 2020, "Gradient Surgery").

    For each task :math:`i`, visiting the others in a random order, project
    :math:`g_i^{pc}` off :math:`g_j` when they conflict:
    :math:`g_i^{pc} \leftarrow g_i^{pc} - \frac{g_i^{pc}\cdot g_j}{\|g_j\|^2} g_j` if
    :math:`g_i^{pc}\cdot g_j < 0`. The update is :math:`\sum_i g_i^{pc}`. Tracked as
    coefficients :math:`g_i^{pc} = C_i J`, so only :math:`G` is needed.

    Args:
      gramian: the ``n x n`` Gramian.
      key: the PRNG key of the visiting orders (used, not returned: split it yourself
        for the next call, as with ``jax.random``).
      with_residual: also return a residual, always 0 (no problem is solved).

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])
      >>> print(jr.aggregators.pcgrad_weights(g, key=jax.random.key(0)))
      [2.  1.5]
    """
    g = gramian
    n = g.shape[0]
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n))
    eye = jnp.eye(n, dtype=g.dtype)

    def project(i, order):
        def body(t, c):
            j = order[t]
            dot = c @ g[:, j]
            conflict = (j != i) & (dot < 0) & (g[j, j] > 0)
            return c - jnp.where(conflict, dot / jnp.where(g[j, j] > 0, g[j, j], 1.0), 0.0) * eye[j]

        return jax.lax.fori_loop(0, n, body, eye[i])

    weights = jax.vmap(project)(jnp.arange(n), orders).sum(0)
    return (weights, _zero_residual(weights)) if with_residual else weights


def pcgrad(seed: int = 0) -> aggregating.Aggregator:
    """PCGrad (Yu et al. 2020): project away conflicting components, then sum.

    See ``pcgrad_weights``. The visiting order is random (``seed``), as published.
    The state's ``residual`` is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.pcgrad(seed=0)
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> print(update["w"])
      [0.5 1.5]
    """
    return from_gramian_weights(
        lambda g, key: pcgrad_weights(g, key=key, with_residual=True), seed=seed
    )


def mgda_weights(
    gramian: jax.Array, *, iterations: int | None = None, with_residual: bool = False
) -> Any:
    r"""MGDA's weights: :math:`w^* = \arg\min_{w \in \Delta_n} w^\top G w`.

    Solved exactly by an active-set (Lawson-Hanson) method on the scaled Gramian,
    stopping on the KKT conditions :math:`(Gw)_j \ge w^\top G w` with equality where
    :math:`w_j > 0` (``min_norm_simplex``); for two
    tasks, the closed form.

    Args:
      gramian: the ``n x n`` Gramian.
      iterations: the active-set iteration guard (default ``6 n + 10``; each iteration
        frees one variable, so about ``n`` are used).
      with_residual: also return the KKT residual
        :math:`\max_j |\min(w_j, \frac{\langle g_j, d\rangle - \|d\|^2}{\|g_j\|\|d\|})|`,
        :math:`d = w^\top J`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])
      >>> [round(float(v), 6) for v in jr.aggregators.mgda_weights(g)]
      [0.6, 0.4]
    """
    iterations = _iterations(iterations, "mgda")
    w, residual = gram_solvers.min_norm_simplex(_solve_dtype(gramian), iterations)
    return (w, residual) if with_residual else w


def mgda(iterations: int | None = None) -> aggregating.Aggregator:
    r"""MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of the convex hull.

    :math:`w^* = \arg\min_{w \in \Delta_n} \|w^\top J\|^2`, solved exactly on the
    Gramian ([`mgda_weights`][jaxreg.aggregators.mgda_weights]); the update is :math:`{w^*}^\top J`,
    a common descent direction of every term (zero at a Pareto-stationary point). ``iterations`` is
    the solver's iteration guard (it stops on the KKT conditions). The state's ``residual``
    is the KKT residual.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.mgda()
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> [round(float(v), 6) for v in update["w"]]
      [0.2, 0.4]
    """
    iterations = _iterations(iterations, "mgda")
    return from_gramian_weights(
        lambda g, key: mgda_weights(g, iterations=iterations, with_residual=True)
    )


def upgrad_weights(
    gramian: jax.Array,
    *,
    iterations: int | None = None,
    pref_vector: Any = None,
    with_residual: bool = False,
) -> Any:
    r"""UPGrad's weights (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
    Optimization"): project each :math:`g_i` onto the dual cone
    :math:`\{x : \langle x, g_j\rangle \ge 0\ \forall j\}` and average the projections.

    The projection of :math:`g_i` is :math:`v_i^\top J` with
    :math:`v_i = \arg\min_{v \ge e_i} v^\top G v` (the dual of the projection problem);
    the weights are :math:`\frac1n \sum_i v_i` (TorchJD's ``UPGrad()``, without its
    ``reg_eps`` ridge). Each :math:`v_i` is solved exactly by an active-set
    non-negative least-squares method on the unit-diagonal Gramian, stopping on the KKT
    conditions (``upgrad_solve``).

    With a preference vector :math:`p` (TorchJD's ``pref_vector``), the weights are
    :math:`\sum_i v_i(p_i)` with :math:`v_i(p_i) = \arg\min_{v \ge p_i e_i} v^\top G v`,
    the projection of :math:`p_i g_i` onto the dual cone: :math:`\max(p_i, 0)\, v_i`
    (a negative :math:`p_i` contributes nothing: the projection of :math:`-g_i` is 0).
    The default, :math:`p = 1/n`, is the mean above. The result stays non-conflicting
    for every :math:`p` and linear under scaling.

    Args:
      gramian: the ``n x n`` Gramian.
      iterations: the active-set iteration guard per projection (default ``6 n + 10``).
      pref_vector: ``None`` (the mean) or ``n`` weights of the projections.
      with_residual: also return the largest KKT residual of the ``n`` projections.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])
      >>> print(jr.aggregators.upgrad_weights(g))
      [1.   0.75]
      >>> print(jr.aggregators.upgrad_weights(g, pref_vector=jnp.array([1.0, 0.0])))
      [1.  0.5]
    """
    iterations = _iterations(iterations, "upgrad")
    g = _solve_dtype(gramian)
    pref = _pref_weights(pref_vector, g.shape[0], g.dtype, "upgrad", None)
    w, residual = gram_solvers.upgrad_solve(g, iterations, pref)
    return (w, residual) if with_residual else w


def upgrad(iterations: int | None = None, pref_vector: Any = None) -> aggregating.Aggregator:
    """UPGrad (Quinton & Rey 2024): average of the gradients projected onto the dual cone.

    The result has a non-negative inner product with every term's gradient (no term
    gets worse to first order), and equals the mean when nothing conflicts. Solved
    exactly (``upgrad_weights``); ``iterations`` is the iteration guard. ``pref_vector``
    (``n`` weights, TorchJD's option) weights the projections instead of the mean. The
    state's ``residual`` is the largest KKT residual of the projections.

    When that residual exceeds ``10 eps`` of the Gramian's dtype (a rounded Gramian near
    a Pareto-stationary point, where the projections are near 0 and the Gramian alone
    leaves errors of about ``sqrt(eps) max|g|``), each projection is re-solved from the
    gradients themselves: the active-set method is re-run warm-started in the
    correction (``gram_solvers.nnls_gram_from``), its gradient the products
    ``<d_i, g_j>`` read from the gradients (``gram_solvers.upgrad_refine``), its free
    steps from a Gramian factor whose small eigenvalues are also read from them
    (``gram_solvers.gram_factor``: two passes once). Each round (two passes) keeps, per
    projection, the shorter ``d_i`` (every iterate is feasible and ``d_i`` is the point of
    a convex set nearest 0, so ``|d - d*|^2 <= |d|^2 - |d*|^2``); it stops when no
    projection shortens, after at most 10 rounds. The residual is then computed from
    those products. Otherwise the update is
    ``upgrad_weights``' on the Gramian.

    Accuracy in float32 (``benchmarks/float32_stationary.py``, TorchJD's stationary
    20 x 100 Jacobians of rank 19, 5 seeds per kind): the update is within
    ``1.4 eps ||w||_1 max|g|`` (at most ``7.2e-6 max|g|``) of the float64 one, about the
    error of applying the exact weights ``w`` in float32; row order and scaling change it
    by at most ``4.9e-6`` and ``6.4e-6 max|g|``; ``<g_j, d> >= -4.3e-6 |g_j| max|g|``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.upgrad()
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> print(update["w"])
      [0.25 0.75]
    """
    iterations = _iterations(iterations, "upgrad")
    pref = _check_pref(pref_vector, "upgrad")

    def init(params):
        return from_gramian_weights(lambda g, key: (g[0], 0.0)).init(params)

    def update(stacked, state, params=None, **extra):
        del params, extra
        key, _ = jax.random.split(state.key)  # as from_gramian_weights: the same key stream
        g = gramian(stacked)
        gd = _solve_dtype(g)
        p = _pref_weights(pref, gd.shape[0], gd.dtype, "upgrad", None)
        v = gram_solvers.upgrad_projections(gd, iterations)
        residual = gram_solvers.upgrad_residual(gd, v)

        def products(v):  # (<d_i, g_j>, |d_i|^2) from the gradients: J (J^T v_i)
            rows = apply_rows(v.astype(g.dtype), stacked)
            pairs = [
                (a.reshape(a.shape[0], -1).astype(g.dtype), b.reshape(b.shape[0], -1))
                for a, b in zip(jax.tree.leaves(rows), jax.tree.leaves(stacked), strict=True)
            ]
            q = sum((cross_gram(a, b.astype(g.dtype)) for a, b in pairs), start=jnp.zeros_like(g))
            sq = sum(
                (jnp.sum(a * a, axis=1) for a, _ in pairs), start=jnp.zeros(g.shape[0], g.dtype)
            )
            return q.astype(gd.dtype), sq.astype(gd.dtype)

        def factor():  # L L^T = D^-1 G D^-1, its small eigenvalues read from the gradients
            _, dd, gn = gram_solvers.unit_diagonal(gd)
            q = jnp.linalg.eigh(gn)[1]
            rows = apply_rows((q.T / dd[None, :]).astype(g.dtype), stacked)
            flat = [r.reshape(r.shape[0], -1).astype(g.dtype) for r in jax.tree.leaves(rows)]
            m = sum((cross_gram(f, f) for f in flat), start=jnp.zeros(g.shape, g.dtype))
            return gram_solvers.gram_factor(q, m.astype(gd.dtype))

        def refine(v):
            # Refinement steps while one shortens a projection |d_i| (computed from the
            # gradients); a projection keeps its shortest iterate. Every iterate is
            # feasible (v_i >= e_i), and d_i is the point of a convex set nearest to 0,
            # so |d - d*|^2 <= |d|^2 - |d*|^2: shorter is closer (a safeguard, since
            # Newton steps on a rounded problem need not contract).
            fac = factor()
            q, sq = products(v)

            def cond(c):
                return c[3] & (c[4] < _REFINE_STEPS)

            def body(c):
                v, q, sq, _, it = c
                v_new = gram_solvers.upgrad_refine(gd, v, q, iterations, fac)
                q_new, sq_new = products(v_new)
                better = sq_new < sq
                v = jnp.where(better[:, None], v_new, v)
                q = jnp.where(better[:, None], q_new, q)
                return v, q, jnp.minimum(sq, sq_new), jnp.any(better), it + 1

            v, q, _, _, _ = jax.lax.while_loop(cond, body, (v, q, sq, jnp.asarray(True), 0))
            return v, gram_solvers.upgrad_products_residual(gd, v, q)

        # Rounded Gramians leave sqrt(eps) errors where the projections are near 0; the
        # correction reads the gradients again (2 passes per step), only when needed.
        threshold = 10 * float(jnp.finfo(g.dtype).eps)
        v, residual = jax.lax.cond(
            residual > threshold, refine, lambda v: (v, residual.astype(gd.dtype)), v
        )
        return apply_weights(gram_solvers.upgrad_combine(v, p), stacked), AggregatorState(
            key, jnp.asarray(residual, jnp.float32)
        )

    return aggregating.Aggregator(init, update)


# The most refinements of UPGrad's projections with products read from the gradients.
_REFINE_STEPS = 10


def apply_rows(rows: jax.Array, stacked: Any) -> Any:
    """``rows @ J`` leafwise: ``[m, n] x [n, ...] -> [m, ...]``."""
    return jax.tree.map(
        lambda x: jnp.tensordot(
            rows.astype(x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST
        ),
        stacked,
    )


def _check_cagrad(c: float, rescale: int) -> None:
    if rescale not in (0, 1, 2):
        raise ConfigError(f"cagrad: rescale must be 0, 1 or 2, found {rescale!r}")
    if not 0 <= c < 1:
        raise ConfigError(f"cagrad: c must be in [0, 1), found {c!r}")


def cagrad_weights(
    gramian: jax.Array,
    *,
    c: float = 0.5,
    rescale: int = 1,
    iterations: int | None = None,
    with_residual: bool = False,
) -> Any:
    r"""CAGrad's weights (Liu et al. 2021, "Conflict-Averse Gradient Descent").

    With :math:`g_0` the mean gradient, solve
    :math:`w^* = \arg\min_{w\in\Delta} g_w^\top g_0 + c\|g_0\|\|g_w\|`
    (:math:`g_w = w^\top J`), then :math:`d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w`,
    divided by :math:`1 + c^2` (``rescale=1``, the paper's default), :math:`1 + c`
    (``rescale=2``) or not (``0``).

    The dual problem is solved exactly: at the optimum, :math:`w^*` is the min-norm
    point of the shifted gradients :math:`g_i + s g_0` with :math:`s = \|g_w\|/(c
    \|g_0\|)`, and on its support :math:`s` has a closed form
    (``cagrad_solve``); the solver alternates the two and
    stops on the KKT conditions. Where the optimum has :math:`g_w = 0` (0 in the
    convex hull of the gradients), the direction of :math:`g_w` is undetermined, and
    the projection of :math:`g_0` on the dual cone is taken instead when it is in the
    ball and better (``cagrad_direction``): every result is certified by its duality
    gap. Unlike the official code, no ``1e-8`` is added to the
    norms (they made the result depend on the gradients' scale). When
    :math:`g_0 = 0` the update is :math:`0`.

    Args:
      gramian: the ``n x n`` Gramian.
      c: the radius ``c`` in [0, 1) around the mean gradient.
      rescale: 0, 1 or 2 (see above).
      iterations: the outer iteration guard (default 20; about 2 are used).
      with_residual: also return the duality gap :math:`(F(w) - \min_i \langle g_i,
        d\rangle) / \|g_0\|^2` (before the rescaling; :math:`F` the dual objective
        above, an upper bound on the primal value): 0 at the optimum.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])
      >>> print(jr.aggregators.cagrad_weights(g, c=0.0))  # c = 0: the mean
      [0.5 0.5]
    """
    _check_cagrad(c, rescale)
    iterations = _iterations(iterations, "cagrad")
    gd = _solve_dtype(gramian)
    # d = g0 + (c |g0| / |g_w|) g_w, or the projection of g0 on the dual cone when it is
    # better (cagrad_direction); the residual is the duality gap.
    weights, residual = gram_solvers.cagrad_direction(gd, c, iterations)
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    weights = weights / divisor
    return (weights, residual) if with_residual else weights


def cagrad(
    c: float = 0.5, rescale: int = 1, iterations: int | None = None
) -> aggregating.Aggregator:
    """CAGrad (Liu et al. 2021): the best worst-case improvement near the mean gradient.

    See ``cagrad_weights``. ``c`` in [0, 1) trades the mean's progress for the
    worst term's (``c = 0`` is the mean). The state's ``residual`` is the duality gap
    (``cagrad_weights``).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.cagrad(c=0.0)
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> print(update["w"])
      [0.  0.5]
    """
    _check_cagrad(c, rescale)
    iterations = _iterations(iterations, "cagrad")
    return from_gramian_weights(
        lambda g, key: cagrad_weights(
            g, c=c, rescale=rescale, iterations=iterations, with_residual=True
        )
    )


def _check_ridge(ridge: float) -> None:
    if ridge < 0:
        raise ConfigError(f"nash_mtl: ridge must be >= 0, found {ridge!r}")


def nash_mtl_weights(
    gramian: jax.Array,
    *,
    iterations: int | None = None,
    ridge: float = 0.0,
    with_residual: bool = False,
) -> Any:
    r"""Nash-MTL's weights (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game").

    The Nash bargaining solution :math:`\alpha > 0` with :math:`(G\alpha)_i = 1/\alpha_i`
    is the minimiser of the strictly convex, self-concordant
    :math:`f(\alpha) = \tfrac12 \alpha^\top G \alpha - \sum_i \log \alpha_i`, found
    here by Newton's method on the unit-diagonal Gramian (damped while the Newton
    decrement is at least 1/4, which keeps :math:`\alpha > 0`), stopping on the Newton
    decrement (``nash_solve``). The paper (and TorchJD) solve a
    sequence of convex programs with CVXPY instead, on :math:`G / \|G\|_F` with the
    factor put back in the constraint: their :math:`\alpha` solves the same equation
    for :math:`G` itself.

    A solution exists iff :math:`0` is not in the convex hull of the gradients (the
    gradients are not weakly Pareto-stationary); it is decided on the distance of the
    hull of the unit gradients to 0 (``nash_solve``), not on the Newton iterates (which
    run off to infinity without converging on rank-deficient stationary inputs). When
    none exists, or a gradient is zero, the weights are zero and the residual is
    ``inf``. Otherwise :math:`\|\sum_i \alpha_i g_i\|^2 = n` exactly.

    Args:
      gramian: the ``n x n`` Gramian.
      iterations: the Newton iteration guard (default 100; 5-10 are typical).
      ridge: adds ``ridge * G_ii`` to each diagonal entry. Off by default: it biases
        the result (two tasks at cosine ``c`` get :math:`\sqrt{(1 + c)/(1 + c +
        \rho)}` times the exact update; ``1e-4`` is off by 1.4e-3 in the median and
        up to 0.44 on nearly dependent gradients, ``docs/optax.md``). It only keeps
        the weights finite near Pareto-stationary points.
      with_residual: also return :math:`\max_i |\alpha_i (G\alpha)_i - 1|`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])  # cosine -1/sqrt(2)
      >>> alpha = jr.aggregators.nash_mtl_weights(g)  # 1 / (|g_i| sqrt(1 + cos))
      >>> [round(float(a), 4) for a in alpha]
      [1.8478, 1.3066]
    """
    _check_ridge(ridge)
    iterations = _iterations(iterations, "nash_mtl")
    alpha, residual = gram_solvers.nash_solve(_solve_dtype(gramian), iterations, ridge)
    return (alpha, residual) if with_residual else alpha


def nash_mtl(iterations: int | None = None, ridge: float = 0.0) -> aggregating.Aggregator:
    r"""Nash-MTL (Navon et al. 2022): the Nash bargaining solution among the terms.

    See [`nash_mtl_weights`][jaxreg.aggregators.nash_mtl_weights]. The update has norm
    :math:`\sqrt n` whatever the gradients' scale (:math:`\alpha \propto 1/\|g\|`): pair it
    with a scale-free optimizer such as Adam. The state's ``residual`` is
    :math:`\max_i |\alpha_i (G\alpha)_i - 1|`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.nash_mtl()
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> round(float(jnp.sum(update["w"] ** 2)), 5)  # n = 2
      2.0
    """
    iterations = _iterations(iterations, "nash_mtl")
    _check_ridge(ridge)
    return from_gramian_weights(
        lambda g, key: nash_mtl_weights(g, iterations=iterations, ridge=ridge, with_residual=True)
    )
