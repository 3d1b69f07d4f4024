"""Cost of aggregating 8 per-term gradients over a 1M-parameter pytree.

Workload: multi-task regression with a shared MLP trunk (256 -> 1024 -> 768, 1.05M
parameters) and 8 linear heads; term ``i`` is head ``i``'s mean squared error on a
batch of 128 or 1024 examples. ``compose(None, terms, term_grads=True)`` returns the
stacked per-term gradients; each aggregator turns them into one update, either as a
separately jitted call or inside one jit with the objective (how a training step is
usually written). The figure is ``(compose + aggregator) / compose - 1``, timed
interleaved.

Run: ``python -m benchmarks.aggregators_bench [--batch 128] [--repeats 5]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxreg as jr
from benchmarks.common import block, table, time_interleaved

N_TERMS = 8


def setup(batch_size: int):
    k = iter(jax.random.split(jax.random.key(0), 8))
    params = {
        "w1": jax.random.normal(next(k), (256, 1024)) / 16,
        "w2": jax.random.normal(next(k), (1024, 768)) / 32,
        "heads": jax.random.normal(next(k), (N_TERMS, 768)) / 28,
    }
    x = jax.random.normal(next(k), (batch_size, 256))
    y = jax.random.normal(next(k), (batch_size, N_TERMS))

    def term(i):
        def loss(p, batch):
            h = jax.nn.relu(jax.nn.relu(batch["x"] @ p["w1"]) @ p["w2"])
            return jnp.mean(jnp.square(h @ p["heads"][i] - batch["y"][:, i]))

        return jr.Term(f"task{i}", loss)

    objective = jr.compose(None, [term(i) for i in range(N_TERMS)], term_grads=True)
    return objective, params, {"x": x, "y": y}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    for batch_size in args.batch:
        run(batch_size, args.repeats)


def run(batch_size: int, repeats: int = 9) -> None:
    objective, params, batch = setup(batch_size)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    aggregators = {
        "weighted_sum": jr.aggregators.weighted_sum(),
        "pcgrad": jr.aggregators.pcgrad(),
        "mgda": jr.aggregators.mgda(),
        "upgrad": jr.aggregators.upgrad(),
        "cagrad": jr.aggregators.cagrad(),
        "nash_mtl": jr.aggregators.nash_mtl(),
    }
    compose_jit = jax.jit(lambda p, b: objective(p, b).term_grads)
    fns = {
        "compose": lambda: objective(params, batch).term_grads,
        "compose (in a jit)": lambda: compose_jit(params, batch),
    }
    for name, agg in aggregators.items():
        state = agg.init(params)
        update = jax.jit(agg.update)
        fused = jax.jit(
            lambda p, b, agg=agg, state=state: agg.update(objective(p, b).term_grads, state)[0]
        )

        def separate(update=update, state=state):
            return update(objective(params, batch).term_grads, state)[0]

        fns[f"{name} separate"] = separate
        fns[f"{name} one jit"] = lambda fused=fused: fused(params, batch)
    block(fns["compose"]())
    times = time_interleaved(fns, repeats=repeats, min_time=0.2)
    base, base_jit = times["compose"], times["compose (in a jit)"]
    rows = []
    for name in aggregators:
        sep, one = times[f"{name} separate"], times[f"{name} one jit"]
        rows.append(
            [
                name,
                f"{sep * 1e3:.2f}",
                f"{sep / base - 1:+.1%}",
                f"{one * 1e3:.2f}",
                f"{one / base_jit - 1:+.1%}",
            ]
        )
    print(
        f"\n{N_TERMS} terms, {n_params:,} parameters, batch {batch_size}: compose "
        f"{base * 1e3:.2f} ms (in a jit: {base_jit * 1e3:.2f} ms)"
    )
    print(table(rows, ["aggregator", "separate jits ms", "cost", "one jit ms", "cost"]))


if __name__ == "__main__":
    main()
