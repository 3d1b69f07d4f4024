"""compose vs the floor, the naive JAX way and the PyTorch way; MLP grouping; memory.

Run: ``make bench`` or ``python -m benchmarks.compose_bench [--quick]``. Prints ratio
tables measured side by side in one run (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import table, time_interleaved
from jaxreg._src.core import program

R = jr.regularizers
SIZES = [(8, 512), (32, 2048), (64, 8192)]
FULL_TERMS = [
    jr.Term("nll", jr.losses.cross_entropy),
    jr.Term("l1", R.l1, 0.01),
    jr.Term("entropy", R.entropy, 0.01),
    jr.Term("kl", R.kl, 0.1),
    jr.Term("smooth", R.smoothness, 0.01),
]


def _loss_only(fn):
    return lambda x, batch: fn(x, batch)[0]


# The same terms returning their loss only: what a hand-written floor computes, so that
# the ratios measure compose's own cost. The built-ins' metrics are timed separately.
TERMS = [jr.Term(t.name, _loss_only(t.fn), t.weight) for t in FULL_TERMS]
WEIGHTS = [t.weight for t in TERMS]


def logprob_workload(b: int, t: int, seed: int = 0):
    """Random logprobs ``[B, T]`` with ragged lengths, weights and reference logprobs."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    x = jnp.asarray(-rng.random((b, t), np.float32) * 3)
    ref = jnp.asarray(-rng.random((b, t), np.float32) * 3)
    batch = jr.Batch(jnp.asarray(mask), {"weights": jnp.asarray(mask), "ref_logprobs": ref})
    return x, batch


def floor_fn(x, batch):
    """Hand-written: the weighted sum of the terms (its value_and_grad is the floor)."""
    return sum(w * t.fn(x, batch) for w, t in zip(WEIGHTS, TERMS, strict=True))


def naive_step(fns, x, batch):
    """N separate jitted value_and_grad calls, combined and normed eagerly."""
    outs = [f(x, batch) for f in fns]
    grad = sum(w * g for w, (_, g) in zip(WEIGHTS, outs, strict=True))
    norms = [jnp.linalg.norm(g) for (_, g) in outs]
    return grad, norms, jnp.linalg.norm(grad)


def torch_step(torch, x, mask, ref):
    """The Python SDK's way: per-term autograd.grad(retain_graph=True), then one backward."""
    x = x.detach().requires_grad_(True)
    n = mask.sum().clamp(min=1)
    xc = x * mask
    nll = -(mask * xc).sum()
    l1 = (xc.abs() * mask).sum()
    ent = -((-xc) * mask).sum() / n
    lr = torch.clamp(ref * mask - xc, -20.0, 20.0)
    kl_tok = (torch.exp(lr) - lr - 1) * mask
    kl = kl_tok.sum() / n
    d = (xc[:, 1:] - xc[:, :-1]) ** 2
    m2 = mask[:, 1:] * mask[:, :-1]
    smooth = (d * m2).sum() / m2.sum().clamp(min=1)
    losses = [nll, l1, ent, kl, smooth]
    norms = []
    for loss in losses:
        (g,) = torch.autograd.grad(loss, x, retain_graph=True)
        norms.append(g.norm())
    total = sum(w * v for w, v in zip(WEIGHTS, losses, strict=True))
    total.backward()
    return x.grad, norms, x.grad.norm(), [v.detach() for v in losses]


def bench_logprobs(repeats: int) -> list[list[str]]:
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover - torch is in the bench extra
        torch = None
        print("torch not installed (pip install -e '.[bench]'): skipping the PyTorch column")
    floor = jax.jit(jax.value_and_grad(floor_fn))
    plain = jr.compose(TERMS[0], TERMS[1:])
    norms = jr.compose(TERMS[0], TERMS[1:], track_grad_norms=True)
    vmapped = jr.compose(TERMS[0], TERMS[1:], track_grad_norms=True, grad_strategy="vmap")
    full = jr.compose(FULL_TERMS[0], FULL_TERMS[1:], track_grad_norms=True)
    naive_fns = [jax.jit(jax.value_and_grad(t.fn)) for t in TERMS]

    def candidates(x, batch):
        fns = {
            "floor": lambda: floor(x, batch),
            "full": lambda: full(x, batch),
            "plain": lambda: plain(x, batch),
            "norms": lambda: norms(x, batch),
            "vmap": lambda: vmapped(x, batch),
            "naive": lambda: naive_step(naive_fns, x, batch),
        }
        if torch is not None:
            arrays = (x, batch.mask, batch["ref_logprobs"])
            tx, tm, tr = (torch.from_numpy(np.array(a)) for a in arrays)
            fns["torch"] = lambda: torch_step(torch, tx, tm, tr)
        return fns

    rows = []
    for b, t in SIZES:
        fns = candidates(*logprob_workload(b, t))
        times = time_interleaved(fns, repeats=repeats)
        f = times["floor"]
        rows.append(
            [
                f"[{b},{t}]",
                f"{f * 1e3:.3f}",
                f"{times['plain'] / f:.2f}",
                f"**{times['norms'] / f:.2f}**",
                f"{times['vmap'] / f:.2f}",
                f"{times['full'] / f:.2f}",
                f"{times['naive'] / times['norms']:.2f}",
                f"{times['torch'] / times['norms']:.1f}" if "torch" in times else "n/a",
            ]
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------- local MLP


def mlp_workload(
    seed: int = 0, n: int = 256, d_in: int = 128, hidden: int = 512, classes: int = 16
):
    keys = jax.random.split(jax.random.key(seed), 4)
    dims = [d_in, hidden, hidden, classes]
    params = {
        f"w{i}": jax.random.normal(keys[i], (a, b), jnp.float32) / np.sqrt(a)
        for i, (a, b) in enumerate(itertools.pairwise(dims))
    }
    params.update({f"b{i}": jnp.zeros((b,), jnp.float32) for i, b in enumerate(dims[1:])})
    data = {
        "x": jax.random.normal(keys[3], (n, d_in), jnp.float32),
        "y": jax.random.randint(keys[3], (n,), 0, classes),
    }
    return params, data


def mlp(params, inputs):
    h = inputs
    for i in range(3):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < 2:
            h = jnp.tanh(h)
    return h


def ce(params, data):
    logp = jax.nn.log_softmax(mlp(params, data["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, data["y"][:, None], axis=1))


def out_entropy(params, data):
    logp = jax.nn.log_softmax(mlp(params, data["x"]))
    return jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=1))  # negative entropy


MLP_TERMS = [
    jr.Term("ce", ce),
    jr.Term("entropy", out_entropy, 0.01),
    jr.Term("l2", R.l2, 1e-4),
    jr.Term("l1", R.l1, 1e-5),
]


def mlp_floor(params, data):
    """Hand-written: one forward, both output losses from it, plus the penalties."""
    logp = jax.nn.log_softmax(mlp(params, data["x"]))
    c = -jnp.mean(jnp.take_along_axis(logp, data["y"][:, None], axis=1))
    e = jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=1))
    leaves = jax.tree.leaves(params)
    l2 = sum(jnp.sum(p**2) for p in leaves)
    l1 = sum(jnp.sum(jnp.abs(p)) for p in leaves)
    return c + 0.01 * e + 1e-4 * l2 + 1e-5 * l1


def mlp_hand_written(params, data):
    """Per-term gradient norms by hand: one forward, one backward per output term.

    The least work any implementation reporting each term's gradient norm does: both
    output terms share one forward (one ``jax.vjp``) and pull back one cotangent each;
    the penalties never touch the model.
    """

    def outputs(p):
        logp = jax.nn.log_softmax(mlp(p, data["x"]))
        c = -jnp.mean(jnp.take_along_axis(logp, data["y"][:, None], axis=1))
        e = jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=1))
        return jnp.stack([c, e])

    def sq(tree):
        return sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(tree))

    values, pullback = jax.vjp(outputs, params)
    grads = [pullback(jnp.eye(2)[i])[0] for i in range(2)]
    for t in MLP_TERMS[2:]:
        value, grad = jax.value_and_grad(lambda p, t=t: t.evaluate(p, None)[0])(params)
        values = jnp.append(values, value)
        grads.append(grad)
    weights = [t.weight for t in MLP_TERMS]
    total = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g, strict=True)), *grads)
    return values, total, jnp.stack([sq(g) for g in grads]), sq(total)


def bench_mlp(repeats: int) -> list[list[str]]:
    params, data = mlp_workload()
    n_params = sum(p.size for p in jax.tree.leaves(params))
    floor = jax.jit(jax.value_and_grad(mlp_floor))
    by_hand = jax.jit(mlp_hand_written)
    strategies = {
        "per_term": "per_term",
        "vmap (all 4)": "vmap",
        "group (ce, entropy)": [("ce", "entropy")],
    }
    objs = {
        k: jr.compose(MLP_TERMS[0], MLP_TERMS[1:], track_grad_norms=True, grad_strategy=s)
        for k, s in strategies.items()
    }
    hand = "hand-written (1 forward, 2 backwards)"
    fns = {"floor": lambda: floor(params, data), hand: lambda: by_hand(params, data)}
    fns.update({k: (lambda o=o: o(params, data)) for k, o in objs.items()})
    times = time_interleaved(fns, repeats=repeats)
    print(f"MLP: {n_params} parameters", file=sys.stderr)
    return [
        [k, f"{times[k] * 1e3:.3f}", f"{times[k] / times['floor']:.2f}"]
        for k in ["floor", hand, *strategies]
    ]


# ---------------------------------------------------------------------- memory


def peak_bytes(fn, *args) -> int:
    """Arguments + outputs + temporaries of the compiled program (XLA memory analysis)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def bench_memory() -> list[list[str]]:
    x, batch = logprob_workload(64, 8192)
    norms = jr.compose(TERMS[0], TERMS[1:], track_grad_norms=True)
    vmapped = jr.compose(TERMS[0], TERMS[1:], track_grad_norms=True, grad_strategy="vmap")
    w = norms._default_w
    floor = peak_bytes(jax.value_and_grad(floor_fn), x, batch)
    rows = [["floor", f"{floor / 2**20:.1f}", "1.00"]]
    for name, obj in [("compose + norms (per_term)", norms), ("compose + norms (vmap)", vmapped)]:
        peak = peak_bytes(functools.partial(program.run, obj.plan), x, batch, w, None)
        rows.append([name, f"{peak / 2**20:.1f}", f"{peak / floor:.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 15
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s)\n"
    )
    print("## Logprob workload: NLL + L1, entropy, KL, smoothness (5 terms)\n")
    print(
        "floor = hand-written jitted value_and_grad of the weighted sum; ratios are "
        "time / floor except the last two columns (time of the other way / jaxreg's).\n"
    )
    print(
        table(
            bench_logprobs(repeats),
            [
                "[B,T]",
                "floor ms",
                "compose",
                "compose+norms",
                "compose+norms (vmap)",
                "compose+norms, built-in metrics",
                "naive JAX / compose+norms",
                "torch / compose+norms",
            ],
        )
    )
    print("\n## Local MLP: 2 output terms + 2 parameter penalties, with grad norms\n")
    print(table(bench_mlp(repeats), ["strategy", "ms", "ratio to floor"]))
    print("\n## Peak memory at [64,8192], 5 terms (XLA memory analysis)\n")
    print(table(bench_memory(), ["program", "MiB", "ratio to floor"]))


if __name__ == "__main__":
    main()
