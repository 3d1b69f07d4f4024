"""Regularizers inside ``optax.chain``: a drop-in replacement for hand-written penalties.

Run: ``python examples/optax_regularize.py``. Trains a small MLP with
``regularize([l2, l1]) -> adam``, the L2 weight following a warm-up schedule, and prints
what the transform measured (each term's value, weight, contribution, grad norm).
"""

import jax
import jax.numpy as jnp
import optax

import jaxreg as jr


def model(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def main():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (4, 32)) * 0.5, "w2": jax.random.normal(k2, (32, 1))}
    x = jax.random.normal(k3, (256, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    names = ["l2", "l1"]
    l2_schedule = optax.linear_schedule(0.0, 1e-3, transition_steps=100)
    optimizer = optax.chain(
        jr.transforms.regularize(
            [
                jr.Term("l2", jr.regularizers.l2, weight=l2_schedule),
                jr.Term("l1", jr.regularizers.l1, weight=1e-4),
            ]
        ),
        optax.adam(1e-2),
    )
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model(p, x) - y) ** 2))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(301):
        params, state, loss = step(params, state)
        if i % 100 == 0:
            measured = jr.transforms.metrics(state[0], names)
            print(
                f"step {i}: mse {float(loss):.4f}  "
                + "  ".join(
                    f"{n}: value {m['value']:.2f} weight {m['weight']:.1e} |g| {m['grad_norm']:.2f}"
                    for n, m in measured.items()
                )
            )


if __name__ == "__main__":
    main()
