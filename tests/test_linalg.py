"""``grad_space="logits"`` and non-finite norms, against float64 references.

The reference for logit-space gradients is independent of jaxreg: float64 central finite
differences of ``L(log_softmax(z))`` with respect to the logits ``z`` (NumPy only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from jaxreg._src.core.linalg import to_logit_space

B, T, K = 2, 3, 5


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(B, T, K)) * 2.0
    ref = _np_log_softmax(z + rng.normal(size=(B, T, K)))
    onehot = np.eye(K)[rng.integers(0, K, size=(B, T))]
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float64)
    return z, ref, onehot, mask


# NumPy transcriptions of the three terms (the reference side).
def _np_terms(x, ref, onehot, mask):
    n = mask.sum()
    p = np.exp(x)
    nll = -(onehot * x).sum(-1)
    kl = (p * (x - ref)).sum(-1)
    ent = (p * x).sum(-1)  # negative entropy
    return [(v * mask).sum() / n for v in (nll, kl, ent)]


def _jax_terms(ref, onehot, mask):
    def mean(v):
        return jnp.sum(v * mask) / jnp.sum(mask)

    return [
        jr.Term("nll", lambda x, b: mean(-jnp.sum(onehot * x, -1))),
        jr.Term("kl", lambda x, b: mean(jnp.sum(jnp.exp(x) * (x - ref), -1)), weight=0.3),
        jr.Term("entropy", lambda x, b: mean(jnp.sum(jnp.exp(x) * x, -1)), weight=0.01),
    ]


def _fd_logit_grads(z, ref, onehot, mask, eps=1e-6):
    """Each term's gradient with respect to the logits, by central differences."""
    grads = np.zeros((3, *z.shape))
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        fp = _np_terms(_np_log_softmax(zp), ref, onehot, mask)
        fm = _np_terms(_np_log_softmax(zm), ref, onehot, mask)
        for i in range(3):
            grads[i][idx] = (fp[i] - fm[i]) / (2 * eps)
    return grads


@pytest.fixture(scope="module")
def case():
    z, ref, onehot, mask = _setup()
    with jax.enable_x64(True):
        x = jnp.asarray(_np_log_softmax(z))
        terms = _jax_terms(jnp.asarray(ref), jnp.asarray(onehot), jnp.asarray(mask))
        objective = jr.compose(
            terms[0],
            terms[1:],
            track_grad_norms=True,
            grad_conflicts=True,
            term_grads=True,
            grad_space="logits",
        )
        out = objective(x)
        out = jax.tree.map(np.asarray, out)
    return z, ref, onehot, mask, out


def test_logit_space_matches_finite_differences_through_log_softmax(case):
    z, ref, onehot, mask, out = case
    fd = _fd_logit_grads(z, ref, onehot, mask)
    np.testing.assert_allclose(out.term_grads, fd, atol=1e-7)
    norms = np.linalg.norm(fd.reshape(3, -1), axis=1)
    d = out.to_dict()
    assert d["grad_space"] == "logits" and out.grad_space == "logits"
    np.testing.assert_allclose(
        [
            d["base_loss"]["grad_norm"],
            *(d["regularizers"][n]["grad_norm"] for n in ("kl", "entropy")),
        ],
        norms,
        rtol=1e-6,
    )
    flat = fd.reshape(3, -1)
    cos = flat @ flat.T / np.outer(norms, norms)
    np.testing.assert_allclose(out.grad_cosines, cos, atol=1e-6)
    w = np.array([1.0, 0.3, 0.01])
    total = np.tensordot(w, fd, axes=1)
    np.testing.assert_allclose(out.grad, total, atol=1e-7)
    np.testing.assert_allclose(d["total_grad_norm"], np.linalg.norm(total), rtol=1e-6)


def test_kl_at_its_minimum_has_zero_logit_norm_but_not_x_norm():
    """The demo's first step: KL to the base model at exactly 0."""
    z, _, onehot, mask = _setup(1)
    x = jnp.asarray(_np_log_softmax(z), jnp.float32)
    terms = _jax_terms(x, jnp.asarray(onehot, jnp.float32), jnp.asarray(mask, jnp.float32))
    kwargs = dict(track_grad_norms=True, grad_conflicts=True)
    in_x = jr.compose(terms[0], terms[1:], **kwargs)(x).to_dict()
    in_logits = jr.compose(terms[0], terms[1:], grad_space="logits", **kwargs)(x).to_dict()
    assert in_x["grad_space"] == "x"
    assert in_x["regularizers"]["kl"]["grad_norm"] > 0.05  # the misleading x-space figure
    assert in_logits["regularizers"]["kl"]["grad_norm"] < 1e-6  # float32 roundoff of 0


def test_projection_leaves_the_parameter_update_unchanged():
    """``grad`` pulled back through the model's own log_softmax is the same in both spaces."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(B, T, 4)), jnp.float32)
    w0 = jnp.asarray(rng.normal(size=(4, K)), jnp.float32)
    _, ref, onehot, mask = _setup(2)
    terms = _jax_terms(*(jnp.asarray(a, jnp.float32) for a in (ref, onehot, mask)))

    def logprobs(w):
        return jax.nn.log_softmax(h @ w)

    x, pullback = jax.vjp(logprobs, w0)
    grads = {}
    for space in ("x", "logits"):
        for track in (False, True):
            out = jr.compose(terms[0], terms[1:], track_grad_norms=track, grad_space=space)(x)
            grads[space, track] = np.asarray(pullback(out.grad)[0])
    assert not np.allclose(
        jr.compose(terms[0], terms[1:])(x).grad,
        jr.compose(terms[0], terms[1:], grad_space="logits")(x).grad,
    )
    for key, g in grads.items():
        np.testing.assert_allclose(g, grads["x", False], atol=1e-6, err_msg=str(key))


def test_to_logit_space_is_a_projection_with_float64_reference():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 7)) * 5
    x = _np_log_softmax(z)
    g = rng.normal(size=(3, 4, 7))  # stacked rows broadcast over x
    p = np.exp(x)
    expected = g - p * g.sum(-1, keepdims=True)
    with jax.enable_x64(True):
        once = np.asarray(to_logit_space(jnp.asarray(g), jnp.asarray(x)))
        twice = np.asarray(to_logit_space(jnp.asarray(once), jnp.asarray(x)))
    np.testing.assert_allclose(once, expected, atol=1e-12)
    np.testing.assert_allclose(twice, once, atol=1e-12)
    np.testing.assert_allclose(once.sum(-1), 0, atol=1e-12)


def test_logit_space_compiles_once_across_weights():
    _, ref, onehot, mask = _setup(4)
    terms = _jax_terms(*(jnp.asarray(a, jnp.float32) for a in (ref, onehot, mask)))
    objective = jr.compose(terms[0], terms[1:], track_grad_norms=True, grad_space="logits")
    x = jnp.asarray(_np_log_softmax(np.zeros((B, T, K))), jnp.float32)
    for kl in (0.1, 0.2, 0.5):
        objective(x, weights={"kl": kl})
    assert objective.trace_count == 1


def test_logit_space_rejects_inputs_without_a_vocabulary_axis():
    term = jr.Term("t", lambda x, b: jnp.sum(x["a"]) if isinstance(x, dict) else jnp.sum(x))
    with pytest.raises(jr.TermError, match=r"grad_space='logits'.*one floating array"):
        jr.compose(term, grad_space="logits")({"a": jnp.zeros(3)})
    with pytest.raises(jr.TermError, match="vocabulary axis"):
        jr.compose(term, grad_space="logits")(jnp.zeros((3, 1)))
    with pytest.raises(jr.TermError, match="grad_space must be one of"):
        jr.compose(term, grad_space="params")


def test_host_term_gradient_is_projected_too():
    x = jnp.asarray(_np_log_softmax(np.random.default_rng(5).normal(size=(2, K))), jnp.float32)
    p = np.exp(np.asarray(x))

    def host(x, batch, data):
        return float(np.sum(x)), {}, np.ones_like(x)  # gradient 1: all along p (sum)

    objective = jr.compose(
        jr.Term("ent", lambda x, b: jnp.sum(jnp.exp(x) * x)),
        [jr.HostTerm("ones", host, weight=1.0, gradient=True)],
        track_grad_norms=True,
        grad_space="logits",
    )
    out = objective(x)
    ones = np.ones((2, K)) - p * K  # 1 - p * sum(1)
    ent_x = p * (np.asarray(x) + 1)
    ent = ent_x - p * ent_x.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.grad, ent + ones, atol=1e-5)
    np.testing.assert_allclose(out.regularizers["ones"].grad_norm, np.linalg.norm(ones), rtol=1e-5)


# ----------------------------------------------------------------- non-finite norms


@pytest.mark.parametrize("strategy", ["per_term", "vmap"])
def test_nan_gradient_gives_nan_norm_and_check_finite_names_the_term(strategy):
    """Before the fix, a NaN gradient was reported as grad_norm 0.0 and passed checks."""
    x = jnp.array([0.0, 1.0, 4.0])
    objective = jr.compose(
        jr.Term("ok", lambda x, b: jnp.sum(x**2)),
        [jr.Term("bad", lambda x, b: jnp.sum(jnp.sqrt(x) * 0.0))],  # value 0, grad 0*inf
        track_grad_norms=True,
        grad_conflicts=True,
        grad_strategy=strategy,
    )
    out = objective(x)
    d = out.to_dict()
    assert d["regularizers"]["bad"]["value"] == 0.0
    assert np.isnan(d["regularizers"]["bad"]["grad_norm"])
    assert np.isnan(d["total_grad_norm"])
    assert np.isnan(d["grad_cosines"]["ok"]["bad"]) and np.isnan(d["grad_cosines"]["bad"]["bad"])
    with pytest.raises(jr.NonFiniteError, match="term 'bad' \\(gradient\\)") as e:
        jr.check_finite(out)
    if strategy == "per_term":  # exact attribution; one vmap-ed VJP spreads 0 * inf = NaN
        assert np.isfinite(d["base_loss"]["grad_norm"])
        assert e.value.where == {"bad": "gradient"}
    else:
        assert e.value.where["bad"] == "gradient"


def test_infinite_gradient_gives_infinite_norm():
    out = jr.compose(jr.Term("root", lambda x, b: jnp.sum(jnp.sqrt(x))), track_grad_norms=True)(
        jnp.array([0.0, 1.0])
    )
    assert np.isinf(out.to_dict()["base_loss"]["grad_norm"])
