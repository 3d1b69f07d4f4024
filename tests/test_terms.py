"""Built-in losses and regularizers vs independent float64 NumPy references on ragged data.

Each reference works on the ragged per-datum lists directly (no padding, no mask), so it
checks the padded JAX implementation's values, gradients and padding exactness at once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr

L, R = jr.losses, jr.regularizers
LENGTHS = [5, 3, 8, 0, 6, 2]
K = 3
RNG = np.random.default_rng(42)


def ragged(k=None, low=-3.0, high=-0.05):
    shape = (lambda n: (n,)) if k is None else (lambda n: (n, k))
    return [RNG.uniform(low, high, size=shape(n)) for n in LENGTHS]


DATA = {
    "x": ragged(),
    "weights": [RNG.uniform(0, 1, size=n) for n in LENGTHS],
    "sampling_logprobs": ragged(),
    "ref_logprobs": ragged(),
    "advantages": [RNG.normal(size=n) for n in LENGTHS],
    "view": ragged(),
}
DATA_K = {"x": ragged(K, -4, 0), "ref_logprobs": ragged(K, -4, 0), "weights": ragged(K, 0, 1)}


def pack(data, bucket="pow2"):
    inputs = {k: v for k, v in data.items() if k != "x"}
    return jr.Batch.from_ragged(data["x"], inputs, bucket=bucket)


def tokens(values):
    return np.concatenate([np.reshape(v, (len(v), -1)) for v in values]) if values else None


# ---------------------------------------------------------------- float64 references


def ref_ce(xs, d):
    return -sum(np.sum(w * x) for x, w in zip(xs, d["weights"], strict=True))


def ref_is(xs, d):
    return -sum(
        np.sum(np.exp(x - s) * a)
        for x, s, a in zip(xs, d["sampling_logprobs"], d["advantages"], strict=True)
    )


def ref_ppo(xs, d, lo=0.2, hi=0.2):
    total = 0.0
    for x, s, a in zip(xs, d["sampling_logprobs"], d["advantages"], strict=True):
        r = np.exp(x - s)
        total -= np.sum(np.minimum(r * a, np.clip(r, 1 - lo, 1 + hi) * a))
    return total


def ref_dpo(xs, d, beta=0.1):
    losses = []
    for i in range(0, len(xs), 2):
        c = np.sum(d["weights"][i] * (xs[i] - d["ref_logprobs"][i]))
        r = np.sum(d["weights"][i + 1] * (xs[i + 1] - d["ref_logprobs"][i + 1]))
        if len(xs[i]) + len(xs[i + 1]) == 0:
            continue
        losses.append(np.log1p(np.exp(-beta * (c - r))))
    return np.mean(losses)


def token_mean(per):
    flat = np.concatenate(per)
    return flat.sum() / max(len(flat), 1)


def ref_entropy(xs, d):
    return token_mean([x for x in xs])  # maximise: loss = -H = mean(x)


def ref_entropy_k(xs, d):
    def h(x):
        logp = x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))
        return -np.sum(np.exp(logp) * logp, axis=-1)

    return -token_mean([h(x) for x in xs])


def ref_kl(direction):
    def fn(xs, d):
        per = []
        for x, q in zip(xs, d["ref_logprobs"], strict=True):
            lr = q - x
            rev = np.exp(lr) - lr - 1
            fwd = np.exp(lr) * lr - np.exp(lr) + 1
            per.append({"reverse": rev, "forward": fwd, "symmetric": rev + fwd}[direction])
        return token_mean(per)

    return fn


def ref_kl_k(xs, d):
    return token_mean(
        [np.sum(np.exp(x) * (x - q), axis=-1) for x, q in zip(xs, d["ref_logprobs"], strict=True)]
    )


def ref_l1(xs, d):
    return sum(np.sum(np.abs(x)) for x in xs)


def ref_l2_center(xs, d):
    return sum(np.sum((x - c) ** 2) for x, c in zip(xs, d["ref_logprobs"], strict=True))


def ref_elastic(xs, d):
    return 0.3 * ref_l1(xs, d) + 0.7 * sum(np.sum(x**2) for x in xs)


def ref_smooth(xs, d):
    return token_mean([np.diff(x) ** 2 for x in xs])


def ref_consistency_pairs(xs, d):
    per = []
    for i in range(0, len(xs), 2):
        n = min(len(xs[i]), len(xs[i + 1]))
        per.append((xs[i][:n] - xs[i + 1][:n]) ** 2)
    return token_mean(per)


def ref_consistency_other(xs, d):
    return token_mean([(x - v) ** 2 for x, v in zip(xs, d["view"], strict=True)])


def ref_confidence(xs, d):
    return token_mean([np.maximum(0, x - np.log(0.5)) for x in xs])


def ref_length(xs, d):
    return sum(np.sum(x[4:]) for x in xs)


CASES = [
    ("cross_entropy", L.cross_entropy, ref_ce),
    (
        "cross_entropy_token_mean",
        L.cross_entropy(reduction="token_mean"),
        lambda xs, d: ref_ce(xs, d) / sum(LENGTHS),
    ),
    ("importance_sampling", L.importance_sampling, ref_is),
    ("ppo", L.ppo, ref_ppo),
    ("ppo_asymmetric", L.ppo(clip_low=0.1, clip_high=0.3), lambda xs, d: ref_ppo(xs, d, 0.1, 0.3)),
    ("dpo", L.dpo, ref_dpo),
    ("entropy", R.entropy, ref_entropy),
    ("kl_reverse", R.kl, ref_kl("reverse")),
    ("kl_forward", R.kl(direction="forward"), ref_kl("forward")),
    ("kl_symmetric", R.kl(direction="symmetric"), ref_kl("symmetric")),
    ("l1", R.l1, ref_l1),
    ("l2_center", R.l2(center="ref_logprobs"), ref_l2_center),
    ("elastic_net", R.elastic_net(l1_ratio=0.3), ref_elastic),
    ("smoothness", R.smoothness, ref_smooth),
    ("consistency_pairs", R.consistency, ref_consistency_pairs),
    ("consistency_other", R.consistency(other="view"), ref_consistency_other),
    ("confidence_penalty", R.confidence_penalty(max_prob=0.5), ref_confidence),
    ("length_penalty", R.length_penalty(max_length=4), ref_length),
]
CASES_K = [
    ("cross_entropy_k", L.cross_entropy, ref_ce),
    ("entropy_k_renormalized", R.entropy(renormalize=True), ref_entropy_k),
    ("kl_k_reverse", R.kl, ref_kl_k),
]


def numeric_grad(ref, data, eps=1e-6):
    xs = [np.array(x, np.float64) for x in data["x"]]
    grads = []
    for x in xs:
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            up = ref(xs, data)
            x[idx] = old - eps
            down = ref(xs, data)
            x[idx] = old
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def value(fn):
    return lambda x, b: (lambda out: out[0] if isinstance(out, tuple) else out)(fn(x, b))


@pytest.mark.parametrize(
    ("name", "fn", "ref"), CASES + CASES_K, ids=[c[0] for c in CASES + CASES_K]
)
def test_value_gradient_and_padding(name, fn, ref):
    data = DATA_K if name.endswith(("_k", "_k_renormalized", "_k_reverse")) else DATA
    x, batch = pack(data)
    loss, grad = jax.value_and_grad(value(fn))(x, batch)
    expected = ref(data["x"], data)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=1e-5)
    expected_grad = numeric_grad(ref, data)
    got = batch.unpad(grad)
    for i, (g, e) in enumerate(zip(got, expected_grad, strict=True)):
        np.testing.assert_allclose(g, e, rtol=2e-3, atol=2e-4, err_msg=f"{name} datum {i}")
    # Padded positions get exactly zero gradient, even when padding holds NaN.
    pad = np.asarray(batch.mask) == 0
    np.testing.assert_array_equal(np.asarray(grad)[pad], 0)
    poisoned = jnp.where(jnp.asarray(pad).reshape(pad.shape + (1,) * (x.ndim - 2)), jnp.nan, x)
    loss_p, grad_p = jax.value_and_grad(value(fn))(poisoned, batch)
    assert float(loss_p) == float(loss)
    np.testing.assert_array_equal(np.asarray(grad_p), np.asarray(grad))
    # More padding changes neither the value nor the gradient on real tokens.
    x16, batch16 = pack(data, bucket=16)
    loss16, grad16 = jax.value_and_grad(value(fn))(x16, batch16)
    np.testing.assert_allclose(float(loss16), float(loss), rtol=1e-6, atol=1e-7)
    for a, b in zip(batch16.unpad(grad16), got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "fn", "ref"), CASES + CASES_K, ids=[c[0] for c in CASES + CASES_K]
)
def test_extreme_logprobs_stay_finite(name, fn, ref):
    data = DATA_K if name.endswith(("_k", "_k_renormalized", "_k_reverse")) else DATA
    x, batch = pack(data)
    for fill in (-1e4, 0.0):
        extreme = jnp.full_like(x, fill)
        inputs = dict(batch.inputs)
        for key in ("sampling_logprobs", "ref_logprobs", "view"):
            if key in inputs:
                inputs[key] = jnp.full_like(inputs[key], fill)
        b = jr.Batch(batch.mask, inputs)
        loss, grad = jax.value_and_grad(value(fn))(extreme, b)
        assert np.isfinite(float(loss)), (name, fill)
        assert np.all(np.isfinite(np.asarray(grad))), (name, fill)


def test_dpo_metrics_against_reference():
    x, batch = pack(DATA)
    _, metrics = L.dpo(x, batch)
    rewards = [
        0.1 * np.sum(w * (x_ - r))
        for x_, r, w in zip(DATA["x"], DATA["ref_logprobs"], DATA["weights"], strict=True)
    ]
    pairs = [(rewards[i], rewards[i + 1]) for i in range(0, 6, 2)]
    margins = [c - r for c, r in pairs]
    assert float(metrics["accuracy"]) == pytest.approx(np.mean([m > 0 for m in margins]))
    assert float(metrics["margin"]) == pytest.approx(np.mean(margins), rel=1e-5)
    assert float(metrics["chosen_reward"]) == pytest.approx(
        np.mean([c for c, _ in pairs]), rel=1e-5
    )


def test_kl_metrics_and_reductions():
    x, batch = pack(DATA)
    pairs = zip(DATA["x"], DATA["ref_logprobs"], strict=True)
    per = np.concatenate([np.exp(q - x_) - (q - x_) - 1 for x_, q in pairs])
    _, m = R.kl(x, batch)
    assert float(m["max"]) == pytest.approx(per.max(), rel=1e-5)
    assert float(m["min"]) == pytest.approx(per.min(), rel=1e-4, abs=1e-7)
    assert float(m["mean"]) == pytest.approx(per.mean(), rel=1e-5)
    seq = R.kl(reduction="seq_mean")(x, batch)[0]
    per_seq = [
        np.mean(np.exp(q - x_) - (q - x_) - 1)
        for x_, q in zip(DATA["x"], DATA["ref_logprobs"], strict=True)
        if len(x_)
    ]
    assert float(seq) == pytest.approx(np.mean(per_seq), rel=1e-5)
    total = R.kl(reduction="sum")(x, batch)[0]
    assert float(total) == pytest.approx(per.sum(), rel=1e-5)


@pytest.mark.parametrize(
    ("fn", "batch_fn", "message"),
    [
        (
            L.importance_sampling,
            lambda b: jr.Batch(b.mask, {}),
            "importance_sampling: batch.inputs['sampling_logprobs'] is missing",
        ),
        (R.kl, lambda b: jr.Batch(b.mask[:, :4], b.inputs), "batch.mask must be [B, T]"),
        (R.kl("nope"), lambda b: b, "batch.inputs['nope'] is missing"),
        (
            L.dpo,
            lambda b: jr.Batch(b.mask[:5], {k: v[:5] for k, v in b.inputs.items()}),
            "B must be even; found B = 5",
        ),
        (R.entropy, lambda b: {"mask": b.mask}, "batch must be a jaxreg.Batch"),
        (R.kl(direction="sideways"), lambda b: b, "direction must be one of"),
        (L.cross_entropy(reduction="median"), lambda b: b, "reduction must be one of"),
    ],
)
def test_bad_input_names_term_and_field(fn, batch_fn, message):
    x, batch = pack(DATA)
    if "B = 5" in message:
        x = x[:5]
    objective = jr.compose(None, [jr.Term("reg", fn)])
    with pytest.raises(jr.TermError) as info:
        objective(x, batch_fn(batch))
    assert "Term 'reg':" in str(info.value)
    assert message in str(info.value)


def test_wrong_rank_is_reported():
    _, batch = pack(DATA)
    with pytest.raises(jr.TermError, match=r"x \(logprobs\) must be \[B, T\] or \[B, T, K\]"):
        jr.compose(jr.Term("nll", L.cross_entropy))(jnp.zeros(3), batch)


def test_term_function_configuration():
    assert R.kl("ref").options == {"ref": "ref"}
    assert R.kl(direction="forward").options == {"direction": "forward"}
    with pytest.raises(TypeError, match="unknown options"):
        R.kl(drection="forward")
    assert "kl(" in repr(R.kl(direction="forward"))
