"""The model stage (``compose(..., forward=apply_fn)``) against hand-written JAX steps.

Three models: MLPs of about 1M and 10M parameters (a classifier on random features)
and a small decoder-only transformer (next-token prediction). Five terms: cross
entropy and an entropy bonus on the model's predictions, and L2, L1 and L2-SP
(distance to the initial parameters) on the parameters.

Columns, each the median of interleaved runs (``benchmarks.common.time_interleaved``):

* ``hand plain``: the minimum a skilled user writes for the loss and its gradient: one
  ``jax.value_and_grad`` of the weighted sum, the model run once, every term's value
  returned as aux (jaxreg reports them too).
* ``jaxreg plain``: ``compose(ce, [ent, l2, l1, sp], forward=apply)``. Target <= 1.05x.
* ``hand norms``: the minimum for per-term gradient norms: one shared forward
  (``jax.vjp``), one backward through the model per output term (its cotangent with
  respect to the predictions pulled back), the penalties differentiated on their own,
  each norm, the weighted sum and its norm.
* ``jaxreg norms``: the same objective with ``track_grad_norms=True``. Target <= 1.10x.
* ``no stage``: each output term runs the model itself (``compose`` without
  ``forward``, as before the model stage), plain and with norms, for comparison.

Run: ``python -m benchmarks.model_stage_bench`` (``--quick`` for fewer repetitions).
"""

from __future__ import annotations

import argparse
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import table, time_interleaved

W = {"ce": 1.0, "ent": 0.01, "l2": 1e-4, "l1": 1e-6, "sp": 1e-3}


# ------------------------------------------------------------------------ models


def mlp_init(key, sizes):
    params = []
    for a, b in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (a, b)) / math.sqrt(a), "b": jnp.zeros(b)})
    return params


def mlp_apply(params, batch):
    h = batch["x"]
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def mlp_batch(key, n, d, k):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, d)), "y": jax.random.randint(ky, (n,), 0, k)}


def transformer_init(key, vocab=256, d=128, heads=4, layers=2, seq=64):
    keys = iter(jax.random.split(key, 4 + 6 * layers))
    normal = lambda shape, scale: jax.random.normal(next(keys), shape) * scale
    params = {
        "embed": normal((vocab, d), 0.02),
        "pos": normal((seq, d), 0.02),
        "layers": [],
        "ln_f": {"g": jnp.ones(d), "b": jnp.zeros(d)},
    }
    for _ in range(layers):
        params["layers"].append(
            {
                "ln1": {"g": jnp.ones(d), "b": jnp.zeros(d)},
                "qkv": normal((d, 3 * d), d**-0.5),
                "proj": normal((d, d), d**-0.5),
                "ln2": {"g": jnp.ones(d), "b": jnp.zeros(d)},
                "up": normal((d, 4 * d), d**-0.5),
                "down": normal((4 * d, d), (4 * d) ** -0.5),
            }
        )
    return params, heads


def layer_norm(h, p):
    mean = jnp.mean(h, -1, keepdims=True)
    var = jnp.var(h, -1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def transformer_apply(heads):
    def apply(params, batch):
        tokens = batch["tokens"]
        b, t = tokens.shape
        h = params["embed"][tokens] + params["pos"][:t]
        mask = jnp.tril(jnp.ones((t, t), bool))
        for layer in params["layers"]:
            q, k, v = jnp.split(layer_norm(h, layer["ln1"]) @ layer["qkv"], 3, axis=-1)
            split = lambda a: a.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
            q, k, v = split(q), split(k), split(v)
            att = jnp.where(mask, q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]), -1e9)
            out = (jax.nn.softmax(att, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
            h = h + out @ layer["proj"]
            h = h + jax.nn.gelu(layer_norm(h, layer["ln2"]) @ layer["up"]) @ layer["down"]
        return layer_norm(h, params["ln_f"]) @ params["embed"].T  # tied output [B, T, V]

    return apply


def lm_batch(key, n, t, vocab):
    tokens = jax.random.randint(key, (n, t + 1), 0, vocab)
    return {"tokens": tokens[:, :-1], "y": tokens[:, 1:]}


# ------------------------------------------------------------------------- terms


def ce(logits, batch):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][..., None], axis=-1))


def neg_entropy(logits, batch):
    logp = jax.nn.log_softmax(logits)
    return jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def l2(params, batch):
    return sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def l1(params, batch):
    return sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))


def make_sp(anchor):
    def sp(params, batch):
        pairs = zip(jax.tree.leaves(params), jax.tree.leaves(anchor), strict=True)
        return sum(jnp.sum(jnp.square(p - a)) for p, a in pairs)

    return sp


# ----------------------------------------------------------------------- variants


def variants(apply, params, batch):
    sp = make_sp(jax.tree.map(jnp.copy, params))
    outputs = {"ce": ce, "ent": neg_entropy}
    penalties = {"l2": l2, "l1": l1, "sp": sp}

    def hand_total(p):
        y = apply(p, batch)
        values = {k: f(y, batch) for k, f in outputs.items()}
        values.update({k: f(p, batch) for k, f in penalties.items()})
        return sum(W[k] * v for k, v in values.items()), values

    hand_plain = jax.jit(lambda p: jax.value_and_grad(hand_total, has_aux=True)(p))

    @jax.jit
    def hand_norms(p):
        y, pull = jax.vjp(lambda p: apply(p, batch), p)
        values, grads = {}, {}
        for k, f in outputs.items():
            values[k], gy = jax.value_and_grad(f)(y, batch)
            grads[k] = pull(gy)[0]
        for k, f in penalties.items():
            values[k], grads[k] = jax.value_and_grad(f)(p, batch)
        sq = lambda g: sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g))
        norms = {k: jnp.sqrt(sq(g)) for k, g in grads.items()}
        total = jax.tree.map(
            lambda *gs: sum(W[k] * g for k, g in zip(W, gs, strict=True)), *[grads[k] for k in W]
        )
        loss = sum(W[k] * values[k] for k in W)
        return loss, total, values, norms, jnp.sqrt(sq(total))

    terms = [jr.Term("ent", neg_entropy, W["ent"])] + [
        jr.Term(k, f, W[k], on="params") for k, f in penalties.items()
    ]
    staged = jr.compose(jr.Term("ce", ce), terms, forward=apply)
    staged_norms = jr.compose(jr.Term("ce", ce), terms, forward=apply, track_grad_norms=True)
    # Without a stage each output term runs the model on the parameters itself.
    inline = lambda f: lambda p, b: f(apply(p, b), b)
    old_terms = [jr.Term("ent", inline(neg_entropy), W["ent"])] + [
        jr.Term(k, f, W[k]) for k, f in penalties.items()
    ]
    old = jr.compose(jr.Term("ce", inline(ce)), old_terms)
    old_norms = jr.compose(jr.Term("ce", inline(ce)), old_terms, track_grad_norms=True)
    return {
        "hand plain": lambda: hand_plain(params),
        "jaxreg plain": lambda: staged(params, batch),
        "no stage plain": lambda: old(params, batch),
        "hand norms": lambda: hand_norms(params),
        "jaxreg norms": lambda: staged_norms(params, batch),
        "no stage norms": lambda: old_norms(params, batch),
    }, (hand_norms, staged_norms)


def check(hand_norms, staged_norms, params, batch):
    """The two agree (the benchmark compares equal work)."""
    _, total, _, norms, _ = hand_norms(params)
    out = staged_norms(params, batch)
    for k, v in norms.items():
        np.testing.assert_allclose(float(out.terms[k].grad_norm), float(v), rtol=2e-3)
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(out.grad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    repeats = 5 if args.quick else 11
    key = jax.random.PRNGKey(0)
    vocab, seq = 256, 64
    tparams, heads = transformer_init(key, vocab=vocab, seq=seq)
    workloads = [
        ("MLP 1M", mlp_apply, mlp_init(key, [256, 1024, 768, 10]), mlp_batch(key, 256, 256, 10)),
        (
            "MLP 10M",
            mlp_apply,
            mlp_init(key, [1024, 2048, 2048, 2048, 10]),
            mlp_batch(key, 128, 1024, 10),
        ),
        ("transformer", transformer_apply(heads), tparams, lm_batch(key, 8, seq, vocab)),
    ]
    rows = []
    for name, apply, params, batch in workloads:
        n_params = sum(p.size for p in jax.tree.leaves(params))
        fns, (hand_norms, staged_norms) = variants(apply, params, batch)
        check(hand_norms, staged_norms, params, batch)
        t = time_interleaved(fns, repeats=repeats, min_time=0.2)
        rows.append(
            [
                f"{name} ({n_params / 1e6:.2f}M)",
                f"{t['hand plain'] * 1e3:.1f} ms",
                f"{t['jaxreg plain'] / t['hand plain']:.2f}x",
                f"{t['no stage plain'] / t['hand plain']:.2f}x",
                f"{t['hand norms'] * 1e3:.1f} ms",
                f"{t['jaxreg norms'] / t['hand norms']:.2f}x",
                f"{t['no stage norms'] / t['hand norms']:.2f}x",
            ]
        )
        print(rows[-1], flush=True)
    print()
    print(
        table(
            rows,
            [
                "model",
                "hand plain",
                "jaxreg plain",
                "no stage plain",
                "hand norms",
                "jaxreg norms",
                "no stage norms",
            ],
        )
    )
    print(f"\ndevice: {jax.devices()[0].device_kind}; targets: plain <= 1.05x, norms <= 1.10x")


if __name__ == "__main__":
    main()
