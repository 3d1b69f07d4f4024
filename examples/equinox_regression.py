"""An equinox MLP fine-tuned with L2-SP: jaxreg terms in your own optax loop.

Run: ``python examples/equinox_regression.py``. Pre-trains an ``eqx.nn.MLP`` on a
source task, then fine-tunes it on 24 noisy points of a related target task twice with
the same compiled step: with an L2-SP penalty :math:`\\sum (\\theta - \\theta_0)^2`
pulling the parameters towards the pre-trained ones (Li et al. 2018), and with its
weight set to 0 per call. Prints each term's value, contribution and gradient norm,
and the held-out error of both runs.

The pattern:

* ``eqx.partition(model, eqx.is_inexact_array)`` splits the model into the float arrays,
  which are differentiated and penalised, and the rest (activation functions, sizes),
  which ``eqx.combine`` puts back inside the forward.
* ``forward(params, batch)`` runs the model once per step (``jax.vmap`` over the batch);
  the MSE term reads its predictions, the L2-SP term (``on="params"``) the parameters.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxreg as jr


def source(x: np.ndarray) -> np.ndarray:
    """The pre-training task."""
    return np.sin(3 * x)


def target(x: np.ndarray) -> np.ndarray:
    """The fine-tuning task: the source task, shifted and tilted a little."""
    return np.sin(3 * x + 0.3) + 0.2 * x


def make_data(seed: int, n: int, task, noise: float = 0.0):
    """``n`` points ``x ~ U(-2, 2)``, ``y = task(x) + noise``, as float32 ``[n, 1]``, ``[n]``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 1))
    y = task(x[:, 0]) + noise * rng.normal(size=n)
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}


def mse(pred: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean squared error of the predictions ``[B]``; reports the largest error."""
    err = pred - batch["y"]
    return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}


def make_forward(static):
    """``forward(params, batch)``: the model rebuilt from its float arrays, over the batch."""

    def forward(params, batch: dict) -> jax.Array:
        model = eqx.combine(params, static)
        return jax.vmap(model)(batch["x"])

    return forward


def make_step(objective: jr.Objective, optimizer: optax.GradientTransformation):
    """A jitted ``step(params, opt_state, batch, weights)`` and the optimiser's ``init``.

    ``weights`` are per-call term weights (traced: a new value does not recompile).
    Returns ``(params, opt_state, out)`` with ``out`` the
    :class:`jaxreg.CompositeOutput` at the parameters the step started from.
    """

    @jax.jit
    def step(params, opt_state, batch, weights):
        out = objective(params, batch, weights=weights)
        updates, opt_state = optimizer.update(out.grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out

    return step, optimizer.init


def train(stepper, params, batch, steps: int, weights: dict, log_every: int, label: str):
    """Runs ``steps`` optimiser steps from ``params``; returns the last params and outputs."""
    step, init = stepper
    opt_state = init(params)
    first = last = evaluated = None
    for i in range(steps):
        evaluated = params
        params, opt_state, out = step(params, opt_state, batch, weights)
        first = out if first is None else first
        last = out
        if log_every and (i % log_every == 0 or i == steps - 1):
            terms = "  ".join(
                f"{name} {t.value:.4f} (x{t.weight:g} = {t.contribution:.4f}"
                + (f", |g| {t.grad_norm:.3f})" if out.has_grad_norms else ")")
                for name, t in out.terms.items()
            )
            print(f"{label} step {i:4d}  loss {out.loss_total:.4f}  {terms}")
    return params, {"first": first, "last": last, "evaluated_params": evaluated}


def main(
    pretrain_steps: int = 500, finetune_steps: int = 300, *, l2_sp: float = 1e-2, seed: int = 0
):
    """Pre-trains, then fine-tunes with and without L2-SP; returns what the test checks."""
    model = eqx.nn.MLP(1, "scalar", 32, 2, activation=jnp.tanh, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    forward = make_forward(static)
    optimizer = optax.adam(1e-2)

    # Pre-training: the MSE alone.
    pretrain = make_step(jr.compose(jr.Term("mse", mse), forward=forward), optimizer)
    pretrained, _ = train(
        pretrain, params, make_data(seed, 256, source), pretrain_steps, {}, 0, "pretrain"
    )

    # Fine-tuning: MSE on 24 noisy target points + L2-SP towards the pre-trained params.
    objective = jr.compose(
        jr.Term("mse", mse),
        [jr.Term("l2_sp", jr.regularizers.l2(center=pretrained), weight=l2_sp, on="params")],
        forward=forward,
        track_grad_norms=True,
    )
    finetune = make_step(objective, optimizer)
    batch = make_data(seed + 1, 24, target, noise=0.3)
    test = make_data(seed + 2, 1024, target)
    runs = {}
    for label, weight in (("l2-sp", l2_sp), ("no-reg", 0.0)):
        tuned, history = train(
            finetune, pretrained, batch, finetune_steps, {"l2_sp": weight}, 100, label
        )
        test_mse = float(jax.jit(mse)(jax.jit(forward)(tuned, test), test)[0])
        runs[label] = {"params": tuned, "test_mse": test_mse, **history}
    print(runs["l2-sp"]["last"])
    for label, run in runs.items():
        print(f"{label}: held-out mse {run['test_mse']:.4f}")
    print(f"fine-tuning objective compiled {objective.trace_count} time(s) for 2 runs")
    return {
        "model": eqx.combine(runs["l2-sp"]["params"], static),
        "pretrained": pretrained,
        "static": static,
        "batch": batch,
        "objective": objective,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
