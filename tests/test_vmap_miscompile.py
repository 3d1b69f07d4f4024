"""No grad_strategy returns wrong per-term gradients where XLA:CPU miscompiles vmap.

XLA:CPU (jaxlib 0.10.2) miscompiles, in float32, the batched backward of LayerNorm,
softmax and log_softmax: its YNNPACK reduce fusion of ``c + (x[None] * c).sum(-1)``
gives every element of ``c`` past the first 32768 the reduction of an earlier row.
The reference is a loop of per-term ``jax.grad``, one unbatched program each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from jaxreg._src.core import program
from jaxreg.service import model as model_lib

# d_model 32 over [32, 32] tokens (the demo's shape): each term's LayerNorm cotangent
# has 32768 elements, so with a batched pullback rows 1-3 lie past element 32768 of it
# (a plain vmap gives relative errors of 2-3e-2 there).
CFG = model_lib.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, context_length=32)
B, T = 32, 32


def _terms():
    def ce(lp, batch):
        return -jnp.mean(lp)

    def sq(lp, batch):
        return jnp.mean(lp**2)

    def first(lp, batch):
        return -jnp.mean(lp[:, : T // 2])

    def weighted(lp, batch):
        return -jnp.sum(lp * batch["w"]) / (B * T)

    return [("ce", ce), ("sq", sq), ("first", first), ("weighted", weighted)]


@pytest.fixture(scope="module")
def problem():
    params = model_lib.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    w = jnp.asarray(rng.uniform(0, 2, (B, T)), jnp.float32)
    batch = {"tokens": tokens, "targets": targets, "w": w}

    def forward(p, batch):
        return model_lib.token_logprobs(CFG, p, batch["tokens"], batch["targets"])

    # The independent reference: one jax.grad per term, each its own unbatched program
    # (no broadcast operand in its reductions, which XLA:CPU compiles right; op by op
    # under jax.disable_jit() gives the same to 1e-7 but takes 16 s).
    ref = [
        jax.jit(jax.grad(lambda p, fn=fn: fn(forward(p, batch), batch)))(params)
        for _, fn in _terms()
    ]
    return params, batch, forward, ref


def _rel_errors(jac, ref):
    errs = []
    for i, r in enumerate(ref):
        num = sum(
            float(jnp.sum((j[i] - g) ** 2))
            for j, g in zip(jax.tree.leaves(jac), jax.tree.leaves(r), strict=True)
        )
        den = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(r))
        errs.append((num / den) ** 0.5)
    return errs


@pytest.mark.parametrize(
    "strategy", ["vmap", "per_term", "auto", [("ce", "sq"), ("first", "weighted")]]
)
def test_every_strategy_matches_a_loop_of_per_term_grads(problem, strategy):
    params, batch, forward, ref = problem
    terms = _terms()
    objective = jr.compose(
        jr.Term(*terms[0]),
        [jr.Term(name, fn) for name, fn in terms[1:]],
        forward=forward,
        term_grads=True,
        grad_strategy=strategy,
    )
    out = objective(params, batch)
    errs = _rel_errors(out.term_grads, ref)
    assert max(errs) < 1e-4, errs


def _reproducer(x, c):
    return c + (x[None] * c).sum(-1)[..., None]


def test_minimal_reproducer_is_handled():
    """The batched pullback of ``sum(x * c)``-then-add is the reproducer's fusion.

    ``jax.jit(_reproducer)`` itself is wrong on jaxlib 0.10.2 (rows 2, 3 get rows 0, 1);
    jaxreg's batched pullback of the same function gives the float64 NumPy rows.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 32, 16)).astype(np.float32)
    c = rng.standard_normal((4, 32, 32, 16)).astype(np.float32)
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    want = c64 + (x64[None] * c64).sum(-1)[..., None]

    # The reproducer as a pullback: d/dc <y, c + (x * c).sum(-1)> at cotangent y = c_k
    # is c_k + x * c_k.sum(-1): the same reduce-then-add, batched over k by compose.
    def pullback_of(v):
        return (v + (jnp.asarray(x) * v).sum(-1)[..., None],)

    got = jax.jit(lambda c: program._batched_pullback(pullback_of, c, 4))(jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
