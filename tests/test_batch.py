"""Batch.from_ragged / unpad round trips, buckets, per_datum lifting, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxreg as jr


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    k=st.one_of(st.none(), st.integers(1, 4)),
    bucket=st.sampled_from(["pow2", 16, None, [8, 32, 64]]),
    seed=st.integers(0, 2**16),
)
def test_round_trip(lengths, k, bucket, seed):
    rng = np.random.default_rng(seed)
    shape = (lambda n: (n,)) if k is None else (lambda n: (n, k))
    logprobs = [rng.normal(size=shape(n)).astype(np.float32) for n in lengths]
    tokens = [rng.integers(0, 100, size=shape(n)) for n in lengths]
    x, batch = jr.Batch.from_ragged(logprobs, {"target_tokens": tokens}, bucket=bucket)
    t = x.shape[1]
    assert t >= max(lengths)
    if bucket == "pow2":
        assert t == max(8, 1 << max(0, max(lengths) - 1).bit_length())
    elif bucket == 16:
        assert t % 16 == 0
    assert batch.mask.shape == (len(lengths), t)
    np.testing.assert_array_equal(batch.lengths, lengths)
    for a, b in zip(batch.unpad(x), logprobs, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(batch.unpad(batch["target_tokens"]), tokens, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.issubdtype(np.asarray(batch["target_tokens"]).dtype, np.integer)
    assert np.all(np.asarray(x)[np.asarray(batch.mask) == 0] == 0)


def test_batch_bucket_pads_rows_and_unpad_drops_them():
    logprobs = [np.ones(3), np.ones(5), np.ones(2)]
    x, batch = jr.Batch.from_ragged(logprobs, batch_bucket="pow2")
    assert x.shape == (4, 8)
    assert [len(a) for a in batch.unpad(x)] == [3, 5, 2]


def test_bucket_bounds_compiles():
    objective = jr.compose(jr.Term("nll", jr.losses.cross_entropy))
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 64, size=4)
        x, batch = jr.Batch.from_ragged([-np.ones(n) for n in lengths])
        objective(x, batch)
    assert objective.trace_count <= 4  # lengths 8, 16, 32, 64


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: jr.Batch.from_ragged([np.ones((2, 2, 2))]), "expected a [T] or [T, K] array"),
        (
            lambda: jr.Batch.from_ragged([np.ones(3)], {"weights": [np.ones(2)]}),
            "inputs['weights'][0]: expected length 3",
        ),
        (
            lambda: jr.Batch.from_ragged([np.ones(3)], {"weights": []}),
            "expected one array per datum (1); found 0",
        ),
        (lambda: jr.Batch.from_ragged([np.ones(70)], bucket=[8, 64]), "more than the largest"),
        (lambda: jr.Batch.from_ragged([np.ones((2, 3)), np.ones((2, 4))]), "trailing shape"),
    ],
)
def test_errors(call, message):
    with pytest.raises(jr.BatchError) as info:
        call()
    assert message in str(info.value)


def test_per_datum_lifts_a_tinker_style_loss():
    rng = np.random.default_rng(1)
    lengths = [4, 0, 7]
    lps = [-rng.random(n) for n in lengths]
    ws = [rng.random(n) for n in lengths]
    x, batch = jr.Batch.from_ragged(lps, {"weights": ws})

    def row_loss(lp, inputs):
        return -jnp.sum(inputs["weights"] * lp), {"tokens": jnp.sum(inputs["mask"])}

    lifted = jr.per_datum(row_loss)
    loss, metrics = lifted(x, batch)
    expected = -sum(np.sum(w * lp) for w, lp in zip(ws, lps, strict=True))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["tokens"]) == pytest.approx(11 / 2)  # mean over the 2 real datums
    direct = jr.losses.cross_entropy(x, batch)[0]
    assert float(loss) == pytest.approx(float(direct), rel=1e-6)
    mean = jr.per_datum(row_loss, reduction="mean")(x, batch)[0]
    assert float(mean) == pytest.approx(expected / 2, rel=1e-5)


def test_from_ragged_keeps_float64_under_x64():
    import jax

    lps = [np.array([-1.0, -2.5e-9]), np.array([-0.5])]  # float64; -2.5e-9 needs 64 bits
    weights = [np.ones(2, np.float32), np.ones(1, np.float32)]
    targets = [np.array([3, 4]), np.array([5])]
    with jax.enable_x64(True):
        x, batch = jr.Batch.from_ragged(lps, {"weights": weights, "target_tokens": targets})
        assert x.dtype == jnp.float64
        assert batch.unpad(x)[0][1] == -2.5e-9
        assert batch["weights"].dtype == jnp.float32  # float32 stays float32
        assert batch["target_tokens"].dtype == jnp.int32
        x32, _ = jr.Batch.from_ragged([a.astype(np.float32) for a in lps])
        assert x32.dtype == jnp.float32
        forced, _ = jr.Batch.from_ragged(lps, dtype=np.float32)
        assert forced.dtype == jnp.float32
        loss = jr.losses.cross_entropy(x, batch)[0]
        assert loss.dtype == jnp.float64
        assert float(loss) == -(-1.0 - 2.5e-9 - 0.5)
    # Without x64 JAX stores float64 as float32, as jnp.asarray does.
    x, batch = jr.Batch.from_ragged(lps, {"weights": weights})
    assert x.dtype == jnp.float32 and batch["weights"].dtype == jnp.float32


def test_missing_input_names_what_the_batch_holds():
    _, batch = jr.Batch.from_ragged([np.ones(2)], {"weights": [np.ones(2)]})
    with pytest.raises(KeyError) as info:
        batch["advantages"]
    assert isinstance(info.value, jr.BatchError)
    assert str(info.value) == "batch['advantages']: no such input; found ['weights']."
