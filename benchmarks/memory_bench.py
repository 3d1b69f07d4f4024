"""Per-term diagnostics in bounded memory: ``grad_strategy="sequential"`` against the
materialised ``"per_term"``, on model-stage MLPs of 1M to 100M parameters, 2 to 16 terms.

Memory: XLA's ``temp_size_in_bytes`` of the compiled program
(``jax.jit(objective).lower(params, batch).compile().memory_analysis()``), reported as
the extra over the plain step (no diagnostics) in units of one gradient (the
parameters' size). Targets: with norms, sequential at most plain + 2 gradients; with
the Gramian (``grad_conflicts``), plain + 3.

Time: the median of interleaved runs (``benchmarks.common.time_interleaved``), sequential
over per_term. Targets: norms <= 1.2x, Gramian <= 2.2x.

The terms cycle through cross entropy, an entropy bonus and a logit penalty on the
model's outputs, and an L2 penalty on the parameters (``on="params"``).

Run: ``python -m benchmarks.memory_bench`` (``--quick``: the 100M model for memory only).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import table, time_interleaved

BATCH, D_IN, K = 32, 256, 16


def mlp(width: int, rng: np.random.Generator):
    shapes = {"w1": (D_IN, width), "w2": (width, width), "w3": (width, K)}
    params = {
        k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for k, s in shapes.items()
    }
    batch = {
        "x": jnp.asarray(rng.normal(size=(BATCH, D_IN)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, K, size=BATCH), jnp.int32),
    }
    return params, batch


def apply(p, b):
    h = jnp.tanh(b["x"] @ p["w1"])
    h = jnp.tanh(h @ p["w2"])
    return h @ p["w3"]


def terms(n: int):
    """``n`` distinct terms (no two alike, so XLA cannot merge their backward passes)."""

    def ce(k):
        def fn(y, b):
            lp = jax.nn.log_softmax(y)
            return -jnp.mean(jnp.take_along_axis(lp, ((b["y"] + k) % K)[:, None], axis=1))

        return fn

    def ent(k):
        def fn(y, b):
            lp = jax.nn.log_softmax(y / (1.0 + k))
            return jnp.mean(jnp.sum(jnp.exp(lp) * lp, axis=-1))

        return fn

    def logit(k):
        def fn(y, b):
            return jnp.mean((y - 0.1 * k) ** 2)

        return fn

    def l2(k):
        def fn(p, b):
            return sum(jnp.sum((v - 0.01 * k) ** 2) for v in jax.tree.leaves(p))

        return fn

    cycle = [(ce, "outputs"), (ent, "outputs"), (logit, "outputs"), (l2, "params")]
    out = []
    for k in range(n):
        make, on = cycle[k % 4]
        out.append(jr.Term(f"t{k}", make(k), weight=1.0 / (k + 1), on=on))
    return out


def objective(n: int, **kw):
    t = terms(n)
    return jr.compose(t[0], t[1:], forward=apply, **kw)


CONFIGS = {
    "plain": {},
    "norms per_term": {"track_grad_norms": True, "grad_strategy": "per_term"},
    "norms sequential": {"track_grad_norms": True, "grad_strategy": "sequential"},
    "gram per_term": {"grad_conflicts": True, "grad_strategy": "per_term"},
    "gram sequential": {"grad_conflicts": True, "grad_strategy": "sequential"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    widths = {"1M": 900, "10M": 3000, "100M": 7050}
    mem_rows, time_rows = [], []
    for label, width in widths.items():
        params, batch = mlp(width, rng)
        n_params = sum(v.size for v in jax.tree.leaves(params))
        grad_bytes = 4 * n_params
        for n in (2, 4, 8, 16):
            compiled = {}
            for name, kw in CONFIGS.items():
                compiled[name] = jax.jit(objective(n, **kw)).lower(params, batch).compile()
            temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
            extra = {k: (v - temp["plain"]) / grad_bytes for k, v in temp.items() if k != "plain"}
            mem_rows.append(
                [f"{label} ({n_params / 1e6:.1f}M)", n, f"{temp['plain'] / 2**20:.1f}"]
                + [f"{extra[k]:+.2f}" for k in list(CONFIGS)[1:]]
            )
            timed = (label != "100M" and n in (2, 8, 16)) or (label == "100M" and n == 2)
            if timed and not (args.quick and label == "100M"):
                reps = 3 if label == "100M" else (5 if label == "10M" else 9)
                fns = {
                    k: (lambda c=c, p=params, b=batch: c(p, b))
                    for k, c in compiled.items()
                    if k != "plain"
                }
                # Values agree (float32 rounding) before anything is timed.
                ref = compiled["gram per_term"](params, batch)
                got = compiled["gram sequential"](params, batch)
                np.testing.assert_allclose(
                    np.asarray(ref.grad_cosines), np.asarray(got.grad_cosines), atol=2e-4
                )
                t = time_interleaved(fns, repeats=reps, min_time=0.02)
                time_rows.append(
                    [
                        label,
                        n,
                        f"{t['norms per_term'] * 1e3:.1f}",
                        f"{t['norms sequential'] / t['norms per_term']:.2f}x",
                        f"{t['gram per_term'] * 1e3:.1f}",
                        f"{t['gram sequential'] / t['gram per_term']:.2f}x",
                    ]
                )
            del compiled
    print("Temporary memory: plain step (MiB), and the extra of each diagnostic (gradients)")
    print(table(mem_rows, ["model", "terms", "plain MiB", *list(CONFIGS)[1:]]))
    print()
    print("Time: per_term (ms) and sequential / per_term, side by side")
    print(
        table(
            time_rows,
            ["model", "terms", "norms per_term ms", "norms seq", "gram per_term ms", "gram seq"],
        )
    )


if __name__ == "__main__":
    main()
