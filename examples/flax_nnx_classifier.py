"""A flax.nnx classifier (BatchNorm, Dropout) in your own optax loop, with jaxreg terms.

Run: ``python examples/flax_nnx_classifier.py``. Trains an MLP on synthetic 4-class data
with one composed objective: cross-entropy on the logits, an entropy bonus on the
predicted distribution (a confidence penalty, Pereyra et al. 2017) and an L2 penalty on
the kernels, and prints each term's value, contribution and gradient norm as it trains.

The pattern:

* ``nnx.split(model, nnx.Param, nnx.BatchStat)`` separates the parameters, which are
  differentiated and penalised, from BatchNorm's running statistics, which are neither.
  Penalising ``nnx.state(model)`` would count the statistics too (a running variance
  starts at 1 per feature); the built-in penalties leave them out with a
  ``NonParamStateWarning``, but the split says what is meant.
* ``forward(params, batch)`` rebuilds the model with ``nnx.merge`` (``copy=True``: fresh
  Variables, which BatchNorm may update inside the gradient's trace) and runs it once
  per step; the cross-entropy and entropy terms read its logits, the L2 term
  (``on="params"``) the parameters, of which its ``mask=`` keeps the kernels.
* The forward also returns BatchNorm's updated running statistics
  (``forward_has_aux=True``): they come back as ``out.aux`` from the same forward the
  terms read, not differentiated.
* Dropout keeps no RNG state in the model: each step passes a fresh key in the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxreg as jr


class MLP(nnx.Module):
    """``Linear -> BatchNorm -> relu -> Dropout -> Linear``."""

    def __init__(self, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(features, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.1)  # no RNG state: the key comes with each call
        self.fc2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        h = nnx.relu(self.bn(self.fc1(x)))
        return self.fc2(self.dropout(h, rngs=key))


def make_data(seed: int, n: int, *, features: int = 16, classes: int = 4):
    """``n`` points around ``classes`` fixed random centres, 10% of the labels resampled."""
    centres = np.random.default_rng(42).normal(size=(classes, features))  # one fixed task
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(size=(n, features))
    y = np.where(rng.random(n) < 0.1, rng.integers(0, classes, n), y)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def cross_entropy(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean cross-entropy of the integer labels; reports the batch accuracy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == batch["y"]).astype(logits.dtype))
    return ce, {"accuracy": accuracy}


def make_objective(graphdef: nnx.GraphDef) -> jr.Objective:
    """CE and an entropy bonus on the model's logits, L2 on its kernels."""

    def forward(params: nnx.State, batch: dict) -> tuple[jax.Array, nnx.State]:
        model = nnx.merge(graphdef, params, batch["stats"], copy=True)
        logits = model(batch["x"], key=batch["key"])  # training mode: batch statistics
        return logits, nnx.state(model, nnx.BatchStat)  # the updated running statistics

    # Weight decay on the kernels (2-D), not on biases or BatchNorm's scale and offset.
    kernels = jr.regularizers.l2(mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))
    return jr.compose(
        jr.Term("ce", cross_entropy),
        [
            jr.Term("entropy", jr.regularizers.entropy, weight=0.05),  # on the [B, K] logits
            jr.Term("l2", kernels, weight=1e-4, on="params"),
        ],
        forward=forward,
        forward_has_aux=True,
        track_grad_norms=True,
    )


@functools.partial(jax.jit, static_argnums=0)
def predict(graphdef: nnx.GraphDef, params: nnx.State, stats: nnx.State, x: jax.Array):
    """Evaluation mode: BatchNorm uses its running statistics, Dropout is off."""
    model = nnx.merge(graphdef, params, stats, copy=True)
    model.eval()
    return model(x)


def make_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, batch_size: int
):
    """A jitted ``step(params, stats, opt_state, data, key, i)`` on the ``i``-th minibatch.

    Returns the new ``(params, stats, opt_state)`` and the
    :class:`jaxreg.CompositeOutput` at the parameters the step started from.
    """
    objective = make_objective(graphdef)

    @jax.jit
    def step(params, stats, opt_state, data, key, i):
        k_batch, k_dropout = jax.random.split(jax.random.fold_in(key, i))
        idx = jax.random.randint(k_batch, (batch_size,), 0, data["x"].shape[0])
        batch = {"x": data["x"][idx], "y": data["y"][idx], "stats": stats, "key": k_dropout}
        out = objective(params, batch)
        stats = out.aux  # BatchNorm's statistics after this step's forward
        updates, opt_state = optimizer.update(out.grad, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, out

    return step, objective


def main(steps: int = 300, *, batch_size: int = 64, log_every: int = 50, seed: int = 0):
    """Trains the classifier; returns what the test checks (and what a reader may want)."""
    model = MLP(16, 64, 4, rngs=nnx.Rngs(seed))
    x_train, y_train = make_data(2 * seed, 1024)
    x_test, y_test = make_data(2 * seed + 1, 1024)
    data = {"x": x_train, "y": y_train}

    # Parameters (differentiated, penalised) apart from BatchNorm's statistics.
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)
    step, objective = make_train_step(graphdef, optimizer, batch_size)
    key = jax.random.key(seed)

    first = last = None
    for i in range(steps):
        evaluated = params
        params, stats, opt_state, out = step(params, stats, opt_state, data, key, i)
        first = out if first is None else first
        last = out
        if i % log_every == 0 or i == steps - 1:
            terms = "  ".join(
                f"{name} {t.value:.4f} (x{t.weight:g} = {t.contribution:+.4f}, "
                f"|g| {t.grad_norm:.3f})"
                for name, t in out.terms.items()
            )
            print(f"step {i:4d}  loss {out.loss_total:.4f}  {terms}")
    print(last)

    logits = predict(graphdef, params, stats, x_test)
    test_accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == y_test))
    nnx.update(model, params, stats)  # the trained model, as a Module again
    print(f"test accuracy {test_accuracy:.3f}")
    print(f"objective compiled {objective.trace_count} time(s) for {steps} steps")
    return {
        "model": model,
        "params": params,
        "stats": stats,
        "evaluated_params": evaluated,
        "first": first,
        "last": last,
        "test_accuracy": test_accuracy,
        "trace_count": objective.trace_count,
    }


if __name__ == "__main__":
    main()
