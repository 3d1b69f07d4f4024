"""Shared machinery of the built-in token-level terms: input checks, masking, reductions."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxreg._src.core import axes
from jaxreg._src.core.term import InputError
from jaxreg._src.terms.batch import Batch
from jaxreg._src.terms.masking import expand, token_mean

REDUCTIONS = ("sum", "token_mean", "seq_mean")

SAMPLING_LOGPROBS = "sampling_logprobs"
"""The batch input holding the sampling policy's logprobs of the sampled tokens.

Tinker's ``loss_fn_inputs`` call it ``"logprobs"``;
[`jaxreg.remote.forward_backward_custom`][jaxreg.remote.forward_backward_custom] renames it when it
packs Tinker datums, so that ``"logprobs"`` is never two things in one batch (``x`` is the current
policy's logprobs).
"""


class TermFunction:
    """A built-in term function that can be used directly or configured first.

    ``fn(x, batch)``, or ``fn(x)`` when ``x`` is an array or a pytree (``l2(params)``,
    ``entropy(logits)``), evaluates it with its current options; calling it with options
    only (``fn(reduction="token_mean")``, ``kl("ref_logprobs")``, ``elastic_net(0.3)``:
    names, numbers and keywords) returns a configured copy.
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
        if args and (_is_data(args[0]) or (len(args) >= 2 and not isinstance(args[0], str))):
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


def _is_data(value: Any) -> bool:
    """Whether a first positional argument is the term's input (evaluate) or an option.

    Options given positionally are names and numbers (``kl("ref_logprobs")``,
    ``elastic_net(0.3)``); arrays and pytrees are inputs, so ``l2(params)`` evaluates.
    """
    return not isinstance(value, str | int | float | complex | bool | type(None))


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


def check_dense(name: str, x: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
    """Checks classifier outputs ``[B, K]`` (or unmasked ``[B, T, K]``) given without a Batch.

    Returns ``x`` as ``[B, T, K]`` (``T = 1`` for ``[B, K]``: every row is one prediction)
    and an all-ones ``[B, T]`` mask, so that the token code paths and reductions apply.
    """
    if isinstance(batch, Mapping) and "mask" in batch:
        raise InputError(
            f"{name}: batch must be a jaxreg.Batch (mask and padded inputs) for token "
            f"logprobs; found a {type(batch).__name__} with a 'mask' key. Build "
            "jr.Batch(mask, inputs), or, for classifier outputs [B, K], pass batch=None or "
            "a dict without a 'mask' key."
        )
    if not hasattr(x, "ndim") or x.ndim not in (2, 3):
        raise InputError(
            f"{name}: without a jaxreg.Batch, x must be classifier outputs [B, K] (or "
            f"[B, T, K]), a distribution over the last axis; found shape {_shape(x)}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"{name}: x must be floating; found dtype {x.dtype}.")
    x3 = x[:, None, :] if x.ndim == 2 else x
    return x3, jnp.ones(x3.shape[:2], x.dtype)


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
    if reduction == "sum":
        return axes.psum(jnp.sum(per_token * mask))
    if reduction == "token_mean":
        return token_mean(per_token, mask)
    if reduction == "seq_mean":
        real = (jnp.sum(mask, axis=1) > 0).astype(per_token.dtype)
        return token_mean(token_mean(per_token, mask, axis=1), real)
    raise InputError(f"{name}: reduction must be one of {REDUCTIONS}; found {reduction!r}.")


def token_stats(values: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Max and min of a ``[B, T]`` array over real tokens (0 when there are none).

    The values are materialised once (``optimization_barrier``) so that the elementwise
    work that produced them is not recomputed inside each reduction.
    """
    values = jax.lax.optimization_barrier(jax.lax.stop_gradient(values))
    real = mask > 0
    big = jnp.asarray(jnp.finfo(values.dtype).max, values.dtype)
    vmax = axes.pmax(jnp.max(jnp.where(real, values, -big)))
    vmin = axes.pmin(jnp.min(jnp.where(real, values, big)))
    any_real = vmax >= vmin
    zero = jnp.zeros((), values.dtype)
    return {"max": jnp.where(any_real, vmax, zero), "min": jnp.where(any_real, vmin, zero)}
