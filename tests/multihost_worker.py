"""One process of tests/test_multihost.py: jaxreg on global arrays, results as JSON.

``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT``

With ``NUM_PROCESSES > 1`` the process joins a ``jax.distributed`` job on a loopback
coordinator (gloo CPU collectives); with 1 it is the single-process reference on the whole
batch. Every process builds the same global batch, feeds only its own rows
(``jax.make_array_from_process_local_data``), runs the same steps and writes what it read
(gathered to whole NumPy arrays) to ``OUT.<process id>.json``.
"""

from __future__ import annotations

import json
import os
import sys

PID, NPROC, PORT, NDEV, OUT = (*map(int, sys.argv[1:5]), sys.argv[5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={NDEV}"

import jax  # noqa: E402

if NPROC > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{PORT}", NPROC, PID, initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxreg as jr  # noqa: E402

B, T, D = 8, 5, 3
MESH = Mesh(np.array(jax.devices()), ("data",))
DATA, REPLICATED = NamedSharding(MESH, P("data")), NamedSharding(MESH, P())
ROWS = slice(PID * B // NPROC, (PID + 1) * B // NPROC)  # this process's rows
results: dict = {"process_count": jax.process_count(), "devices": len(jax.devices())}


def shard(a: np.ndarray) -> jax.Array:
    """The global batch array ``a`` as a data-sharded global array (own rows only)."""
    return jax.make_array_from_process_local_data(DATA, np.asarray(a)[ROWS], a.shape)


def host(a) -> list:
    """Any array (global or not) as a nested list, the same on every process."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        a = multihost_utils.process_allgather(a, tiled=True)
    return np.asarray(a, np.float64).tolist()


rng = np.random.default_rng(0)
lengths = np.array([5, 3, 1, 4, 2, 5, 3, 4])  # unequal token counts per shard
mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
x_np = (-np.log1p(np.exp(rng.normal(size=(B, T))))).astype(np.float32)
ref_np = (-np.log1p(np.exp(rng.normal(size=(B, T))))).astype(np.float32)
adv_np = rng.normal(size=(B, T)).astype(np.float32)
feats_np = rng.normal(size=(B, T, D)).astype(np.float32)


def make_batch(**inputs) -> jr.Batch:
    return jr.Batch(shard(mask), {k: shard(v) for k, v in inputs.items()})


x = shard(x_np)
batch = make_batch(ref_logprobs=ref_np, advantages=adv_np)
traces = {"compose": 0, "model": 0, "optax": 0}


def pg(x, b):
    traces["compose"] += 1
    return -jnp.sum(b.mask * b["advantages"] * x)


def sq(x, b):  # a token mean: global token counts matter
    return jnp.sum(b.mask * x**2) / jnp.sum(b.mask), {"tokens": jnp.sum(b.mask)}


terms = [
    jr.Term("kl", jr.regularizers.kl, weight=0.1),
    jr.Term("sq", sq, weight=0.05),
]

# 1. compose under jit on global arrays: values, norms, term_grads, cosines
objective = jr.compose(
    jr.Term("pg", pg), terms, track_grad_norms=True, term_grads=True, grad_conflicts=True
)
step = jax.jit(lambda x, b: objective(x, b))
out = step(x, batch)
results["compose_traces_first"] = traces["compose"]
results["compose"] = out.to_dict()
results["compose_flat"] = out.flat()
results["compose_grad"] = host(out.grad)
results["compose_term_grads"] = host(out.term_grads)
results["compose_repr"] = str(out)
out2 = step(shard(x_np * 0.5), batch)  # new values, same shapes: no retrace
results["compose_2"] = out2.to_dict()
results["compose_traces"] = traces["compose"]
results["untraced"] = objective(x, batch).to_dict()  # the objective's own jit

# 2. check_finite: on device, a replicated flag; the faulty term named
jr.check_finite(out)
checked = jr.compose(jr.Term("pg", pg), terms, track_grad_norms=True, check_finite=True)
results["check_finite_ok"] = checked(x, batch).to_dict()["loss_total"]
bad_ref = ref_np.copy()
bad_ref[B - 1, 0] = np.nan  # read by "kl" only, on the last process's rows
for key, obj in [
    ("nan_norms", checked),
    ("nan_plain", jr.compose(jr.Term("pg", pg), terms, check_finite=True)),
]:
    try:
        obj(x, make_batch(ref_logprobs=bad_ref, advantages=adv_np))
        results[key] = None
    except jr.NonFiniteError as e:
        results[key] = {"terms": list(e.terms), "where": e.where, "message": str(e)}
center = x_np.copy()
center[B - 1, 0] += 1.0  # sqrt(|x - c|): finite value, infinite gradient where x == c
root = jr.Term("root", lambda x, b: jnp.sum(b.mask * jnp.sqrt(jnp.abs(x - b["center"]))))
try:
    jr.check_finite(jr.compose(root)(x, make_batch(center=center)))
    results["inf_grad"] = None
except jr.NonFiniteError as e:
    results["inf_grad"] = str(e)


# 3. host terms called outside jit: x and batch gathered whole on every process
def host_fn(x, b, data):
    m = np.asarray(b.mask)
    return float(np.sum(m * x**3)), {"rows": float(x.shape[0])}, 3 * m * x**2


with_host = jr.compose(
    jr.Term("pg", pg),
    [*terms, jr.HostTerm("cube", host_fn, weight=0.2, gradient=True)],
    track_grad_norms=True,
)
hout = with_host(x, batch, data=list(range(B)))
results["host"] = hout.to_dict()
results["host_grad"] = host(hout.grad)

# 4. Batch helpers
results["lengths"] = batch.lengths.tolist()
results["unpad"] = [a.tolist() for a in batch.unpad(x)]

# 5. the packed output refuses a concatenated layout (shard_map, out_specs=P("data"));
# without axis_name compose refuses shard_map itself, at trace time
plain = jr.compose(jr.Term("pg", pg), terms, axis_name="data")
mapped = jax.shard_map(
    lambda x, b: plain(x, b), mesh=MESH, in_specs=(P("data"), P("data")), out_specs=P("data")
)
try:
    mapped(x, batch).to_dict()
    results["shard_map_refused"] = None
except jr.JaxregError as e:
    results["shard_map_refused"] = str(e)

# 6. model stage, replicated parameters, an on="params" term; optax with an aggregator
params = jax.device_put(
    {"w": rng.normal(size=(D,)).astype(np.float32) * 0.5, "b": np.float32(0.1)}, REPLICATED
)
feats = shard(feats_np)


def forward(p, b):
    traces["model"] += 1
    return jax.nn.log_sigmoid(b["feats"] @ p["w"] + p["b"])


model_batch = make_batch(ref_logprobs=ref_np, advantages=adv_np, feats=feats_np)
model_objective = jr.compose(
    jr.Term("pg", lambda y, b: -jnp.sum(b.mask * b["advantages"] * y)),
    [
        jr.Term("kl", jr.regularizers.kl, weight=0.1),
        jr.Term("l2", jr.regularizers.l2, weight=0.01, on="params"),
    ],
    forward=forward,
    track_grad_norms=True,
    term_grads=True,
    grad_conflicts=True,
)
mout = jax.jit(lambda p, b: model_objective(p, b))(params, model_batch)
results["model"] = mout.to_dict()
results["model_grad"] = {k: host(v) for k, v in mout.grad.items()}
results["model_term_grads"] = {k: host(v) for k, v in mout.term_grads.items()}
results["model_grad_replicated"] = all(
    leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(mout.grad)
)

opt = optax.chain(
    jr.aggregators.upgrad(),
    jr.transforms.regularize([jr.Term("l2", jr.regularizers.l2, weight=0.02)]),
    optax.sgd(0.1),
)


@jax.jit
def train_step(p, state, b):
    traces["optax"] += 1
    o = jr.compose(
        jr.Term("pg", lambda y, b: -jnp.sum(b.mask * b["advantages"] * y)),
        [jr.Term("kl", jr.regularizers.kl, weight=0.1)],
        forward=forward,
        term_grads=True,
    )(p, b)
    updates, state = opt.update(o.term_grads, state, p)
    return optax.apply_updates(p, updates), state, o.loss_total


state = opt.init(params)
losses = []
for _ in range(3):
    params, state, loss = train_step(params, state, model_batch)
    losses.append(float(loss))
results["optax_losses"] = losses
results["optax_params"] = {k: host(v) for k, v in params.items()}
results["optax_traces"] = traces["optax"]
results["optax_compiles"] = train_step._cache_size()
results["optax_metrics"] = jr.transforms.metrics(state)

with open(f"{OUT}.{PID}.json", "w") as f:
    json.dump(results, f, default=float)
if NPROC > 1:
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()
