"""compose inside shard_map: refused without axis_name (per-shard numbers are never
returned silently), global with ``compose(..., axis_name=...)`` (equal to the unsharded
computation on the whole batch, with unequal token counts per shard), and compose under
jit on globally sharded arrays (2 CPU devices, tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxreg as jr

RNG = np.random.default_rng(5)
two_devices = pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")


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


def _mesh():
    return jax.make_mesh((2,), ("data",))


@two_devices
def test_compose_inside_shard_map_without_axis_name_is_refused_and_points_to_it():
    mesh = _mesh()
    objective = _objective()
    x, batch = _data()
    sh = NamedSharding(mesh, P("data"))
    x, batch = jax.device_put((x, batch), sh)

    def local(x, batch):
        return objective(x, batch).loss_total

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
    with pytest.raises(jr.JaxregError, match=r"inside shard_map .*\['data'\].*axis_name='data'"):
        f(x, batch)


@two_devices
def test_jit_on_globally_sharded_arrays_equals_the_unsharded_result():
    mesh = _mesh()
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


# --- compose(..., axis_name=...) inside shard_map ----------------------------------------


def _token_batch():
    """Logprobs [4, 6] and a Batch whose two shards hold 12 and 3 real tokens."""
    x = jnp.asarray(-np.abs(RNG.normal(size=(4, 6))) - 0.1, jnp.float32)
    mask = np.zeros((4, 6), np.float32)
    mask[:2] = 1  # shard 0: 12 tokens
    mask[2, :2] = 1  # shard 1: 3 tokens (row 3 is all padding)
    mask[3, :1] = 1
    ref = jnp.asarray(x + 0.3 * RNG.normal(size=(4, 6)), jnp.float32)
    weights = jnp.asarray(RNG.uniform(0.5, 1.5, size=(4, 6)), jnp.float32)
    batch = jr.Batch(jnp.asarray(mask), {"ref_logprobs": ref, "weights": weights})
    return x, batch


def _token_terms():
    """A token_mean base, a token_mean and a seq_mean regularizer, and plain sums."""
    return (
        jr.Term("ce", jr.losses.cross_entropy(reduction="token_mean")),
        [
            jr.Term("kl", jr.regularizers.kl("ref_logprobs"), weight=0.5),
            jr.Term("ent", jr.regularizers.entropy(reduction="seq_mean"), weight=0.2),
            jr.Term("ce_sum", jr.losses.cross_entropy(reduction="sum"), weight=0.1),
            # A user's plain sum over its shard: psum-ed by compose.
            jr.Term("sq", lambda x, b: (jnp.sum(x**2 * b.mask), {"n": jnp.sum(b.mask)}), 0.05),
        ],
    )


def _shard_map_call(objective, mesh, x_spec, batch_spec, *, term_grads=False, cosines=False):
    """``objective`` inside shard_map; scalars replicated, grad in x's layout."""

    def local(x, batch, w):
        out = objective(x, batch, weights={"kl": w})
        res = {"scalars": out.scalars, "metrics": out.as_arrays(), "grad": out.grad}
        if cosines:
            res["cos"] = out.grad_cosines
        if term_grads:
            res["term_grads"] = out.term_grads
        return res

    out_specs = {"scalars": P(), "metrics": P(), "grad": x_spec}
    if cosines:
        out_specs["cos"] = P()
    if term_grads:
        out_specs["term_grads"] = jax.tree.map(lambda s: P(None, *s), x_spec)
    return jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(x_spec, batch_spec, P()), out_specs=out_specs)
    )


def _assert_equal_to(ref, got, *, rtol=2e-5, atol=1e-6):
    np.testing.assert_allclose(
        np.asarray(got["scalars"]), np.asarray(ref.scalars), rtol=rtol, atol=atol
    )
    for a, b in zip(jax.tree.leaves(ref.grad), jax.tree.leaves(got["grad"]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)
    if "cos" in got:
        np.testing.assert_allclose(
            np.asarray(got["cos"]), np.asarray(ref.grad_cosines), rtol=rtol, atol=atol
        )
    if "term_grads" in got:
        for a, b in zip(
            jax.tree.leaves(ref.term_grads), jax.tree.leaves(got["term_grads"]), strict=True
        ):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)


STRATEGIES = ["auto", "per_term", "vmap", "sequential", [("kl", "ent")]]


@two_devices
@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_axis_name_token_terms_equal_the_whole_batch(strategy):
    mesh = _mesh()
    x, batch = _token_batch()
    base, regs = _token_terms()
    kw = dict(track_grad_norms=True, grad_conflicts=True, grad_strategy=strategy)
    ref = jr.compose(base, regs, **kw)(x, batch, weights={"kl": 0.7})
    objective = jr.compose(base, regs, axis_name="data", **kw)
    spec = P("data")
    f = _shard_map_call(objective, mesh, spec, spec, cosines=True)
    got = f(*jax.device_put((x, batch), NamedSharding(mesh, spec)), jnp.float32(0.7))
    _assert_equal_to(ref, got)
    # The grad keeps the data sharding; the scalars are one replicated copy.
    assert got["grad"].sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)
    assert got["scalars"].shape == ref.scalars.shape


@two_devices
def test_axis_name_values_against_numpy_on_unequal_shards():
    """Global token means: sum of numerators over sum of counts, not a mean of means."""
    mesh = _mesh()
    x, batch = _token_batch()
    base, regs = _token_terms()
    objective = jr.compose(base, regs, track_grad_norms=True, axis_name="data")
    spec = P("data")
    f = _shard_map_call(objective, mesh, spec, spec)
    got = f(*jax.device_put((x, batch), NamedSharding(mesh, spec)), jnp.float32(0.5))
    d = jax.tree.map(float, got["metrics"])
    xn, m = np.asarray(x, np.float64), np.asarray(batch.mask, np.float64)
    wn = np.asarray(batch["weights"], np.float64)
    ce = -(wn * xn * m).sum() / m.sum()
    assert m[:2].sum() == 12 and m[2:].sum() == 3  # shard means 1/12 and 1/3 apart
    np.testing.assert_allclose(d["base_loss"]["value"], ce, rtol=1e-6)
    np.testing.assert_allclose(
        d["regularizers"]["ce_sum"]["value"], -(wn * xn * m).sum(), rtol=1e-6
    )
    np.testing.assert_allclose(d["regularizers"]["sq"]["value"], (xn**2 * m).sum(), rtol=1e-6)
    assert d["regularizers"]["sq"]["custom"]["n"] == 15.0
    # d ce / d x = -w m / N over the whole batch: its norm uses the global count N = 15.
    np.testing.assert_allclose(
        d["base_loss"]["grad_norm"], np.linalg.norm(wn * m / m.sum()), rtol=1e-5
    )
    np.testing.assert_allclose(
        d["regularizers"]["sq"]["grad_norm"], np.linalg.norm(2 * xn * m), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(got["grad"]),
        -wn * m / m.sum() + 0.1 * -wn * m + 0.05 * 2 * xn * m + _kl_ent_grad(x, batch),
        rtol=1e-4,
        atol=1e-6,
    )


def _kl_ent_grad(x, batch):
    """The kl and entropy part of the total gradient, from jax.grad on the whole batch."""

    def f(x):
        kl = jr.regularizers.kl("ref_logprobs")(x, batch)[0]
        ent = jr.regularizers.entropy(reduction="seq_mean")(x, batch)[0]
        return 0.5 * kl + 0.2 * ent

    return np.asarray(jax.grad(f)(x), np.float64)


def _mlp_data():
    feats = jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32)
    mask = np.ones((8, 4), np.float32)
    mask[4:, 1:] = 0  # shard 0: 16 tokens, shard 1: 4
    mask[6, 0] = 0
    batch = jr.Batch(
        jnp.asarray(mask),
        {"feats": feats, "weights": jnp.asarray(RNG.uniform(size=(8, 4)), jnp.float32)},
    )
    params = {
        "w": jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(RNG.normal(size=(4,)), jnp.float32),
    }
    return params, batch


def _forward(params, batch):
    return jax.nn.log_sigmoid(batch["feats"] @ params["w"] + params["b"])  # [B, T=4]


@two_devices
@pytest.mark.parametrize("strategy", ["auto", "per_term", "vmap", "sequential"])
def test_axis_name_model_stage_replicated_params_equal_the_whole_batch(strategy):
    mesh = _mesh()
    params, batch = _mlp_data()
    base = jr.Term("ce", jr.losses.cross_entropy(reduction="token_mean"))
    regs = [
        jr.Term("ent", jr.regularizers.entropy(reduction="token_mean"), weight=0.3),
        jr.Term("kl", lambda y, b: jnp.sum(y * b.mask) * 0.01, weight=0.2),
        jr.Term("l2", jr.regularizers.l2, weight=0.1, on="params"),
    ]
    kw = dict(forward=_forward, grad_conflicts=True, track_grad_norms=True)
    kw["grad_strategy"] = strategy
    ref = jr.compose(base, regs, **kw)(params, batch, weights={"kl": 0.4})
    objective = jr.compose(base, regs, axis_name="data", **kw)
    pspec = jax.tree.map(lambda _: P(), params)
    f = _shard_map_call(objective, mesh, pspec, P("data"), cosines=True)
    got = f(
        jax.device_put(params, NamedSharding(mesh, P())),
        jax.device_put(batch, NamedSharding(mesh, P("data"))),
        jnp.float32(0.4),
    )
    _assert_equal_to(ref, got)
    # The norms are of the whole batch's gradients (a per-shard gradient of a mean loss is
    # a quarter of the global one or more here): against a loop of jax.grad.
    norms = [float(t.grad_norm) for t in ref.terms.values()]
    for i, term in enumerate([base, *regs]):

        def loss(p, term=term):
            inputs = p if term.on == "params" else _forward(p, batch)
            return term.evaluate(inputs, batch)[0]

        g = jax.grad(loss)(params)
        want = np.sqrt(
            sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(g))
        )
        np.testing.assert_allclose(norms[i], want, rtol=1e-5)


@two_devices
def test_axis_name_term_grads_stay_sharded_and_equal_the_whole_batch():
    mesh = _mesh()
    x, batch = _token_batch()
    base, regs = _token_terms()
    kw = dict(term_grads=True, track_grad_norms=True)
    ref = jr.compose(base, regs, **kw)(x, batch, weights={"kl": 0.2})
    objective = jr.compose(base, regs, axis_name=("data",), **kw)
    spec = P("data")
    f = _shard_map_call(objective, mesh, spec, spec, term_grads=True)
    got = f(*jax.device_put((x, batch), NamedSharding(mesh, spec)), jnp.float32(0.2))
    _assert_equal_to(ref, got)
    assert got["term_grads"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 3)


@two_devices
def test_axis_name_new_weights_do_not_retrace():
    mesh = _mesh()
    x, batch = _token_batch()
    base, regs = _token_terms()
    objective = jr.compose(base, regs, grad_conflicts=True, axis_name="data")
    spec = P("data")
    f = _shard_map_call(objective, mesh, spec, spec, cosines=True)
    args = jax.device_put((x, batch), NamedSharding(mesh, spec))
    losses = [float(f(*args, jnp.float32(w))["scalars"][0]) for w in (0.1, 0.9, 2.0)]
    assert objective.trace_count == 1
    assert losses[0] < losses[1] < losses[2]  # kl > 0 with a growing weight


@two_devices
def test_axis_name_replicated_inputs_are_not_multiplied_by_the_shard_count():
    """Values that do not vary across the shards (replicated x and batch) stay as they are."""
    mesh = _mesh()
    x, batch = _token_batch()
    base, regs = _token_terms()
    ref = jr.compose(base, regs, track_grad_norms=True)(x, batch, weights={"kl": 0.5})
    objective = jr.compose(base, regs, track_grad_norms=True, axis_name="data")
    f = _shard_map_call(objective, mesh, P(), P())
    got = f(*jax.device_put((x, batch), NamedSharding(mesh, P())), jnp.float32(0.5))
    _assert_equal_to(ref, got)


@two_devices
def test_axis_name_outside_shard_map_or_over_another_axis_is_refused():
    x, batch = _token_batch()
    base, regs = _token_terms()
    objective = jr.compose(base, regs, axis_name="data")
    with pytest.raises(jr.TermError, match=r"axis_name=\('data',\).*outside any shard_map"):
        objective(x, batch)
    mesh = _mesh()
    other = jr.compose(base, regs, axis_name="model")
    f = jax.jit(
        jax.shard_map(
            lambda x, b: other(x, b).scalars,
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P(),
        )
    )
    with pytest.raises(jr.TermError, match=r"inside shard_map over \['data'\].*\['model'\]"):
        f(*jax.device_put((x, batch), NamedSharding(mesh, P("data"))))


@two_devices
def test_axis_name_with_check_vma_false_is_refused():
    x, batch = _token_batch()
    base, regs = _token_terms()
    objective = jr.compose(base, regs, axis_name="data")
    mesh = _mesh()
    f = jax.jit(
        jax.shard_map(
            lambda x, b: objective(x, b).scalars,
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P(),
            check_vma=False,
        )
    )
    with pytest.raises(jr.TermError, match="check_vma=True"):
        f(*jax.device_put((x, batch), NamedSharding(mesh, P("data"))))


def test_axis_name_is_validated_at_compose():
    base, regs = _token_terms()
    for bad in ("", 3, ("data", "data"), ("data", 1), ()):
        with pytest.raises(jr.TermError, match="axis_name must be a mesh axis name"):
            jr.compose(base, regs, axis_name=bad)


@two_devices
@pytest.mark.parametrize("strategy", ["per_term", "sequential"])
def test_axis_name_pytree_with_a_sharded_and_a_replicated_leaf(strategy):
    """Norms and the Gramian psum the sharded leaf's part and count the replicated once."""
    mesh = _mesh()
    x, batch = _token_batch()
    tree = {"lp": x, "t": jnp.asarray([1.5, -0.5], jnp.float32)}

    def scaled(v, b):
        # A per-shard sum (psum-ed by compose) times a replicated leaf.
        return jnp.sum(v["lp"] * b.mask) * v["t"][0]

    def reduced(v, b):
        # Reduced by the term itself (a replicated value, taken as it is), plus a
        # replicated penalty: adding it to an unreduced per-shard sum would count it once
        # per shard.
        total = jnp.sum(v["lp"] * b.mask)
        if jax.sharding.get_abstract_mesh().manual_axes:  # inside shard_map
            total = jax.lax.psum(total, "data")
        return total * v["t"][0] + jnp.sum(v["t"] ** 2)

    def kl(v, b):
        return jr.regularizers.kl("ref_logprobs")(v["lp"] * v["t"][1], b)

    terms = (
        jr.Term("scaled", scaled),
        [jr.Term("kl", kl, weight=0.5), jr.Term("reduced", reduced, weight=0.1)],
    )
    kw = dict(track_grad_norms=True, grad_conflicts=True, grad_strategy=strategy)
    ref = jr.compose(*terms, **kw)(tree, batch, weights={"kl": 0.3})
    objective = jr.compose(*terms, axis_name="data", **kw)
    spec = {"lp": P("data"), "t": P()}
    f = _shard_map_call(objective, mesh, spec, P("data"), cosines=True)
    got = f(
        {
            "lp": jax.device_put(x, NamedSharding(mesh, P("data"))),
            "t": jax.device_put(tree["t"], NamedSharding(mesh, P())),
        },
        jax.device_put(batch, NamedSharding(mesh, P("data"))),
        jnp.float32(0.3),
    )
    _assert_equal_to(ref, got)
    # d scaled / d t = [sum(lp * m), 0]; d / d lp = t0 m: the norm, in NumPy.
    xn, m = np.asarray(x, np.float64), np.asarray(batch.mask, np.float64)
    g_t = np.array([(xn * m).sum(), 0.0])
    want = np.sqrt((1.5 * m).ravel() @ (1.5 * m).ravel() + g_t @ g_t)
    np.testing.assert_allclose(float(got["metrics"]["base_loss"]["grad_norm"]), want, rtol=1e-5)
    g_r = g_t + np.array([2 * 1.5, 2 * -0.5])  # plus d sum(t^2) / d t
    want = np.sqrt((1.5 * m).ravel() @ (1.5 * m).ravel() + g_r @ g_r)
    np.testing.assert_allclose(
        float(got["metrics"]["regularizers"]["reduced"]["grad_norm"]), want, rtol=1e-5
    )


@two_devices
def test_axis_name_logit_space_equals_the_whole_batch():
    mesh = _mesh()
    _, batch = _token_batch()
    logprobs = jax.nn.log_softmax(jnp.asarray(RNG.normal(size=(4, 6, 5)), jnp.float32))
    terms = (
        jr.Term("ent", jr.regularizers.entropy),
        [jr.Term("sq", lambda v, b: jnp.sum(v[..., 0] * b.mask), weight=0.2)],
    )
    kw = dict(track_grad_norms=True, grad_conflicts=True, grad_space="logits")
    ref = jr.compose(*terms, **kw)(logprobs, batch)
    objective = jr.compose(*terms, axis_name="data", **kw)

    def local(v, b):
        out = objective(v, b)
        return {"scalars": out.scalars, "grad": out.grad, "cos": out.grad_cosines}

    f = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs={"scalars": P(), "grad": P("data"), "cos": P()},
        )
    )
    got = f(*jax.device_put((logprobs, batch), NamedSharding(mesh, P("data"))))
    _assert_equal_to(ref, got)


def test_axis_name_value_varying_over_another_axis_is_refused():
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.make_mesh((1, 2), ("data", "model"))
    x, _ = _token_batch()
    objective = jr.compose(jr.Term("sq", lambda v, b: jnp.sum(v**2)), axis_name="data")
    f = jax.jit(
        jax.shard_map(
            lambda v: objective(v).scalars,
            mesh=mesh,
            in_specs=P("model"),
            out_specs=P(),
        )
    )
    with pytest.raises(jr.TermError, match=r"'sq': loss varies across .*\['model'\].*axis_name"):
        f(jax.device_put(x, NamedSharding(mesh, P("model"))))


def test_axis_name_with_host_terms_is_refused():
    host = jr.HostTerm("judge", lambda x, b: 0.0)
    with pytest.raises(jr.TermError, match="host terms \\['judge'\\]: with axis_name"):
        jr.compose(jr.Term("sq", lambda v, b: jnp.sum(v**2)), [host], axis_name="data")


@two_devices
@pytest.mark.parametrize("strategy", ["vmap", "per_term", "sequential"])
def test_jit_on_an_explicit_axis_mesh_with_cosines_equals_the_unsharded_result(strategy):
    """jax.make_mesh's axes are explicit: a vmap group's Gramian over a sharded input
    has no inferable dot sharding (it raised a ShardingTypeError)."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, batch = _token_batch()
    base, regs = _token_terms()
    objective = jr.compose(base, regs, grad_conflicts=True, grad_strategy=strategy)
    ref = objective(x, batch)
    got = objective(*jax.device_put((x, batch), NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(
        np.asarray(got.grad_cosines), np.asarray(ref.grad_cosines), rtol=2e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(got.scalars), np.asarray(ref.scalars), rtol=2e-5)
