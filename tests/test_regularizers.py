"""Built-in regularizers on model code: classifier outputs ``[B, K]`` (entropy, KL) and
optax-style ``mask=`` / integer leaves for the norms, against float64 NumPy closed forms.

(Token-batch behaviour is in tests/test_terms.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr

R = jr.regularizers
RNG = np.random.default_rng(3)


def log_softmax64(z):
    z = np.asarray(z, np.float64)
    m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def entropy64(z):
    logp = log_softmax64(z)
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):  # 0 * -inf where a class is masked out
        return -np.sum(np.where(p > 0, p * logp, 0.0), axis=-1)


def kl64(z, r):
    """KL(softmax(z) || softmax(r)) per row, float64."""
    logp, logq = log_softmax64(z), log_softmax64(r)
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p > 0, p * (logp - logq), 0.0), axis=-1)


# Hard inputs: a near one-hot row, a uniform row, a row with masked (-inf) classes,
# and a row of large logits.
LOGITS = np.array(
    [
        [30.0, 0.0, -30.0, 1.0, 0.5],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, -np.inf, 2.0, -np.inf, 0.5],
        [300.0, 301.0, 299.5, 250.0, 300.2],
    ],
    np.float32,
)
REF = np.array(
    [
        [0.0, 1.0, 0.0, -1.0, 2.0],
        [3.0, -2.0, 0.5, 0.0, 1.0],
        [0.0, -np.inf, 0.0, -np.inf, 0.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ],
    np.float32,
)


# ------------------------------------------------------------- classifier outputs


def test_entropy_on_classifier_logits_matches_numpy():
    h = entropy64(LOGITS)
    loss, metrics = R.entropy(jnp.asarray(LOGITS))
    assert float(loss) == pytest.approx(-h.mean(), rel=1e-5, abs=1e-6)
    assert float(metrics["mean"]) == pytest.approx(h.mean(), rel=1e-5, abs=1e-6)
    minimize = R.entropy(mode="minimize", reduction="sum")(jnp.asarray(LOGITS))[0]
    assert float(minimize) == pytest.approx(h.sum(), rel=1e-5, abs=1e-6)
    # Log-probabilities give the same as the logits they come from.
    logp = jnp.asarray(log_softmax64(LOGITS), jnp.float32)
    assert float(R.entropy(logp)[0]) == pytest.approx(-h.mean(), rel=1e-5, abs=1e-6)


def test_entropy_gradient_on_logits_is_the_closed_form():
    z = np.where(np.isfinite(LOGITS), LOGITS, -np.inf)
    grad = jax.grad(lambda x: R.entropy(x)[0])(jnp.asarray(z))
    logp = log_softmax64(z)
    p = np.exp(logp)
    h = entropy64(z)[:, None]
    # dH/dz_k = -p_k (log p_k + H); the loss is -mean_b H_b.
    expected = p * (np.where(p > 0, logp, 0.0) + h) / len(z)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("direction", ["reverse", "forward", "symmetric"])
def test_kl_on_classifier_outputs_matches_numpy(direction):
    forward, reverse = kl64(REF, LOGITS), kl64(LOGITS, REF)
    per = {"reverse": reverse, "forward": forward, "symmetric": forward + reverse}[direction]
    x = jnp.asarray(LOGITS)
    # The reference as an array ...
    loss, m = R.kl(ref=jnp.asarray(REF), direction=direction)(x)
    assert float(loss) == pytest.approx(per.mean(), rel=1e-5, abs=1e-6)
    assert float(m["max"]) == pytest.approx(per.max(), rel=1e-5)
    assert float(m["min"]) == pytest.approx(per.min(), rel=1e-4, abs=1e-6)
    # ... or as a key of the data dict a model stage passes as the batch.
    data = {"images": jnp.zeros((4, 2)), "teacher": jnp.asarray(REF)}
    by_key = R.kl(ref="teacher", direction=direction, reduction="sum")(x, data)[0]
    assert float(by_key) == pytest.approx(per.sum(), rel=1e-5, abs=1e-6)
    # `where` restricts the mean to the chosen rows.
    keep = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    restricted = R.kl(ref=jnp.asarray(REF), direction=direction, where=jnp.asarray(keep))(x)[0]
    assert float(restricted) == pytest.approx(per[keep > 0].mean(), rel=1e-5, abs=1e-6)


def test_kl_on_classifier_outputs_gradient_and_float64():
    with jax.enable_x64(True):
        z = RNG.normal(size=(3, 4)) * 3
        r = RNG.normal(size=(3, 4))
        loss, grad = jax.value_and_grad(lambda x: R.kl(ref=jnp.asarray(r))(x)[0])(jnp.asarray(z))
        assert grad.dtype == jnp.float64
        assert float(loss) == pytest.approx(kl64(z, r).mean(), rel=1e-12)
        # d KL(p||q)/dz_k = p_k ((log p_k - log q_k) - KL), averaged over rows.
        logp, logq = log_softmax64(z), log_softmax64(r)
        p = np.exp(logp)
        expected = p * ((logp - logq) - kl64(z, r)[:, None]) / len(z)
        np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-10, atol=1e-14)


def test_classifier_terms_under_compose_and_one_argument_call():
    objective = jr.compose(
        None,
        [
            jr.Term("entropy", R.entropy, weight=0.1),
            jr.Term("kl", R.kl(ref="teacher"), weight=0.5),
        ],
    )
    data = {"teacher": jnp.asarray(REF)}
    out = objective(jnp.asarray(LOGITS), data)
    expected = -0.1 * entropy64(LOGITS).mean() + 0.5 * kl64(LOGITS, REF).mean()
    assert float(out.loss_total) == pytest.approx(expected, rel=1e-5)
    # `fn(x)` evaluates with batch=None; numbers and names still configure.
    assert float(R.entropy(jnp.asarray(LOGITS))[0]) == pytest.approx(
        -entropy64(LOGITS).mean(), rel=1e-5
    )
    assert R.elastic_net(0.3).options == {"l1_ratio": 0.3}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: R.kl(jnp.zeros((2, 3))), "ref='ref_logprobs' names a batch input"),
        (lambda: R.kl(ref=jnp.zeros((2, 4)))(jnp.zeros((2, 3))), "ref must be shaped (2, 3)"),
        (lambda: R.entropy(jnp.zeros(3)), "x must be classifier outputs [B, K]"),
        (
            lambda: R.entropy(jnp.zeros((2, 3)), {"mask": jnp.ones((2, 3))}),
            "batch must be a jaxreg.Batch",
        ),
        (
            lambda: R.kl(ref="t", where=jnp.ones(3))(jnp.zeros((2, 3)), {"t": jnp.zeros((2, 3))}),
            "where must be shaped (2,)",
        ),
    ],
)
def test_classifier_input_errors_name_the_field(call, message):
    with pytest.raises(jr.InputError) as info:
        call()
    assert message in str(info.value)


# ------------------------------------------------------------- norms: mask= and ints


def _params():
    return {
        "dense": {"w": RNG.normal(size=(3, 2)), "b": RNG.normal(size=(2,))},
        "norm": {"scale": RNG.normal(size=(2,))},
        "out": {"w": RNG.normal(size=(2, 4)), "b": RNG.normal(size=(4,))},
    }


def _as_jax(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _weights_only(p):
    return jax.tree.map(lambda a: a.ndim > 1, p)


def test_mask_callable_excludes_biases_and_scales():
    p = _params()
    kernels = [p["dense"]["w"], p["out"]["w"]]
    center = jax.tree.map(lambda a: a * 0.5, p)
    diffs = [p["dense"]["w"] * 0.5, p["out"]["w"] * 0.5]
    l2, m2 = R.l2(mask=_weights_only)(_as_jax(p))
    assert float(l2) == pytest.approx(sum(np.sum(k**2) for k in kernels), rel=1e-5)
    assert float(m2["norm"]) == pytest.approx(np.sqrt(sum(np.sum(k**2) for k in kernels)), rel=1e-5)
    l1, m1 = R.l1(mask=_weights_only)(_as_jax(p))
    assert float(l1) == pytest.approx(sum(np.sum(np.abs(k)) for k in kernels), rel=1e-5)
    assert float(m1["max_abs"]) == pytest.approx(max(np.abs(k).max() for k in kernels), rel=1e-6)
    en, parts = R.elastic_net(l1_ratio=0.3, center=_as_jax(center), mask=_weights_only)(_as_jax(p))
    a = sum(np.sum(np.abs(d)) for d in diffs)
    b = sum(np.sum(d**2) for d in diffs)
    assert float(en) == pytest.approx(0.3 * a + 0.7 * b, rel=1e-5)
    assert float(parts["l1"]) == pytest.approx(a, rel=1e-5)
    # The masked-out leaves get exactly zero gradient through compose.
    objective = jr.compose(None, [jr.Term("l2", R.l2(mask=_weights_only), weight=0.5)])
    grad = objective(_as_jax(p)).grad
    np.testing.assert_allclose(np.asarray(grad["dense"]["w"]), p["dense"]["w"], rtol=1e-6)
    for leaf in (grad["dense"]["b"], grad["norm"]["scale"], grad["out"]["b"]):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_mask_pytree_and_prefix_as_optax():
    p = _params()
    mask = {"dense": {"w": True, "b": False}, "norm": False, "out": True}  # a prefix
    chosen = [p["dense"]["w"], p["out"]["w"], p["out"]["b"]]
    value = R.l2(mask=mask)(_as_jax(p))[0]
    assert float(value) == pytest.approx(sum(np.sum(a**2) for a in chosen), rel=1e-5)
    nothing = R.l1(mask=jax.tree.map(lambda _: False, p))(_as_jax(p))
    assert float(nothing[0]) == 0.0 and float(nothing[1]["max_abs"]) == 0.0


def test_mask_errors_name_the_structure():
    p = _as_jax(_params())
    with pytest.raises(jr.InputError, match="mask must be a pytree of bools"):
        R.l2(mask={"dense": True})(p)
    with pytest.raises(jr.InputError, match="mask leaves must be bools"):
        R.l2(mask=jax.tree.map(lambda a: 1.0, p))(p)
    with pytest.raises(jr.InputError, match="traced"):
        jax.jit(lambda p: R.l2(mask=jax.tree.map(lambda a: jnp.sum(a) > 0, p))(p)[0])(p)


def test_integer_leaves_are_skipped_under_jax_grad():
    floats = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([0.25, -1.0])}
    step = jnp.asarray(1000, jnp.int32)
    flag = jnp.asarray(True)

    def penalty(f):
        params = {**f, "step": step, "flag": flag}
        return R.l2(params)[0] + R.l1(params)[0] + R.elastic_net(params)[0]

    value, grad = jax.value_and_grad(penalty)(floats)  # no allow_int anywhere
    flat = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in floats.values()])
    expected = (
        np.sum(flat**2) + np.sum(np.abs(flat)) + 0.5 * (np.sum(np.abs(flat)) + np.sum(flat**2))
    )
    assert float(value) == pytest.approx(expected, rel=1e-6)
    for k, a in floats.items():
        a64 = np.asarray(a, np.float64)
        np.testing.assert_allclose(
            np.asarray(grad[k]), 2 * a64 + np.sign(a64) + 0.5 * (np.sign(a64) + 2 * a64), rtol=1e-6
        )
    # A pytree of integers only is a zero penalty.
    assert float(R.l2({"step": step})[0]) == 0.0
