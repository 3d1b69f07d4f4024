"""The two-objective toy problem of the CAGrad and Nash-MTL papers, with every aggregator.

The objectives (Liu et al. 2021, "Conflict-Averse Gradient Descent", toy example) have
a Pareto front along the valley floor ``x2 ~ -8.4`` and a flat, conflicting region
above it where the mean gradient is tiny. Each method runs Adam (lr 1e-3) on its
aggregated update from five starting points; the script prints how far from
Pareto-stationary each run ends (the norm of the min-norm convex combination of the
two gradients) and plots the trajectories on the contours of the mean objective.

Run: ``python examples/toy_pareto.py [--steps 50000] [--out toy_pareto.png]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxreg as jr

LOWER = 5e-6
STARTS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]


def objectives(x: jax.Array) -> jax.Array:
    """``[f1, f2]`` of the toy problem (transcribed from the CAGrad authors' ``toy.py``)."""
    x1, x2 = x[0], x[1]
    f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
    f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
    c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
    return jnp.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2])


def trajectory(aggregator, start, steps: int, lr: float = 1e-3):
    """Adam on the aggregated update of the two gradients, from ``start``."""
    opt = optax.chain(aggregator, optax.adam(lr))
    jacobian = jax.jacrev(objectives)

    def step(carry, _):
        x, state = carry
        updates, state = opt.update(jacobian(x), state, x)
        return (optax.apply_updates(x, updates), state), x

    x0 = jnp.asarray(start, jnp.float32)
    (x, _), xs = jax.jit(lambda x0: jax.lax.scan(step, (x0, opt.init(x0)), None, steps))(x0)
    return x, xs


def end_points(aggregator, starts, steps: int, lr: float = 1e-3) -> np.ndarray:
    """Where :func:`trajectory` ends from each of ``starts`` (one compiled program)."""
    opt = optax.chain(aggregator, optax.adam(lr))
    jacobian = jax.jacrev(objectives)

    def run(x0):
        def step(carry, _):
            x, state = carry
            updates, state = opt.update(jacobian(x), state, x)
            return (optax.apply_updates(x, updates), state), None

        (x, _), _ = jax.lax.scan(step, (x0, opt.init(x0)), None, steps)
        return x

    return np.asarray(jax.jit(lambda x0: jax.lax.map(run, x0))(jnp.asarray(starts, jnp.float32)))


def stationarity(x: jax.Array) -> float:
    """Norm of the min-norm point of the two gradients' convex hull (0 on the front)."""
    g1, g2 = np.asarray(jax.jacrev(objectives)(x), np.float64)
    d = g1 - g2
    t = np.clip(-(g2 @ d) / max(d @ d, 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(t * g1 + (1 - t) * g2))


METHODS = {
    "mean (weighted sum)": lambda: jr.aggregators.weighted_sum([0.5, 0.5]),
    "PCGrad": lambda: jr.aggregators.pcgrad(),
    "MGDA": lambda: jr.aggregators.mgda(),
    "UPGrad": lambda: jr.aggregators.upgrad(),
    "CAGrad (c=0.5)": lambda: jr.aggregators.cagrad(0.5),
    "Nash-MTL": lambda: jr.aggregators.nash_mtl(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--out", default="toy_pareto.png")
    args = parser.parse_args()
    runs = {}
    for name, make in METHODS.items():
        start = time.perf_counter()
        runs[name] = [trajectory(make(), s, args.steps) for s in STARTS]
        ends = [stationarity(x) for x, _ in runs[name]]
        print(
            f"{name:20s} stationarity at the end: {np.round(ends, 3).tolist()} "
            f"({time.perf_counter() - start:.1f}s)",
            flush=True,
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-10, 10, 200)
    xx, yy = np.meshgrid(grid, grid)
    mean = jax.vmap(jax.vmap(lambda a, b: objectives(jnp.stack([a, b])).mean()))(
        jnp.asarray(xx), jnp.asarray(yy)
    )
    fig, axes = plt.subplots(2, 3, figsize=(15, 9), constrained_layout=True)
    for ax, (name, trajectories) in zip(axes.ravel(), runs.items(), strict=True):
        ax.contour(xx, yy, np.asarray(mean), levels=30, cmap="Greys", linewidths=0.6)
        for (x, xs), s in zip(trajectories, STARTS, strict=True):
            path = np.asarray(xs)
            ax.plot(path[:, 0], path[:, 1], lw=1.5)
            ax.plot(*s, "k+")
            ax.plot(*np.asarray(x), "o", ms=4)
        ax.set(title=name, xlim=(-10, 10), ylim=(-10, 10))
    fig.suptitle(f"two conflicting objectives, Adam lr 1e-3, {args.steps} steps")
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
