"""Masked arithmetic shared by the token batch and the token terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreg._src.core import axes


def expand(mask: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcasts a ``[B, T]`` mask against a ``[B, T, ...]`` array."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def token_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    r"""The mean of ``values`` over the positions where ``mask`` is 1 (0 where there are none).

    .. math:: \frac{\sum_i m_i v_i}{\max(\sum_i m_i,\ 1)}

    over all axes, or along ``axis`` only. ``mask`` is 0/1 and shaped like ``values``.

    Inside ``shard_map`` under ``compose(..., axis_name=...)`` a mean over all axes is
    global: the numerator and the token count are each ``psum``-ed over the named axes
    (the mean over every shard's tokens, not the mean of the shards' means).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxreg._src.terms.masking import token_mean
      >>> v, m = jnp.array([[1.0, 3.0], [5.0, 7.0]]), jnp.array([[1.0, 1.0], [1.0, 0.0]])
      >>> float(token_mean(v, m)), token_mean(v, m, axis=1).tolist()
      (3.0, [2.0, 5.0])
    """
    num, count = jnp.sum(values * mask, axis=axis), jnp.sum(mask, axis=axis)
    if axis is None:
        num, count = axes.psum(num), axes.psum(count)
    return num / jnp.maximum(count, 1)
