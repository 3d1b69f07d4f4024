"""Multi-term training with UPGrad: per-term gradients from ``compose``, one update.

Run: ``python examples/multitask_upgrad.py``. Three regression tasks share an MLP trunk;
two of them pull against each other. ``compose(..., term_grads=True,
grad_conflicts=True)`` gives the stacked per-term gradients and their cosines, and
``optax.chain(jr.aggregators.upgrad(), optax.adam(...))`` turns them into an update that
worsens no task to first order. Prints each task's loss, the worst cosine and the
residual of UPGrad's weight problem (solved exactly, to rounding).
"""

import jax
import jax.numpy as jnp
import optax

import jaxreg as jr


def trunk(params, x):
    return jnp.tanh(x @ params["w1"])


def task(i, sign):
    def loss(params, batch):
        pred = trunk(params, batch["x"]) @ params["heads"][i]
        return jnp.mean((pred - sign * batch["y"]) ** 2)

    return jr.Term(f"task{i}", loss)


def main():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (8, 64)) * 0.3,
        "heads": jax.random.normal(k2, (3, 64)) * 0.1,
    }
    x = jax.random.normal(k3, (512, 8))
    batch = {"x": x, "y": jnp.sin(x[:, 0]) + x[:, 1]}
    objective = jr.compose(
        None, [task(0, 1.0), task(1, 1.0), task(2, -1.0)], term_grads=True, grad_conflicts=True
    )
    optimizer = optax.chain(jr.aggregators.upgrad(), optax.adam(1e-2))
    state = optimizer.init(params)

    @jax.jit  # one program per step: the aggregator reads the per-term gradients in place
    def train_step(params, state):
        out = objective(params, batch)
        updates, state = optimizer.update(out.term_grads, state, params)
        return optax.apply_updates(params, updates), state, out

    for step in range(301):
        params, state, out = train_step(params, state)
        if step % 50 == 0:
            d = out.to_dict()
            losses = "  ".join(f"{n} {r['value']:.4f}" for n, r in d["regularizers"].items())
            worst = min(min(row.values()) for row in d["grad_cosines"].values())
            residual = float(state[0].residual)  # UPGrad's KKT residual (exact solve)
            print(f"step {step}: {losses}  worst cosine {worst:+.2f}  residual {residual:.1e}")
    print(f"compose compiled {objective.trace_count} time(s)")


if __name__ == "__main__":
    main()
