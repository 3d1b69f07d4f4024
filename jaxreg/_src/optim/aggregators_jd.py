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

from jaxreg._src.optim import gram_solvers
from jaxreg._src.optim.aggregators import _solve_dtype, _zero_residual, from_gramian_weights


def imtl_g_weights(gramian: jax.Array, *, with_residual: bool = False) -> Any:
    r"""IMTL-G's weights (Liu et al. 2021, "Towards Impartial Multi-task Learning").

    The update :math:`d = J^\top w` has equal projections :math:`u_i^\top d = c` on
    every unit gradient :math:`u_i = g_i / \|g_i\|`, with :math:`\sum_i w_i = 1`. On
    the Gramian (the generalisation of Quinton & Rey 2024, as TorchJD's ``IMTLG``),
    with :math:`D = \operatorname{diag}(\|g_i\|)` and the unit-diagonal Gramian
    :math:`\hat G = D^{-1} G D^{-1}` of the unit gradients:

    .. math::

        \alpha = \hat G^{+} \mathbf 1, \qquad v = D^{-1} \alpha, \qquad
        w = v / \textstyle\sum_i v_i,

    so that :math:`d = U^\top \alpha / \sum_i v_i` and :math:`c = 1 / \sum_i v_i`.
    Where :math:`G` is invertible this is TorchJD's :math:`G^{-1}\sqrt{\operatorname{diag}
    G}`; solving on :math:`\hat G` keeps the projections equal whatever the norm ratios
    (:math:`\operatorname{cond}(G)` grows with their square, :math:`\operatorname{cond}(\hat G)`
    only with the angles). The pseudo-inverse drops the eigenvalues of :math:`\hat G`
    below :math:`10\,n\,\epsilon\,\lambda_{\max}` (rank deficiency, duplicated rows); a
    zero gradient gets weight 0. Where no direction has equal projections (:math:`\mathbf 1`
    outside the range of :math:`\hat G`), :math:`U^\top\alpha` is the least-squares
    one, :math:`\min_x \sum_i (u_i^\top x - 1)^2` (TorchJD's :math:`G^{+}` weights the
    squares by :math:`\|g_i\|^2` instead). On duplicated rows (``g`` and ``3g``) the
    minimum-norm :math:`\alpha` gives the limit of the invertible case
    (:math:`d = 1.5 g`, where TorchJD's :math:`G^{+}` gives :math:`2.5 g`). The weights
    are 0 when the sum cancels, :math:`|\sum_i v_i| \le 10\,n\,\epsilon \sum_i |v_i|`,
    or when :math:`\max_i |\alpha_i| \le \sqrt\epsilon` (the unit gradients sum to 0,
    e.g. two opposite gradients: no direction has positive projections on all).

    Properties (as in TorchJD's table): weighted, permutation-invariant; not
    non-conflicting (the common projection :math:`c` has the sign of :math:`\sum_i v_i`,
    which is negative for some inputs); not linear under scaling (the weights are
    invariant to a common scale of the gradients, so :math:`d` is positively
    homogeneous, but :math:`c = 1/\sum_i \alpha_i/\|g_i\|` is not linear in per-row
    scales).

    Args:
      gramian: the ``n x n`` Gramian.
      with_residual: also return the spread of the projections on the unit gradients
        relative to their common value, :math:`\max_i |(\hat G\alpha)_i - 1|` over the
        nonzero gradients (0 when equal projections exist; the distance of
        :math:`\mathbf 1` from the range of :math:`\hat G` otherwise).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> [round(float(v), 4) for v in jr.aggregators.imtl_g_weights(g)]
      [0.6667, 0.3333]
    """
    g = _solve_dtype(gramian)
    n = g.shape[0]
    eps = jnp.finfo(g.dtype).eps
    norms, scale, g_hat = gram_solvers.unit_diagonal(g)
    nonzero = norms > 0
    ones = nonzero.astype(g.dtype)
    pinv = jnp.linalg.pinv(g_hat, rtol=10 * n * eps, hermitian=True)
    alpha = pinv @ ones
    alpha = alpha + pinv @ (ones - g_hat @ alpha)  # one step of iterative refinement
    v = jnp.where(nonzero, alpha / scale, 0.0)
    s = jnp.sum(v)
    ok = (jnp.abs(s) > 10 * n * eps * jnp.sum(jnp.abs(v))) & (
        jnp.max(jnp.abs(alpha), initial=0.0) > jnp.sqrt(eps)
    )
    w = jnp.where(ok, v / jnp.where(ok, s, 1.0), 0.0)
    if not with_residual:
        return w.astype(gramian.dtype)
    residual = jnp.max(jnp.where(nonzero, jnp.abs(g_hat @ alpha - 1.0), 0.0), initial=0.0)
    return w.astype(gramian.dtype), residual


def imtl_g() -> aggregating.Aggregator:
    r"""IMTL-G (Liu et al. 2021): the update with equal projections on every unit gradient.

    :math:`d = J^\top w` with :math:`u_i^\top d` equal for every unit gradient
    :math:`u_i = g_i/\|g_i\|` and :math:`\sum_i w_i = 1`, solved on the unit-diagonal
    Gramian (exact to rounding whatever the norm ratios; see ``imtl_g_weights``). The
    state's ``residual`` is the spread :math:`\max_i |u_i^\top d / c - 1|` of the
    projections around their common value ``c`` (0 to rounding where equal projections
    exist, the least-squares distance where they do not).

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
