"""compose(..., forward=): one shared model forward, terms on outputs or on parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr

RNG = np.random.default_rng(7)
B, D, H, K = 6, 5, 4, 3
PARAMS = {
    "w1": jnp.asarray(RNG.normal(size=(D, H)), jnp.float32),
    "b1": jnp.asarray(RNG.normal(size=(H,)), jnp.float32),
    "w2": jnp.asarray(RNG.normal(size=(H, K)), jnp.float32),
}
ANCHOR = jax.tree.map(lambda p: p * 0.5, PARAMS)
BATCH = {
    "x": jnp.asarray(RNG.normal(size=(B, D)), jnp.float32),
    "y": jnp.asarray(RNG.integers(0, K, size=B), jnp.int32),
}
FORWARD_CALLS = []


def forward(params, batch):
    FORWARD_CALLS.append(1)
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return h @ params["w2"]  # logits [B, K]


def ce(logits, batch):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def neg_entropy(logits, batch):
    logp = jax.nn.log_softmax(logits)
    return jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def l2(params, batch):
    return sum(jnp.sum(p**2) for p in jax.tree.leaves(params))


def l2_sp(params, batch):
    return sum(
        jnp.sum((p - a) ** 2)
        for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(ANCHOR), strict=True)
    )


TERMS = [
    jr.Term("ent", neg_entropy, 0.3),
    jr.Term("l2", l2, 1e-2, on="params"),
    jr.Term("sp", l2_sp, 0.1, on="params"),
]
WEIGHTS = {"ce": 1.0, "ent": 0.3, "l2": 1e-2, "sp": 0.1}


def reference():
    """Each term's gradient by its own jax.grad through the model, reduced in float64."""
    fns = {
        "ce": lambda p: ce(forward(p, BATCH), BATCH),
        "ent": lambda p: neg_entropy(forward(p, BATCH), BATCH),
        "l2": lambda p: l2(p, BATCH),
        "sp": lambda p: l2_sp(p, BATCH),
    }
    values = {k: float(f(PARAMS)) for k, f in fns.items()}
    grads = {
        k: np.concatenate(
            [np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(jax.grad(f)(PARAMS))]
        )
        for k, f in fns.items()
    }
    return values, grads


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.mark.parametrize("strategy", ["per_term", "vmap", [("ce", "ent", "l2")]])
def test_per_term_gradients_match_each_terms_own_grad(ref, strategy):
    values, grads = ref
    objective = jr.compose(
        jr.Term("ce", ce),
        TERMS,
        forward=forward,
        track_grad_norms=True,
        term_grads=True,
        grad_conflicts=True,
        grad_strategy=strategy,
    )
    out = objective(PARAMS, BATCH)
    names = list(out.term_names)
    assert names == ["ce", "ent", "l2", "sp"]
    for name in names:
        assert float(out.terms[name].value) == pytest.approx(values[name], rel=1e-5)
        assert float(out.terms[name].grad_norm) == pytest.approx(
            np.linalg.norm(grads[name]), rel=1e-4
        )
    rows = np.stack(
        [
            np.concatenate(
                [np.ravel(np.asarray(leaf[i])) for leaf in jax.tree.leaves(out.term_grads)]
            )
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(rows, np.stack([grads[n] for n in names]), rtol=1e-4, atol=1e-6)
    g = np.stack([grads[n] for n in names])
    norms = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(out.grad_cosines, (g @ g.T) / np.outer(norms, norms), atol=1e-5)
    total = sum(WEIGHTS[n] * grads[n] for n in names)
    flat_grad = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(out.grad)])
    np.testing.assert_allclose(flat_grad, total, rtol=1e-4, atol=1e-6)
    assert float(out.total_grad_norm) == pytest.approx(np.linalg.norm(total), rel=1e-4)


def test_the_model_runs_once_per_trace_and_weights_do_not_recompile(ref):
    values, grads = ref
    for flags in ({}, {"track_grad_norms": True}):
        objective = jr.compose(jr.Term("ce", ce), TERMS, forward=forward, **flags)
        FORWARD_CALLS.clear()
        out = objective(PARAMS, BATCH)
        assert len(FORWARD_CALLS) == 1, flags  # one forward, shared by every term
        objective(PARAMS, BATCH, weights={"ent": 2.0, "sp": 0.0})
        out2 = objective(PARAMS, BATCH, weights={"ent": 0.5})
        assert objective.trace_count == 1
        assert float(out.loss_total) == pytest.approx(
            sum(WEIGHTS[n] * values[n] for n in WEIGHTS), rel=1e-5
        )
        w = dict(WEIGHTS, ent=0.5)
        expected = sum(w[n] * grads[n] for n in w)
        flat = np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(out2.grad)])
        np.testing.assert_allclose(flat, expected, rtol=1e-4, atol=1e-6)


def test_plain_and_tracked_agree_and_work_under_jit_and_scan():
    objective = jr.compose(jr.Term("ce", ce), TERMS, forward=forward, track_grad_norms=True)
    plain = jr.compose(jr.Term("ce", ce), TERMS, forward=forward)

    def step(params, _):
        out = objective(params, BATCH)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, out.grad), out.as_arrays()

    _, history = jax.lax.scan(step, PARAMS, length=3)
    assert history["base_loss"]["grad_norm"].shape == (3,)
    assert history["regularizers"]["sp"]["contribution"].shape == (3,)
    assert float(history["loss_total"][-1]) < float(history["loss_total"][0])
    np.testing.assert_allclose(
        jax.tree.leaves(plain(PARAMS, BATCH).grad)[0],
        jax.tree.leaves(objective(PARAMS, BATCH).grad)[0],
        rtol=1e-5,
    )


def test_model_stage_errors_name_the_fix():
    with pytest.raises(jr.TermError, match=r"on='params'.*forward=apply_fn"):
        jr.compose(jr.Term("ce", ce), [jr.Term("l2", l2, on="params")])
    with pytest.raises(jr.TermError, match="on must be one of"):
        jr.Term("l2", l2, on="parameters")
    with pytest.raises(jr.TermError, match="forward must be callable"):
        jr.compose(jr.Term("ce", ce), forward="model")
    with pytest.raises(jr.TermError, match="grad_space='x'"):
        jr.compose(jr.Term("ce", ce), forward=forward, grad_space="logits")
    host = jr.HostTerm("check", lambda x, b, d: 0.0)
    with pytest.raises(jr.TermError, match="host terms"):
        jr.compose(jr.Term("ce", ce), [host], forward=forward)


def test_integer_leaves_are_named_with_the_fix():
    # Before: JAX's "float0"/"allow_int" TypeError, naming neither the leaf nor a fix.
    params = dict(PARAMS, step=jnp.asarray(3, jnp.int32))
    objective = jr.compose(
        jr.Term("ce", ce), [jr.Term("l2", l2, 1e-2, on="params")], forward=forward
    )
    with pytest.raises(jr.TermError, match=r"\['step'\] \(int32\).*eqx.partition"):
        objective(params, BATCH)
    with pytest.raises(jr.TermError, match="non-floating leaves"):
        jr.compose(jr.Term("s", lambda x, b: jnp.sum(x).astype(jnp.float32)))(jnp.arange(3))


def test_forward_aux_returns_the_models_state_from_the_shared_forward():
    # A BatchNorm-like running statistic, updated by the forward the terms read.
    def forward_with_stats(params, batch):
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        stats = 0.9 * batch["running_mean"] + 0.1 * jnp.mean(h, axis=0)
        return h @ params["w2"], {"running_mean": stats}

    batch = dict(BATCH, running_mean=jnp.zeros(H))
    h = np.tanh(np.asarray(BATCH["x"]) @ np.asarray(PARAMS["w1"]) + np.asarray(PARAMS["b1"]))
    expected = 0.1 * h.mean(axis=0)
    for flags in ({}, {"track_grad_norms": True, "term_grads": True}):
        objective = jr.compose(
            jr.Term("ce", ce), TERMS, forward=forward_with_stats, forward_has_aux=True, **flags
        )
        out = objective(PARAMS, batch)
        np.testing.assert_allclose(out.aux["running_mean"], expected, rtol=1e-5, atol=1e-7)
        plain = jr.compose(jr.Term("ce", ce), TERMS, forward=forward, **flags)(PARAMS, BATCH)
        for a, b in zip(jax.tree.leaves(out.grad), jax.tree.leaves(plain.grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # aux is not differentiated
    with pytest.raises(jr.NotComputedError, match="forward_has_aux=True"):
        _ = jr.compose(jr.Term("ce", ce), forward=forward)(PARAMS, BATCH).aux
    with pytest.raises(jr.TermError, match=r"pair \(outputs, aux\)"):
        jr.compose(jr.Term("ce", ce), forward=forward, forward_has_aux=True)(PARAMS, BATCH)
    with pytest.raises(jr.TermError, match="forward=apply_fn"):
        jr.compose(jr.Term("ce", ce), forward_has_aux=True)
