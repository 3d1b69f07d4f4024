"""Small linear-algebra helpers shared by ``compose`` and the aggregators."""

from __future__ import annotations

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
