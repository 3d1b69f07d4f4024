r"""``grad_strategy="auto"``: which terms share one ``vmap``-ed VJP, decided at trace time.

``compose`` computes the ``n`` per-term gradients in one of two ways
(``program.jacobian``):

* **per term**: one VJP per term. Each term's backward runs once, for its own cotangent,
  so the backward work is :math:`W_b = \sum_i w_i`, in a few XLA kernels per term.
* **vmap**: one VJP of all terms, ``vmap``-ed over the cotangent basis. ``vmap`` does
  not prune the zero rows of the basis, so every term's backward runs ``n`` times:
  :math:`n W_b`, in fewer kernels (one batched kernel where per-term has ``n``).

With ``n`` terms, ``vmap`` saves a fixed cost per term (the kernels it merges) and adds
:math:`(n - 1) W_b`; both grow with ``n - 1``, so it pays exactly when the terms' total
work is below a threshold, whatever ``n``:

.. math:: \text{vmap} \iff W \le W^\ast

where :math:`W` is the terms' forward work (element operations, read off their jaxpr)
and :math:`W^\ast` (``VMAP_MAX_WORK``) was fitted on CPU measurements. ``W`` is
needed only when the shapes alone leave ``vmap`` possible (``n * x.size`` small), so the
terms are traced a second time only for tiny problems, and never compiled twice.

Measured, the picture is less tidy: XLA:CPU's fusion and threading make a few mid-size
cells favour ``vmap`` (by up to 26%, e.g. 8 cheap terms on ``[2, 512]``, and more when a
second core is free) while most lose (up to 2.65x with 8 terms, and ``n / 2`` times
``per_term`` from 20 terms on), and nothing in the shapes or the work tells the few
apart. So :math:`W^\ast` sits where ``vmap`` never lost, and everything else goes per
term, the strategy whose worst case is small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

__all__ = ["VMAP_MAX_WORK", "auto_groups", "forward_work"]

Groups = tuple[tuple[int, ...], ...]

# The most forward work (element operations of all terms together, see forward_work)
# for which one vmap-ed VJP is chosen. Fitted on 2 CPU cores (jax 0.10.2, load 0.3-3.7):
# vmap time / per_term time, the median of per-call ratios over 200-1000 interleaved
# rounds, for 2, 3, 5 and 8 of the library's token terms (strategy_bench's cycle, and
# cheap and heavy subsets of it) on [2,64], [2,128], [2,512] and [8,512], 48 cells:
#   W <= 4.8k (7 cells):      0.93-0.99, vmap never lost
#   4.8k < W <= 10k (6):      0.92-0.99 in 3 cells; 1.44 (8 cheap terms), 1.50 (kl + ppo)
#                             and 1.65 (5 terms with kl and smoothness)
#   10k < W <= 100k (22):     1.09-2.24, except 0.98-1.00 (2 terms on [8,512]) and 0.71
#   W > 100k (13):            0.94-1.85; from 20 terms on ~n/2 (n^2 work against n),
#                             see benchmarks/RESULTS.md, "grad_strategy=auto"
# vmap's best gain is 3-8% of a call of ~50 us, and it loses up to 1.65x from 7.7k on:
# the threshold keeps the smallest cells, where it never lost.
VMAP_MAX_WORK = 1 << 12

# The least forward work a term can have per element of x: it reads x once. Used to
# rule vmap out from the shapes alone, before any tracing.
_MIN_WORK_PER_ELEMENT = 1

# The work per element of x assumed for a term when the terms are not given: the median
# of the library's [B, T] token terms by forward_work at [8, 512] (l2 5, l1, entropy and
# elastic_net 7, length_penalty 7.5, cross_entropy 11, confidence_penalty 13,
# consistency 14.5, importance_sampling 21, smoothness 22, kl 30, ppo 32).
TYPICAL_WORK_PER_ELEMENT = 12


def per_term(n_terms: int) -> Groups:
    """One group per term: ``((0,), (1,), ..., (n - 1,))``."""
    return tuple((i,) for i in range(n_terms))


def auto_groups(
    n_terms: int,
    x: Any,
    terms: Callable[[Any], Any] | None = None,
    *,
    forward: bool = False,
) -> Groups:
    r"""The groups ``grad_strategy="auto"`` uses: all terms in one group, or one each.

    One ``vmap``-ed VJP of all terms when ``x`` is one array and the terms' forward work
    :math:`W` is at most ``VMAP_MAX_WORK`` element operations; one VJP per term
    otherwise. Parameter pytrees, and objectives with a model stage, always go per term:
    their terms usually run a model, whose backward ``vmap`` would repeat for every term
    (6.45x the floor against 1.72x per term on the MLP of ``benchmarks/compose_bench.py``).

    Decided at trace time from static shapes: ``x`` may be a tracer.

    Args:
      n_terms: the number of terms.
      x: the differentiated input (an array or a pytree; only its structure and shapes
        are read).
      terms: the terms' forward, ``x -> anything``; traced (not run) to measure
        :math:`W` with ``forward_work`` when the shapes alone do not rule ``vmap``
        out. Without it, each term is assumed to do ``TYPICAL_WORK_PER_ELEMENT``
        operations per element of ``x``.
      forward: whether the objective has a model stage; its output terms then each
        need one backward through the model, which a ``vmap`` would batch into one
        ``[n, ...]`` pass over every activation, so they go per term.

    Returns:
      A tuple of groups of term indices, covering ``range(n_terms)`` once.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxreg._src.core.strategy import auto_groups
      >>> auto_groups(3, jnp.zeros((64, 8192)))      # many elements: per term
      ((0,), (1,), (2,))
      >>> auto_groups(2, jnp.zeros((4, 16)), lambda x: (jnp.sum(x), jnp.sum(x**2)))
      ((0, 1),)
      >>> auto_groups(2, {"w": jnp.zeros(4)})         # a pytree: per term
      ((0,), (1,))
    """
    if forward or n_terms < 2 or not isinstance(x, jax.Array | np.ndarray):
        return per_term(n_terms)
    if n_terms * x.size * _MIN_WORK_PER_ELEMENT > VMAP_MAX_WORK:
        return per_term(n_terms)
    typical = n_terms * x.size * TYPICAL_WORK_PER_ELEMENT
    work = typical if terms is None else forward_work(terms, x)
    return (tuple(range(n_terms)),) if work <= VMAP_MAX_WORK else per_term(n_terms)


def forward_work(fn: Callable[[Any], Any], x: Any) -> int:
    """Element operations in ``fn(x)``'s jaxpr: a static estimate of its cost.

    Each equation counts its largest operand or result (an elementwise op or a
    reduction touches every element once), a ``dot_general`` or a convolution its
    multiply-adds, a ``scan`` its body times its length, a ``cond`` its costliest branch.

    Args:
      fn: any function of ``x`` JAX can trace; it is traced once, not run.
      x: its argument (an array, a pytree, or tracers of an enclosing trace).

    Returns:
      The estimate, an ``int``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxreg._src.core.strategy import forward_work
      >>> forward_work(lambda x: jnp.sum(jnp.exp(x)), jnp.zeros(100))  # exp, sum
      200
      >>> a = jnp.ones((8, 4))
      >>> forward_work(lambda w: a @ w, jnp.zeros((4, 3)))  # 8 * 3 outputs of 4 terms
      96
    """
    return _jaxpr_work(jax.make_jaxpr(fn)(x).jaxpr)


def _shape(var: Any) -> tuple[int, ...]:
    """A jaxpr variable's shape (``()`` for tokens and other shapeless values)."""
    return tuple(getattr(getattr(var, "aval", None), "shape", ()))


def _size(var: Any) -> int:
    return int(np.prod(_shape(var)))


def _jaxpr_work(jaxpr: jex.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        subs = [_jaxpr_work(j) for j in jex.jaxprs_in_params(eqn.params)]
        name = eqn.primitive.name
        if subs:
            if name == "cond":
                total += max(subs)
            elif name == "scan":
                total += sum(subs) * int(eqn.params["length"])
            else:
                total += sum(subs)
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = _shape(eqn.invars[0])
            total += _size(eqn.outvars[0]) * int(np.prod([lhs[d] for d in contract]))
        elif name == "conv_general_dilated":
            # Multiply-adds: each output element reads one filter's worth of inputs.
            rhs = _shape(eqn.invars[1])
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += _size(eqn.outvars[0]) * int(np.prod(rhs)) // max(out_features, 1)
        else:
            total += max((_size(v) for v in (*eqn.invars, *eqn.outvars)), default=0)
    return total
