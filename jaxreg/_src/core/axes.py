r"""Global reductions inside ``shard_map``: ``compose(..., axis_name=...)``.

Inside ``shard_map`` every shard traces the objective on its own block of the batch.
With ``axis_name`` the objective's numbers are made global while it is traced:

* a term's value or metric that still **varies** across the named mesh axes is this
  shard's share of a sum, and is ``psum``-ed; one that no longer varies (the term
  reduced it itself, e.g. the library's ``reduction="token_mean"``, which divides
  the psum of the numerators by the psum of the token counts) is taken as it is;
* squared norms and inner products of gradients are summed over the leaves, each leaf's
  part ``psum``-ed when the leaf varies (a block of a sharded input) and taken as it is
  when it does not (a replicated parameter, whose gradient JAX already ``psum``-s when it
  transposes the implicit ``pvary`` of ``shard_map``'s ``check_vma=True``).

Which values vary is read from their types (``check_vma=True``, ``shard_map``'s
default), at trace time, so nothing runs that the unsharded program does not also need
besides the collectives themselves.

This module has no jaxreg imports: the token reductions of ``jaxreg.losses`` and
``jaxreg.regularizers`` read the same context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax

__all__ = [
    "current",
    "pmax",
    "pmin",
    "psum",
    "reducing_over",
    "shard_map_axes",
    "total",
    "varying",
]

_STACK: list[tuple[str, ...]] = []


@contextlib.contextmanager
def reducing_over(axes: tuple[str, ...] | None) -> Iterator[None]:
    """Makes jaxreg's reductions global over ``axes`` while the objective is traced."""
    if not axes:
        yield
        return
    _STACK.append(tuple(axes))
    try:
        yield
    finally:
        _STACK.pop()


def current() -> tuple[str, ...]:
    """The mesh axes jaxreg's reductions are global over now (``()`` outside)."""
    return _STACK[-1] if _STACK else ()


def shard_map_axes() -> tuple[str, ...]:
    """The manual mesh axes of the ``shard_map`` being traced (``()`` outside one)."""
    return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def check_vma_enabled() -> bool:
    """Whether the ``shard_map`` being traced tracks varying axes (``check_vma=True``)."""
    try:
        from jax._src import config
    except ImportError:  # pragma: no cover - a future jax without the private module
        return True
    state = getattr(config, "_check_vma", None)
    return True if state is None else bool(state.value)


def varying(x: Any) -> frozenset[str]:
    """The manual mesh axes along which the traced array ``x`` varies."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _over(x: Any, axes: Sequence[str] | None) -> tuple[str, ...]:
    axes = current() if axes is None else tuple(axes)
    if not axes:
        return ()
    vary = varying(x)
    return tuple(a for a in axes if a in vary)


def psum(x: Any, axes: Sequence[str] | None = None) -> Any:
    """``lax.psum`` of ``x`` over the axes (default: ``current()``) along which it varies.

    Identity outside ``compose(..., axis_name=...)`` and for values that are already the
    same on every shard (a ``psum`` of those would multiply them by the axis size).
    """
    over = _over(x, axes)
    return jax.lax.psum(x, over) if over else x


def pmax(x: Any, axes: Sequence[str] | None = None) -> Any:
    """``lax.pmax`` over the axes along which ``x`` varies (see ``psum``)."""
    over = _over(x, axes)
    return jax.lax.pmax(x, over) if over else x


def pmin(x: Any, axes: Sequence[str] | None = None) -> Any:
    """``lax.pmin`` over the axes along which ``x`` varies (see ``psum``)."""
    over = _over(x, axes)
    return jax.lax.pmin(x, over) if over else x


def total(parts: Sequence[Any], zero: Any) -> Any:
    """``sum(parts)`` where each part is psum-ed over the axes it varies along.

    Parts are grouped by the axes they vary along, each group summed locally and
    ``psum``-ed once (one collective per group, not per leaf), so a replicated leaf's part
    is never counted once per shard.
    """
    axes = current()
    if not axes:
        return sum(parts, start=zero)
    groups: dict[tuple[str, ...], Any] = {}
    for part in parts:
        key = _over(part, axes)
        groups[key] = part if key not in groups else groups[key] + part
    result = zero
    for key, part in groups.items():
        result = result + (jax.lax.psum(part, key) if key else part)
    return result
