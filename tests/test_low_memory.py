"""grad_strategy="sequential": per-term norms and the Gramian one term at a time, equal to a
loop of per-term jax.grad (float64), with temporary memory that does not grow with n."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr

RNG = np.random.default_rng(11)


def forward(params, batch):
    h = jax.nn.gelu(batch["x"] @ params["w1"] + params["b1"])
    return h @ params["w2"]


def _terms():
    def ce(y, b):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(y), b["y"][:, None], axis=1))

    def ent(y, b):
        lp = jax.nn.log_softmax(y)
        return jnp.mean(jnp.sum(jnp.exp(lp) * lp, axis=-1))

    def logit_l2(y, b):
        return jnp.mean(y**2)

    def l2(p, b):
        return sum(jnp.sum(v**2) for v in jax.tree.leaves(p))

    def l1_w2(p, b):
        return jnp.sum(jnp.abs(p["w2"]))

    return [
        jr.Term("ce", ce),
        jr.Term("ent", ent, weight=0.1),
        jr.Term("logit_l2", logit_l2, weight=0.5),
        jr.Term("l2", l2, weight=1e-2, on="params"),
        jr.Term("l1_w2", l1_w2, weight=1e-3, on="params"),
    ]


def _problem(dtype):
    p = {
        "w1": jnp.asarray(RNG.normal(size=(6, 8)), dtype),
        "b1": jnp.asarray(RNG.normal(size=(8,)), dtype),
        "w2": jnp.asarray(RNG.normal(size=(8, 4)), dtype),
    }
    b = {"x": jnp.asarray(RNG.normal(size=(5, 6)), dtype), "y": jnp.asarray(RNG.integers(0, 4, 5))}
    return p, b


def _reference(terms, p, b):
    """Each term's gradient by its own jax.grad, then norms, Gramian and w^T J in NumPy."""
    rows, values = [], []
    for t in terms:

        def f(q, t=t):
            return t.fn(q if t.on == "params" else forward(q, b), b)

        values.append(float(f(p)))
        g = jax.grad(f)(p)
        rows.append(np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(g)]))
    jac = np.stack(rows)
    # compose's weights are float32 arrays: the reference uses the same rounded weights.
    w = np.array([t.weight for t in terms], np.float32).astype(np.float64)
    return np.array(values), jac, w


@pytest.mark.parametrize("conflicts", [False, True])
def test_sequential_equals_a_loop_of_per_term_grads_in_float64(conflicts):
    with jax.enable_x64(True):
        terms = _terms()
        p, b = _problem(jnp.float64)
        values, jac, w = _reference(terms, p, b)
        objective = jr.compose(
            terms[0],
            terms[1:],
            forward=forward,
            track_grad_norms=True,
            grad_conflicts=conflicts,
            grad_strategy="sequential",
        )
        out = objective(p, b)
        names = [t.name for t in terms]
        got_values = [float(out.base_loss.value)] + [
            float(out.regularizers[n].value) for n in names[1:]
        ]
        np.testing.assert_allclose(got_values, values, rtol=1e-12)
        norms = [float(out.base_loss.grad_norm)] + [
            float(out.regularizers[n].grad_norm) for n in names[1:]
        ]
        np.testing.assert_allclose(norms, np.linalg.norm(jac, axis=1), rtol=1e-12)
        grad = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(out.grad)])
        np.testing.assert_allclose(grad, w @ jac, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(out.total_grad_norm), np.linalg.norm(w @ jac), rtol=1e-6)
        if conflicts:
            gram = jac @ jac.T
            d = np.sqrt(np.diag(gram))
            np.testing.assert_allclose(
                np.asarray(out.grad_cosines), gram / np.outer(d, d), rtol=1e-10, atol=1e-12
            )


def test_sequential_in_logit_space_equals_per_term():
    """P^T P g_j directions: the Gramian of the projected rows, not of the raw ones."""
    with jax.enable_x64(True):
        x = jax.nn.log_softmax(jnp.asarray(RNG.normal(size=(2, 3, 5))))
        ent = jr.Term("ent", lambda x, b: jnp.sum(jnp.exp(x) * x))
        first = jr.Term("first", lambda x, b: jnp.sum(x[..., 0] ** 2), weight=0.2)
        nll = jr.Term("nll", lambda x, b: -jnp.sum(x[..., 1]))
        outs = [
            jr.compose(
                nll,
                [ent, first],
                track_grad_norms=True,
                grad_conflicts=True,
                grad_space="logits",
                grad_strategy=s,
            )(x)
            for s in ("per_term", "sequential")
        ]
        for a, c in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-10, atol=1e-13)


def test_a_non_finite_term_gradient_gives_a_nan_norm_and_nan_cosines():
    bad = jr.Term("bad", lambda x, b: jnp.sum(jnp.sqrt(x)))  # d/dx sqrt at 0 is inf
    ok = jr.Term("ok", lambda x, b: jnp.sum(x**2))
    out = jr.compose(
        ok, [bad], grad_conflicts=True, track_grad_norms=True, grad_strategy="sequential"
    )(jnp.array([0.0, 1.0]))
    assert not np.isfinite(float(out.regularizers["bad"].grad_norm))
    assert np.isnan(np.asarray(out.grad_cosines)[0, 1])


def test_term_grads_keeps_the_materialised_path():
    t = [jr.Term("a", lambda x, b: jnp.sum(x**2)), jr.Term("b", lambda x, b: jnp.sum(x))]
    x = jnp.array([1.0, 2.0])
    out = jr.compose(t[0], t[1:], term_grads=True, grad_strategy="sequential")(x)
    np.testing.assert_allclose(np.asarray(out.term_grads), [[2.0, 4.0], [1.0, 1.0]])


def _temp_bytes(objective, p, b):
    return jax.jit(objective).lower(p, b).compile().memory_analysis().temp_size_in_bytes


def test_auto_switches_to_sequential_over_the_memory_budget_and_memory_stays_flat():
    """Temp memory with 8 terms: sequential (and auto over budget) at most 3 gradients over
    the plain step, where per_term holds all 8."""
    p = {"w": jnp.asarray(RNG.normal(size=(256, 256)), jnp.float32)}
    b = {"x": jnp.asarray(RNG.normal(size=(4, 256)), jnp.float32)}
    grad_bytes = 256 * 256 * 4

    def apply(q, batch):
        return jnp.tanh(batch["x"] @ q["w"])

    terms = [jr.Term(f"t{k}", lambda y, _, k=k: jnp.mean(y**2) * (k + 1)) for k in range(8)]

    def make(**kw):
        return jr.compose(terms[0], terms[1:], forward=apply, **kw)

    plain = _temp_bytes(make(), p, b)
    per_term = _temp_bytes(make(track_grad_norms=True, grad_strategy="per_term"), p, b)
    seq = _temp_bytes(make(track_grad_norms=True, grad_strategy="sequential"), p, b)
    auto = _temp_bytes(make(track_grad_norms=True, memory_budget=4 * grad_bytes), p, b)
    gram = _temp_bytes(make(grad_conflicts=True, grad_strategy="sequential"), p, b)
    assert per_term > plain + 5 * grad_bytes  # the materialised path holds every gradient
    assert seq <= plain + 2 * grad_bytes
    assert auto == seq
    assert gram <= plain + 3 * grad_bytes
    # Under the budget, auto keeps the materialised path.
    big = _temp_bytes(make(track_grad_norms=True, memory_budget=100 * grad_bytes), p, b)
    assert big == per_term


def test_memory_budget_is_validated():
    with pytest.raises(jr.JaxregError, match="memory_budget"):
        jr.compose(lambda x, b: jnp.sum(x), memory_budget=-1)
