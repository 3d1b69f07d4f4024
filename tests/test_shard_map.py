"""compose inside shard_map is refused (per-shard numbers are never returned silently), and
compose under jit on globally sharded arrays equals the unsharded result (2 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxreg as jr

RNG = np.random.default_rng(5)


def _objective():
    def nll(x, b):
        return -jnp.sum(x * b["mask"]) / jnp.maximum(jnp.sum(b["mask"]), 1)

    return jr.compose(
        jr.Term("nll", nll), [jr.Term("l2", lambda x, b: jnp.sum(x**2))], track_grad_norms=True
    )


def _data():
    x = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32)
    mask = np.ones((4, 6), np.float32)
    mask[2:, 2:] = 0  # unequal token counts on the two shards
    return x, {"mask": jnp.asarray(mask)}


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
def test_compose_inside_shard_map_is_refused_with_a_clear_error():
    mesh = jax.make_mesh((2,), ("data",))
    objective = _objective()
    x, batch = _data()
    sh = NamedSharding(mesh, P("data"))
    x, batch = jax.device_put((x, batch), sh)

    def local(x, batch):
        return objective(x, batch).loss_total

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
    with pytest.raises(jr.JaxregError, match=r"inside shard_map .*\['data'\].*jax.jit"):
        f(x, batch)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")
def test_jit_on_globally_sharded_arrays_equals_the_unsharded_result():
    mesh = jax.make_mesh((2,), ("data",))
    objective = _objective()
    x, batch = _data()
    ref = objective(x, batch)
    sh = NamedSharding(mesh, P("data"))
    got = objective(*jax.device_put((x, batch), sh))
    assert got.grad.sharding.is_equivalent_to(sh, 2)
    mask = np.asarray(batch["mask"])
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(
        float(got.base_loss.value), -(xn * mask).sum() / mask.sum(), rtol=1e-6
    )
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
