"""Cost of aggregating 8 per-term gradients over a 1M-parameter pytree.

Workload: multi-task regression with a shared MLP trunk (256 -> 1024 -> 768, 1.05M
parameters) and 8 linear heads; term ``i`` is head ``i``'s mean squared error on a
batch of 128 or 1024 examples. ``compose(None, terms, term_grads=True)`` returns the
stacked per-term gradients; each aggregator turns them into one update, either as a
separately jitted call or inside one jit with the objective (how a training step is
usually written). The figure is ``(compose + aggregator) / compose - 1``, timed
interleaved.

Run: ``python -m benchmarks.aggregators_bench [--batch 128] [--repeats 5] [--vs REV]``;
``--vs`` also times the aggregators of git revision ``REV`` in the same run (e.g. the
first-order solvers, ``--vs 3102d15``).
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
    parser.add_argument(
        "--vs", metavar="REV", help="also time the aggregators of git revision REV, interleaved"
    )
    args = parser.parse_args()
    old = load_revision(args.vs) if args.vs else None
    for batch_size in args.batch:
        run(batch_size, args.repeats, old)


def load_revision(rev: str):
    """``jaxreg._src.optim.aggregators`` as of git revision ``rev``, as a separate module."""
    import subprocess
    import types

    source = subprocess.run(
        ["git", "show", f"{rev}:jaxreg/_src/optim/aggregators.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"aggregators_{rev}")
    exec(compile(source, f"{rev}:jaxreg/_src/optim/aggregators.py", "exec"), module.__dict__)
    module.rev = rev
    return module


def solve_times(g, old, repeats: int) -> None:
    """The weight solves alone on one ``n x n`` Gramian, against revision ``old``."""
    new = jr.aggregators
    pairs = {
        "mgda": (lambda g: new.mgda_weights(g), lambda g: old._min_norm_simplex(g, 250)),
        "upgrad": (new.upgrad_weights, old.upgrad_weights),
        "cagrad": (new.cagrad_weights, old.cagrad_weights),
        "nash_mtl": (new.nash_mtl_weights, old.nash_mtl_weights),
    }
    fns = {}
    for name, (f_new, f_old) in pairs.items():
        fns[name], fns[f"{name} old"] = jax.jit(f_new), jax.jit(f_old)
    calls = {k: (lambda f=f: f(g)) for k, f in fns.items()}
    times = time_interleaved(calls, repeats=repeats, min_time=0.2)
    rows = [
        [
            k,
            f"{times[k] * 1e6:.0f}",
            f"{times[k + ' old'] * 1e6:.0f}",
            f"{times[k] / times[k + ' old']:.2f}",
        ]
        for k in pairs
    ]
    print(f"\nweight solve alone on the {g.shape[0]} x {g.shape[0]} Gramian (jit):")
    print(table(rows, ["aggregator", "exact us", f"{old.rev} us", "ratio"]))


def run(batch_size: int, repeats: int = 9, old=None) -> None:
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
        if old is not None and name in ("mgda", "upgrad", "cagrad", "nash_mtl"):
            method = getattr(old, name)()
            old_state = method.init(params)
            fused_old = jax.jit(
                lambda p, b, m=method, st=old_state: m.update(objective(p, b).term_grads, st)[0]
            )
            fns[f"{name} one jit old"] = lambda f=fused_old: f(params, batch)
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
    if old is not None:
        rows = [
            [
                name,
                f"{times[f'{name} one jit'] * 1e3:.2f}",
                f"{times[f'{name} one jit old'] * 1e3:.2f}",
                f"{times[f'{name} one jit'] / times[f'{name} one jit old']:.3f}",
            ]
            for name in ("mgda", "upgrad", "cagrad", "nash_mtl")
        ]
        print(f"\none jit, exact solvers against {old.rev} (interleaved in the same run):")
        print(table(rows, ["aggregator", "exact ms", f"{old.rev} ms", "ratio"]))
        g = jr.aggregators.gramian(compose_jit(params, batch))
        solve_times(g, old, repeats)


if __name__ == "__main__":
    main()
