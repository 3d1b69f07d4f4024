"""Built-in losses: the sampling policy's logprobs under one name, and what the default
reductions mean for a weight (against float64 NumPy).

(Values and gradients of every loss under padding are in tests/test_terms.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from jaxreg._src.remote.custom import _pack
from jaxreg._src.remote.wire import Datum

L = jr.losses
RNG = np.random.default_rng(11)
LENGTHS = (5, 3, 6)


def _ragged(low=-3.0, high=-0.1):
    return [RNG.uniform(low, high, size=n) for n in LENGTHS]


X, SAMPLED, ADV = _ragged(), _ragged(), [RNG.normal(size=n) for n in LENGTHS]


def _ref_ppo(lo=0.2, hi=0.2):
    total = 0.0
    for x, s, a in zip(X, SAMPLED, ADV, strict=True):
        r = np.exp(x - s)
        total -= np.sum(np.minimum(r * a, np.clip(r, 1 - lo, 1 + hi) * a))
    return total


def _ref_is():
    return -sum(np.sum(np.exp(x - s) * a) for x, s, a in zip(X, SAMPLED, ADV, strict=True))


@pytest.mark.parametrize(("fn", "ref"), [(L.importance_sampling, _ref_is), (L.ppo, _ref_ppo)])
def test_sampling_logprobs_key_and_the_old_name(fn, ref):
    x, batch = jr.Batch.from_ragged(X, {"sampling_logprobs": SAMPLED, "advantages": ADV})
    assert float(fn(x, batch)[0]) == pytest.approx(ref(), rel=1e-5)
    # The old key gets an error naming the expected one, not a silent misuse ...
    _, old = jr.Batch.from_ragged(X, {"logprobs": SAMPLED, "advantages": ADV})
    name = fn.__name__
    with pytest.raises(jr.InputError) as info:
        fn(x, old)
    message = str(info.value)
    assert f"{name}: batch.inputs['sampling_logprobs']" in message
    assert "batch.inputs['logprobs'] is there" in message
    assert "sampling_logprobs='logprobs'" in message
    # ... also through compose (a TermError naming the term) ...
    with pytest.raises(jr.TermError, match=r"Term 'rl': .*'sampling_logprobs'"):
        jr.compose(jr.Term("rl", fn))(x, old)
    # ... and the option reads any name.
    assert float(fn(sampling_logprobs="logprobs")(x, old)[0]) == pytest.approx(ref(), rel=1e-5)


def test_tinker_logprobs_arrive_as_sampling_logprobs():
    datums = [
        Datum(np.arange(n), {"logprobs": s.astype(np.float32), "advantages": a})
        for n, s, a in zip(LENGTHS, SAMPLED, ADV, strict=True)
    ]
    x, batch = _pack(datums, X, "pow2", None)
    assert sorted(batch.inputs) == ["advantages", "sampling_logprobs"]
    assert float(L.ppo(x, batch)[0]) == pytest.approx(_ref_ppo(), rel=1e-5)
    with pytest.raises(KeyError, match=r"batch\['sampling_logprobs'\] \(Tinker's"):
        batch["logprobs"]
    both = [Datum(d.tokens, {**d.loss_fn_inputs, "sampling_logprobs": s})
            for d, s in zip(datums, SAMPLED, strict=True)]  # fmt: skip
    with pytest.raises(jr.InputError, match="both 'logprobs'"):
        _pack(both, X, "pow2", None)


def test_default_reductions_and_what_a_weight_means():
    """The numbers of docs/terms.md, "Reductions and weights", on a small batch."""
    ref = _ragged()
    x, batch = jr.Batch.from_ragged(X, {"ref_logprobs": ref})
    n = sum(LENGTHS)
    xs, qs = np.concatenate(X), np.concatenate(ref)
    dkl = 1 - np.exp(qs - xs)  # d/dx of the k3 estimate e^(q-x) - (q-x) - 1
    nll = jr.Term("nll", L.cross_entropy)  # "sum": -sum x, gradient -1 per token
    for reduction, per_token_weight in (("token_mean", 0.1 / n), ("sum", 0.1)):
        kl = jr.Term("kl", jr.regularizers.kl(reduction=reduction), weight=0.1)
        out = jr.compose(nll, [kl])(x, batch)
        got = np.concatenate(batch.unpad(out.grad))
        np.testing.assert_allclose(got, -1 + per_token_weight * dkl, rtol=1e-5, atol=1e-7)
    # A "token_mean" loss is the "sum" divided by the number of real tokens.
    total = float(L.cross_entropy(x, batch)[0])
    assert total == pytest.approx(-xs.sum(), rel=1e-6)
    mean = float(L.cross_entropy(reduction="token_mean")(x, batch)[0])
    assert mean == pytest.approx(total / n, rel=1e-6)


def test_dpo_and_metrics_share_the_masked_mean():
    # Rows 2i / 2i + 1 are (chosen, rejected); an empty pair is left out of the mean.
    xs = [np.array([-1.0, -2.0]), np.array([-3.0]), np.zeros(0), np.zeros(0)]
    refs = [np.array([-1.5, -2.0]), np.array([-2.0]), np.zeros(0), np.zeros(0)]
    x, batch = jr.Batch.from_ragged(xs, {"ref_logprobs": refs})
    loss, m = L.dpo(beta=0.5)(x, batch)
    margin = 0.5 * ((-3.0 - -3.5) - (-3.0 - -2.0))
    assert float(loss) == pytest.approx(np.log1p(np.exp(-margin)), rel=1e-6)
    assert float(m["margin"]) == pytest.approx(margin, rel=1e-6)
    assert float(m["accuracy"]) == 1.0
    with jax.numpy_dtype_promotion("strict"):
        assert jnp.asarray(loss).dtype == jnp.float32
