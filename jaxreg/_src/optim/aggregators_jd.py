r"""Jacobian-descent aggregators of TorchJD that ``aggregators.py`` lacks (IMTL-G, RLW).

Each follows the conventions of ``aggregators.py``: a Gramian weight function
``<method>_weights(gramian, *, ..., with_residual=False)`` and an aggregator built with
``from_gramian_weights`` (state ``AggregatorState``; randomness from its key).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from optax.experimental import aggregating

from jaxreg._src.optim.aggregators import _solve_dtype, _zero_residual, from_gramian_weights


def imtl_g_weights(gramian: jax.Array, *, with_residual: bool = False) -> Any:
    r"""IMTL-G's weights (Liu et al. 2021, "Towards Impartial Multi-task Learning").

    The update :math:`d = w^\top J` has equal projections on every unit gradient,
    :math:`\langle d, g_i\rangle / \|g_i\| = c`, with :math:`\sum_i w_i = 1`. On the
    Gramian (the generalisation of Quinton & Rey 2024, as TorchJD):
    :math:`v = G^{+} \sqrt{\operatorname{diag} G}`, :math:`w = v / \sum_i v_i`
    (zero when :math:`|\sum_i v_i| < 10^{-12}`).

    Properties (TorchJD): permutation-invariant, non-conflicting when the gradients
    are linearly independent (all projections equal ``c >= 0``), invariant to the
    scale of the gradients (not linear under scaling).

    Args:
      gramian: the ``n x n`` Gramian.
      with_residual: also return :math:`\max_i |(Gw)_i - c\sqrt{G_{ii}}|` relative to
        the largest :math:`\sqrt{G_{ii}}` (0 when :math:`G` is invertible).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> [round(float(v), 4) for v in jr.aggregators.imtl_g_weights(g)]
      [0.6667, 0.3333]
    """
    g = _solve_dtype(gramian)
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
    v = jnp.linalg.pinv(g, hermitian=True) @ d
    s = jnp.sum(v)
    ok = jnp.abs(s) >= 1e-12
    w = jnp.where(ok, v / jnp.where(ok, s, 1.0), 0.0)
    if not with_residual:
        return w.astype(gramian.dtype)
    gw = g @ w
    c = jnp.where(ok, 1.0 / jnp.where(ok, s, 1.0), 0.0)
    scale = jnp.maximum(jnp.max(d), jnp.finfo(g.dtype).tiny)
    residual = jnp.max(jnp.abs(gw - c * d)) / scale
    return w.astype(gramian.dtype), residual


def imtl_g() -> aggregating.Aggregator:
    """IMTL-G (Liu et al. 2021): the update with equal projections on every unit gradient.

    See ``imtl_g_weights``; the state's ``residual`` is its equal-projection residual.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.imtl_g()
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, agg.init(None))
      >>> [round(float(v), 4) for v in update["w"]]
      [0.6667, 0.6667]
    """
    return from_gramian_weights(lambda g, key: imtl_g_weights(g, with_residual=True))


def random_weights(gramian: jax.Array, *, key: jax.Array, with_residual: bool = False) -> Any:
    r"""RLW's weights (Lin et al. 2022, "Reasonable Effectiveness of Random Weighting").

    :math:`w = \operatorname{softmax}(z)`, :math:`z \sim \mathcal N(0, I_n)`, drawn
    from ``key`` (used, not returned). TorchJD's ``Random``. Weighted (non-negative
    weights summing to 1); not non-conflicting.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> w = jr.aggregators.random_weights(jnp.eye(3), key=jax.random.key(0))
      >>> round(float(w.sum()), 6)
      1.0
    """
    n = gramian.shape[0]
    w = jax.nn.softmax(jax.random.normal(key, (n,), gramian.dtype))
    return (w, _zero_residual(w)) if with_residual else w


def random(seed: int = 0) -> aggregating.Aggregator:
    """RLW / TorchJD's ``Random``: the softmax of Gaussian weights, new each step.

    See ``random_weights``; the state's key draws the weights, its ``residual`` is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.random(seed=0)
      >>> update, state = agg.update({"w": jnp.eye(2)}, agg.init(None))
      >>> round(float(update["w"].sum()), 6)
      1.0
    """
    return from_gramian_weights(
        lambda g, key: random_weights(g, key=key, with_residual=True), seed=seed
    )
