"""``grad_strategy="auto"``: how per-term gradients are grouped, from static shapes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["AUTO_VMAP_MAX_ELEMENTS", "auto_groups"]

# "auto" uses one vmap-ed VJP for a single array x of at most this many elements (the
# per-call cost of the per-term program's extra kernels dominates there: 1.02-1.10x the
# floor instead of 1.50-1.61x at [8, 512]) and per-term VJPs otherwise (1.0-1.4x against
# 1.5-2.2x at [32, 2048] and up; parameter pytrees always go per term).
AUTO_VMAP_MAX_ELEMENTS = 1 << 14


def auto_groups(n_terms: int, x: Any, *, forward: bool = False) -> tuple[tuple[int, ...], ...]:
    """The VJP groups ``"auto"`` uses for ``n_terms`` terms at input ``x`` (trace time).

    Args:
      n_terms: the number of terms.
      x: the differentiated input (only its static structure and shapes are read).
      forward: whether the objective has a model stage; its output terms then each
        need one backward through the model, which a ``vmap`` would batch into one
        ``[n, ...]`` pass over every activation, so they go per term.

    Returns:
      A tuple of groups of term indices: one group of all terms (``"vmap"``) or one
      group per term (``"per_term"``).
    """
    per_term = tuple((i,) for i in range(n_terms))
    if forward or n_terms <= 1:
        return per_term
    small = isinstance(x, jax.Array | np.ndarray) and x.size <= AUTO_VMAP_MAX_ELEMENTS
    return (tuple(range(n_terms)),) if small else per_term
