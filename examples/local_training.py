"""Local JAX training with optax: a loss on a model's outputs plus parameter penalties.

Run: ``python examples/local_training.py``. Prints each term's contribution and gradient
norm every 50 steps; the objective compiles once although the L2 weight changes.
"""

import jax
import jax.numpy as jnp
import optax

import jaxreg as jr


def model(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def mse(params, batch):
    pred = model(params, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2), {"max_err": jnp.max(jnp.abs(pred - batch["y"]))}


def main():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (4, 32)) * 0.5,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 1)) * 0.5,
    }
    x = jax.random.normal(k3, (128, 4))
    batch = {"x": x, "y": jnp.sin(x.sum(axis=1, keepdims=True))}
    objective = jr.compose(
        jr.Term("mse", mse),
        [jr.Term("l2", jr.regularizers.l2, 1e-3), jr.Term("l1", jr.regularizers.l1, 1e-4)],
        track_grad_norms=True,
    )
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)
    for step in range(301):
        l2_weight = 1e-3 if step < 150 else 1e-2  # a new weight, the same program
        out = objective(params, batch, weights={"l2": l2_weight})
        updates, state = optimizer.update(out.grad, state, params)
        params = optax.apply_updates(params, updates)
        if step % 50 == 0:
            d = out.to_dict()
            terms = ", ".join(
                f"{n}: {r['contribution']:.4f} (|g| {r['grad_norm']:.3f})"
                for n, r in d["regularizers"].items()
            )
            print(
                f"step {step:3d}  loss {d['loss_total']:.4f}  "
                f"mse {d['base_loss']['value']:.4f}  {terms}"
            )
    print(f"compiled {objective.trace_count} time(s) for 301 steps")


if __name__ == "__main__":
    main()
