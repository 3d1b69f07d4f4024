"""Shared machinery of the built-in token-level terms: input checks, masking, reductions."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxreg._src.core.term import InputError
from jaxreg._src.terms.batch import Batch

REDUCTIONS = ("sum", "token_mean", "seq_mean")


class TermFunction:
    """A built-in term function that can be used directly or configured first.

    ``fn(x, batch)`` evaluates it with its current options; calling it with options only
    (``fn(reduction="token_mean")`` or ``kl("ref_logprobs")``) returns a configured copy.
    """

    def __init__(self, impl: Callable[..., Any], **options: Any):
        self._impl = impl
        self._options = options
        self._params = [
            p.name
            for p in inspect.signature(impl).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        functools.update_wrapper(self, impl)

    @property
    def options(self) -> dict[str, Any]:
        """The options this function was configured with."""
        return dict(self._options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{self._impl.__name__}({opts})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 2 and not isinstance(args[0], str):
            return self._impl(*args, **{**self._options, **kwargs})
        if len(args) > len(self._params):
            raise TypeError(f"{self._impl.__name__}: too many options; it takes {self._params}.")
        options = dict(zip(self._params, args, strict=False))
        unknown = set(kwargs) - set(self._params)
        if unknown:
            raise TypeError(
                f"{self._impl.__name__}: unknown options {sorted(unknown)}; "
                f"it takes {self._params}."
            )
        return TermFunction(self._impl, **{**self._options, **options, **kwargs})


def term_function(impl: Callable[..., Any]) -> TermFunction:
    """Decorator: makes ``impl(x, batch, *, options...)`` a ``TermFunction``."""
    return TermFunction(impl)


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(getattr(a, "shape", ()))


def check_tokens(
    name: str,
    x: Any,
    batch: Any,
    required: Sequence[str] = (),
    *,
    multi_target: bool | None = None,
) -> jax.Array:
    """Checks ``x`` and ``batch`` for a token term; returns the mask in ``x``'s dtype."""
    if not isinstance(batch, Batch):
        raise InputError(
            f"{name}: batch must be a jaxreg.Batch (mask and padded inputs); "
            f"found {type(batch).__name__}."
        )
    if not hasattr(x, "ndim") or x.ndim not in (2, 3):
        raise InputError(
            f"{name}: x (logprobs) must be [B, T] or [B, T, K]; found shape {_shape(x)}."
        )
    if multi_target is True and x.ndim != 3:
        raise InputError(f"{name}: x must be [B, T, K] (multi-target); found shape {x.shape}.")
    if batch.mask.shape != x.shape[:2]:
        raise InputError(
            f"{name}: batch.mask must be [B, T] = {tuple(x.shape[:2])} to match x; "
            f"found shape {_shape(batch.mask)}."
        )
    for key in required:
        if key not in batch.inputs:
            raise InputError(
                f"{name}: batch.inputs[{key!r}] is missing; found keys {sorted(batch.inputs)}."
            )
        value = batch.inputs[key]
        if _shape(value)[:2] != tuple(x.shape[:2]) or len(_shape(value)) > x.ndim:
            raise InputError(
                f"{name}: batch.inputs[{key!r}] must be [B, T] or shaped like x "
                f"{tuple(x.shape)}; found shape {_shape(value)}."
            )
    return batch.mask.astype(x.dtype)


def expand(mask: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcasts a ``[B, T]`` mask against a ``[B, T, ...]`` array."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def clean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Zeroes padded positions, so that padding can hold anything (even NaN or -inf)."""
    return jnp.where(expand(mask, x) > 0, x, jnp.zeros((), x.dtype))


def get(batch: Batch, key: str, x: jax.Array, mask: jax.Array) -> jax.Array:
    """An input in ``x``'s floating dtype with padded positions zeroed."""
    value = batch.inputs[key].astype(x.dtype)
    return clean(value, mask)


def reduce(name: str, per_token: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
    r"""Reduces a ``[B, T]`` per-token array over real tokens.

    ``"sum"``: :math:`\sum_{b,t} m_{bt} v_{bt}` (Tinker's convention).
    ``"token_mean"``: the sum divided by the number of real tokens.
    ``"seq_mean"``: each sequence's mean over its real tokens, averaged over the
    sequences that have at least one real token.
    """
    masked = per_token * mask
    if reduction == "sum":
        return jnp.sum(masked)
    if reduction == "token_mean":
        return jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1)
    if reduction == "seq_mean":
        lengths = jnp.sum(mask, axis=1)
        per_seq = jnp.sum(masked, axis=1) / jnp.maximum(lengths, 1)
        real = (lengths > 0).astype(per_token.dtype)
        return jnp.sum(per_seq * real) / jnp.maximum(jnp.sum(real), 1)
    raise InputError(f"{name}: reduction must be one of {REDUCTIONS}; found {reduction!r}.")


def token_stats(values: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Max and min of a ``[B, T]`` array over real tokens (0 when there are none).

    The values are materialised once (``optimization_barrier``) so that the elementwise
    work that produced them is not recomputed inside each reduction.
    """
    values = jax.lax.optimization_barrier(jax.lax.stop_gradient(values))
    real = mask > 0
    big = jnp.asarray(jnp.finfo(values.dtype).max, values.dtype)
    vmax = jnp.max(jnp.where(real, values, -big))
    vmin = jnp.min(jnp.where(real, values, big))
    any_real = vmax >= vmin
    zero = jnp.zeros((), values.dtype)
    return {"max": jnp.where(any_real, vmax, zero), "min": jnp.where(any_real, vmin, zero)}


def token_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean of a ``[B, T]`` array over real tokens (0 when there are none)."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)
