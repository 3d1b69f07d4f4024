"""One multi-task model trained with each aggregator, side by side, with a plot.

Run: ``python examples/multitask_aggregators.py [--steps 400] [--out PNG] [--methods
all | LABEL ...]`` (the plot goes to ``runs/multitask_aggregators.png`` by default; the
nine methods of ``DEFAULT`` unless ``--methods`` picks others).

Four regression tasks share a small tanh trunk (too small to fit them all) and each has
its own linear head; the last task's targets are 10x larger, so its gradient dominates
the sum. ``compose(..., term_grads=True)`` gives the stacked per-task gradients, the
aggregator turns them into one direction, and Adam takes the step. Every method trains
the same model from the same initialisation on the same data (full batch, one compiled
``lax.scan`` per method).

Per step the script records each task's loss, the conflict between the tasks (the
smallest pairwise cosine of their gradients) and whether the aggregated direction ``d``
worsens some task to first order (the smallest :math:`\\cos(g_i, d)`: negative means
the step increases task ``i``'s loss). The tasks' own conflict depends on where each
method has taken the model, so it is plotted per method too. It prints a summary table
and plots the loss curves and both cosines. The non-conflicting methods (UPGrad, MGDA,
DualProj, Nash-MTL and FairGrad here) keep :math:`\\min_i \\cos(g_i, d) \\ge 0`
(IMTL-G equalises the projections, but their common sign can be negative); the mean
follows the large task and steps against the others.

Add a method with one line in ``AGGREGATORS``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxreg as jr

TASKS = 4
HIDDEN = 6

# label -> (name in jr.aggregators, options); a name jaxreg does not have is skipped.
AGGREGATORS = {
    # "sum" would train exactly as "mean" here: Adam does not see a constant factor.
    "mean": ("weighted_sum", {"weights": [1 / TASKS] * TASKS}),
    "Random (RLW)": ("random", {}),
    "PCGrad": ("pcgrad", {}),
    "IMTL-G": ("imtl_g", {}),
    "MGDA": ("mgda", {}),
    "UPGrad": ("upgrad", {}),
    "CAGrad (c=0.5)": ("cagrad", {"c": 0.5}),
    "Nash-MTL": ("nash_mtl", {}),
    "Aligned-MTL": ("aligned_mtl", {}),
    "ConFIG": ("config", {}),
    "DualProj": ("dualproj", {}),
    "GradVac": ("gradvac", {"n_tasks": TASKS}),
    "FairGrad (a=2)": ("fairgrad", {"alpha": 2.0}),
    "GradDrop": ("graddrop", {}),
    "PCD (task 0)": ("pcd", {"num_tasks": TASKS}),
    "ExcessMTL": ("excess_mtl", {"num_tasks": TASKS}),
    "Krum (f=1)": ("krum", {"n_byzantine": 1}),
    "TrimmedMean": ("trimmed_mean", {"trim_number": 1}),
}


# The methods plotted by default (more than about 9 curves per panel do not read well);
# ``--methods all`` runs every one, ``--methods LABEL ...`` picks others.
DEFAULT = [
    "mean",
    "PCGrad",
    "MGDA",
    "UPGrad",
    "CAGrad (c=0.5)",
    "Nash-MTL",
    "DualProj",
    "ConFIG",
    "FairGrad (a=2)",
]


def make_data(key, n: int = 256):
    """Inputs ``[n, 8]`` and four targets; the last one is 10x larger."""
    x = jax.random.normal(key, (n, 8))
    y = jnp.stack(
        [
            jnp.sin(2 * x[:, 0]) + 0.5 * x[:, 1],
            x[:, 1] * x[:, 2],
            jnp.abs(x[:, 3]) - x[:, 0],
            10.0 * jnp.cos(x[:, 4] + x[:, 0]),
        ],
        axis=1,
    )
    return {"x": x, "y": y}


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (8, HIDDEN)) / jnp.sqrt(8.0),
        "b1": jnp.zeros((HIDDEN,)),
        "heads": jax.random.normal(k2, (TASKS, HIDDEN)) / jnp.sqrt(HIDDEN),
        "bias": jnp.zeros((TASKS,)),
    }


def task(i: int) -> jr.Term:
    def loss(params, batch):
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        pred = h @ params["heads"][i] + params["bias"][i]
        return jnp.mean((pred - batch["y"][:, i]) ** 2)

    return jr.Term(f"task{i}", loss)


def cosines(term_grads, update):
    """The smallest pairwise cosine of the task gradients and the smallest
    ``cos(g_i, d)`` of the update ``d``."""
    g = jr.aggregators.gramian(term_grads)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 1e-30))
    cos = g / norms[:, None] / norms[None, :]
    pairwise = jnp.min(jnp.where(jnp.eye(TASKS, dtype=bool), 1.0, cos))
    dots = jax.tree.map(lambda s, d: jnp.tensordot(s, d, axes=d.ndim), term_grads, update)
    dot = sum(jax.tree.leaves(dots))
    dnorm = jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree.leaves(update)))
    return pairwise, jnp.min(dot / (norms * jnp.maximum(dnorm, 1e-30)))


def train(aggregator, params, batch, steps: int, lr: float = 1e-2):
    """``steps`` full-batch steps of Adam on the aggregated direction: per-step task
    losses ``[steps, TASKS]``, pairwise and update cosines ``[steps]``."""
    objective = jr.compose(None, [task(i) for i in range(TASKS)], term_grads=True)
    adam = optax.adam(lr)

    def step(carry, _):
        params, agg_state, adam_state = carry
        out = objective(params, batch)
        direction, agg_state = aggregator.update(out.term_grads, agg_state, params)
        updates, adam_state = adam.update(direction, adam_state, params)
        losses = jnp.stack([out.regularizers[f"task{i}"].value for i in range(TASKS)])
        pairwise, worst = cosines(out.term_grads, direction)
        return (optax.apply_updates(params, updates), agg_state, adam_state), (
            losses,
            pairwise,
            worst,
        )

    @jax.jit
    def run(params):
        init = (params, aggregator.init(params), adam.init(params))
        return jax.lax.scan(step, init, None, steps)[1]

    return jax.tree.map(np.asarray, run(params))


def available(names=None) -> dict:
    """The methods of ``AGGREGATORS`` that jaxreg has: those in ``names`` (``DEFAULT``
    when ``None``, every one for ``["all"]``)."""
    names = DEFAULT if names is None else names
    return {
        label: (name, options)
        for label, (name, options) in AGGREGATORS.items()
        if hasattr(jr.aggregators, name) and (names == ["all"] or label in names)
    }


def plot(histories: dict, path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for k, (label, (losses, pairwise, worst)) in enumerate(histories.items()):
        style = {"color": colors(k % 10), "lw": 1.4, "label": label}
        for i in range(TASKS):
            axes.flat[i].plot(losses[:, i], **style)
        axes.flat[4].plot(worst, **style)
        axes.flat[5].plot(pairwise, color=colors(k % 10), lw=0.9, alpha=0.7)
    for i in range(TASKS):
        axes.flat[i].set(title=f"task {i} loss", yscale="log", xlabel="step")
    axes.flat[3].set_title("task 3 loss (targets 10x larger)")
    axes.flat[4].axhline(0.0, color="k", lw=0.8)
    axes.flat[4].set(
        title=r"does the step worsen a task? $\min_i \cos(g_i, d)$", xlabel="step", ylim=(-0.4, 0.6)
    )
    axes.flat[5].set(
        title=r"conflict between tasks: $\min_{i \neq j} \cos(g_i, g_j)$",
        xlabel="step",
        ylim=(-1, 1),
    )
    axes.flat[5].axhline(0.0, color="k", lw=0.8)
    axes.flat[0].legend(fontsize=8, ncol=2)
    fig.suptitle(
        f"{TASKS} regression tasks on a shared {HIDDEN}-unit trunk, Adam lr 1e-2, {steps} steps"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/multitask_aggregators.png")
    parser.add_argument(
        "--methods",
        "--aggregators",
        dest="methods",
        nargs="*",
        help="labels from AGGREGATORS, or 'all' (default: DEFAULT, 9 of them)",
    )
    args = parser.parse_args(argv)
    k_data, k_params = jax.random.split(jax.random.key(0))
    batch, params = make_data(k_data), init_params(k_params)
    histories = {}
    print(
        f"{'aggregator':16s} {'final loss per task':>36s} {'mean loss/initial':>18s} "
        f"{'min cos(g_i, d)':>16s} {'steps < 0':>10s} {'time':>6s}"
    )
    for label, (name, options) in available(args.methods).items():
        start = time.perf_counter()
        aggregator = getattr(jr.aggregators, name)(**options)
        losses, pairwise, worst = train(aggregator, params, batch, args.steps)
        histories[label] = (losses, pairwise, worst)
        final = "  ".join(f"{v:7.4f}" for v in losses[-1])
        relative = np.mean(losses[-1] / losses[0])
        print(
            f"{label:16s} {final:>36s} {relative:18.3f} {worst.min():16.3f} "
            f"{int(np.sum(worst < -1e-6)):10d} {time.perf_counter() - start:5.1f}s",
            flush=True,
        )
    plot(histories, args.out, args.steps)
    print(f"wrote {args.out}")
    return histories


if __name__ == "__main__":
    main()
