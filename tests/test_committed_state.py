"""Optimizer states start committed where the parameters live: one trace, not two."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxreg as jr


def test_first_optax_step_does_not_retrace_on_mesh_params():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    params = jax.device_put(
        {"w": np.ones(3, np.float32), "b": np.float32(0.1)}, NamedSharding(mesh, P())
    )
    opt = optax.chain(
        jr.aggregators.upgrad(),
        jr.transforms.regularize([jr.Term("l2", jr.regularizers.l2, weight=0.02)]),
        optax.sgd(0.1),
    )
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        stacked = jax.tree.map(lambda a: jnp.stack([a, -2.0 * a + 1.0]), p)
        u, s = opt.update(stacked, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    assert all(leaf.committed for leaf in jax.tree.leaves(state))
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1  # was 2: the uncommitted init state retraced step 2


def test_state_of_uncommitted_params_stays_as_before():
    state = jr.aggregators.mgda().init(None)
    assert state.residual.shape == () and state.residual.dtype == jnp.float32
