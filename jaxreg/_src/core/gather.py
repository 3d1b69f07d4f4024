"""Host reads of arrays that span several processes (multi-controller JAX).

Under ``jax.distributed`` a global ``jax.Array`` lives partly on other processes' devices:
``np.asarray`` on it raises. The helpers here read such arrays the way each use needs:
a finiteness flag computed on device (only the flag travels), a fully replicated array
from a local copy, and anything else gathered from every process
(``multihost_utils.process_allgather``, a collective: every process must make the call).
On fully addressable arrays (one process) they are the plain NumPy reads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["all_finite", "fully_addressable", "like", "placed_like", "to_host"]


def _spans_processes(a: Any) -> bool:
    return isinstance(a, jax.Array) and not a.is_fully_addressable


def fully_addressable(tree: Any) -> bool:
    """Whether every array leaf of ``tree`` can be read by this process alone."""
    return not any(_spans_processes(leaf) for leaf in jax.tree.leaves(tree))


def to_host(a: Any) -> np.ndarray:
    """``a`` as one NumPy array, the same on every process.

    A fully replicated global array is read from a local copy; any other global array is
    gathered from all processes (a collective: call it on every process, in the same
    order).
    """
    if not _spans_processes(a):
        return np.asarray(a)
    if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


@jax.jit
def _finite_flag(leaves: list[jax.Array]) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating leaf of ``tree`` is finite.

    On arrays that span processes the check runs on device and only its replicated flag
    is fetched (one scalar, not the arrays); every process must make the call.
    """
    leaves = [
        leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if fully_addressable(leaves):
        return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in leaves)
    return bool(to_host(_finite_flag(leaves)))


def like(host: np.ndarray, ref: Any) -> Any:
    """The host array ``host`` (the whole value) placed like the array ``ref``.

    A global ``ref`` gets a global array of its sharding, each process filling its own
    shards from ``host``; otherwise ``jnp.asarray(host)``.
    """
    if not _spans_processes(ref):
        return jnp.asarray(host)
    host = np.asarray(host)
    return jax.make_array_from_callback(ref.shape, ref.sharding, lambda index: host[index])


def placed_like(state: Any, params: Any) -> Any:
    """``state`` (made by an optimizer's ``init``) committed replicated where ``params`` live.

    ``jnp.zeros`` in ``init`` makes uncommitted single-device arrays; the jitted step
    returns them committed, replicated on the parameters' mesh, so the second step would
    trace again. Placing them there from the start keeps one trace. Parameters that are
    not committed ``jax.Array`` s leave ``state`` as it is.
    """
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.core.Tracer):  # init under a trace (jit, scan): nothing to place
            return state
        if isinstance(leaf, jax.Array) and getattr(leaf, "committed", False):
            sharding = leaf.sharding
            if isinstance(sharding, jax.sharding.NamedSharding):
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            elif len(sharding.device_set) != 1:
                return state
            if sharding.is_fully_addressable:
                return jax.device_put(state, sharding)
            # a mesh over several processes: each fills its own (replicated) shards
            values, treedef = jax.tree.flatten(state)
            made = jax.jit(lambda: values, out_shardings=sharding)()  # noqa: B023 (returns now)
            return jax.tree.unflatten(treedef, made)
    return state
