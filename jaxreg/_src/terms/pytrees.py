"""What a parameter penalty covers in a model's pytree: flax.nnx state that is not a parameter.

``nnx.state(model)`` holds every ``flax.nnx.Variable`` of a model: its parameters
(``nnx.Param``) and its other state, such as BatchNorm's running statistics
(``nnx.BatchStat``), RNG keys and counters (``nnx.RngState``) or caches. A norm of the
whole state would penalise the statistics too (a running variance starts at 1 per
feature). The built-in parameter penalties (``jaxreg.regularizers.l1``, ``l2``,
``elastic_net``) pass their input through ``params_only``, which leaves that state
out and says so with a ``NonParamStateWarning``.

jaxreg does not depend on flax: nothing is imported, and pytrees pass unchanged, unless
the program has imported ``flax.nnx`` itself.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import jax

__all__ = ["NonParamStateWarning", "non_param_paths", "params_only"]

MAX_LISTED = 8
"""How many left-out paths a warning names."""


class NonParamStateWarning(UserWarning):
    """A parameter penalty was given flax.nnx state that is not a parameter, and left it out.

    Pass the parameters alone instead, ``nnx.split(model, nnx.Param, ...)`` or
    ``nnx.state(model, nnx.Param)``, to silence it.
    """


def _nnx() -> Any:
    """The ``flax.nnx`` module if the program imported it, else ``None`` (no import)."""
    return sys.modules.get("flax.nnx")


def non_param_paths(tree: Any) -> list[tuple[str, str]]:
    """The ``(path, variable type)`` of every nnx Variable in ``tree`` that is not a Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxreg._src.terms.pytrees import non_param_paths
      >>> non_param_paths({"w": jnp.ones(2)})  # no flax.nnx Variables: nothing to report
      []
    """
    nnx = _nnx()
    if nnx is None:
        return []
    is_variable = lambda v: isinstance(v, nnx.Variable)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]
    return [
        (jax.tree_util.keystr(path), type(v).__name__)
        for path, v in flat
        if is_variable(v) and not isinstance(v, nnx.Param)
    ]


def params_only(name: str, tree: Any, *, warn: bool = True) -> Any:
    r"""``tree`` without its flax.nnx Variables that are not ``nnx.Param``.

    In dicts and ``nnx.State`` the left-out entries are removed, so the whole
    ``nnx.state(model)`` becomes ``nnx.state(model, nnx.Param)``, structure included;
    in other containers (lists, tuples, dataclasses) a left-out Variable becomes ``None``,
    an empty subtree. A pytree without such Variables is returned as it is.

    Args:
      name: the penalty's name, for the warning.
      tree: the penalty's input (parameters, or anything else).
      warn: issue a ``NonParamStateWarning`` naming what was left out (at trace
        time: once per compilation under ``jit``).

    Returns:
      The tree, with the parameters only.

    Example:
      >>> import warnings
      >>> from flax import nnx
      >>> from jaxreg._src.terms.pytrees import params_only
      >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     kept = params_only("l2", nnx.state(bn))
      >>> sorted(kept.keys())  # scale and bias; not mean and var
      ['bias', 'scale']
      >>> print(caught[0].message)  # doctest: +ELLIPSIS
      l2: left out 2 flax.nnx Variable(s) that are not nnx.Param: ['mean'] (BatchStat), ...
    """
    dropped = non_param_paths(tree)
    if not dropped:
        return tree
    nnx = _nnx()
    if warn:
        listed = ", ".join(f"{p} ({t})" for p, t in dropped[:MAX_LISTED])
        more = f" and {len(dropped) - MAX_LISTED} more" if len(dropped) > MAX_LISTED else ""
        warnings.warn(
            f"{name}: left out {len(dropped)} flax.nnx Variable(s) that are not nnx.Param: "
            f"{listed}{more}. A parameter penalty reads parameters only; pass them alone "
            "to silence this: graphdef, params, rest = nnx.split(model, nnx.Param, ...) "
            "(differentiate params), or nnx.state(model, nnx.Param).",
            NonParamStateWarning,
            stacklevel=3,
        )

    pruned = _prune(tree, nnx)
    if pruned is _DROPPED:  # nothing but non-Param state: an empty tree
        return type(tree)({}) if isinstance(tree, dict | nnx.State) else None
    return pruned


_DROPPED = object()


def _prune(node: Any, nnx: Any) -> Any:
    """``node`` without non-Param Variables; ``_DROPPED`` if nothing else was in it.

    Dicts and ``nnx.State`` lose the keys of what was left out (and of sub-dicts left
    empty by it), so a pruned ``nnx.state(model)`` has the structure of
    ``nnx.state(model, nnx.Param)``; in other containers a left-out Variable becomes
    ``None``.
    """
    if isinstance(node, nnx.Variable):
        return node if isinstance(node, nnx.Param) else _DROPPED
    if type(node) is dict or isinstance(node, nnx.State):
        state: Any = node  # a dict, or a State's underlying dict
        mapping: dict = state if type(state) is dict else state.raw_mapping
        kept = {}
        for key, value in mapping.items():
            sub = _prune(value, nnx)
            if sub is not _DROPPED:
                kept[key] = sub
        return type(node)(kept) if kept or not node else _DROPPED
    return jax.tree.map(
        lambda v: None if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param) else v,
        node,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
