"""Small linear-algebra helpers shared by ``compose`` and the aggregators."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# XLA:CPU runs a [n, K] x [K, m] product with tiny n, m and huge K several times slower
# than the same work split into column blocks of this size (measured: 8 x 2^20 floats,
# 16 ms in one dot, 2.5 ms in 16 blocks), so long contractions are done blockwise.
_BLOCK = 1 << 16


def cross_gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` for ``a: [n, K]``, ``b: [m, K]`` in float32 precision, blockwise over K."""
    k = a.shape[1]
    precision = jax.lax.Precision.HIGHEST

    def dot(x, y):
        return jnp.einsum("ik,jk->ij", x, y, precision=precision)

    if k <= 2 * _BLOCK:
        return dot(a, b)
    blocks, rest = divmod(k, _BLOCK)

    def body(i, acc):
        x = jax.lax.dynamic_slice_in_dim(a, i * _BLOCK, _BLOCK, axis=1)
        y = jax.lax.dynamic_slice_in_dim(b, i * _BLOCK, _BLOCK, axis=1)
        return acc + dot(x, y)

    acc = jax.lax.fori_loop(0, blocks, body, jnp.zeros((a.shape[0], b.shape[0]), a.dtype))
    if rest:
        acc = acc + dot(a[:, blocks * _BLOCK :], b[:, blocks * _BLOCK :])
    return acc


# Up to this many rows, ``w @ J`` is written as a sum of scaled rows: XLA fuses it into
# one elementwise pass, where a dot with a contraction this short runs slower (measured
# 8 x 2^20 floats: 0.55 ms against 0.8 ms).
_UNROLL = 16


def weighted_rows(w: jax.Array, stacked: jax.Array) -> jax.Array:
    """``w @ stacked`` over the leading axis: ``sum_i w[i] * stacked[i]``."""
    w = w.astype(stacked.dtype)
    if stacked.shape[0] > _UNROLL:
        return jnp.tensordot(w, stacked, axes=1)
    return sum((w[i] * stacked[i] for i in range(1, stacked.shape[0])), start=w[0] * stacked[0])


def to_logit_space(grad: Any, logprobs: jax.Array) -> Any:
    r"""Maps gradients with respect to full-distribution logprobs to the logits.

    With ``x = z - logsumexp(z)`` along the last axis, the chain rule gives

    .. math:: \nabla_z L = g - e^{x} \textstyle\sum_k g_k, \qquad g = \nabla_x L,

    which removes the component along ``p = e^x`` that the backward pass through
    ``log_softmax`` removes anyway. Linear in ``g``: it applies to each row of stacked
    per-term gradients (leading axes of ``grad`` beyond ``logprobs``'s broadcast), and
    it is a projection (applying it twice changes nothing) when ``sum_k p_k = 1``.

    Args:
      grad: an array shaped like ``logprobs``, or with extra leading axes.
      logprobs: log-probabilities over the whole vocabulary along the last axis.

    Returns:
      ``grad`` in logit space, same shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.nn.log_softmax(jnp.array([1.0, 2.0, 3.0]))
      >>> g = jnp.exp(x)                     # a gradient along p: no effect on the model
      >>> bool(jnp.allclose(to_logit_space(g, x), 0.0, atol=1e-7))
      True
    """
    p = jnp.exp(logprobs).astype(grad.dtype)
    return grad - p * jnp.sum(grad, axis=-1, keepdims=True)
