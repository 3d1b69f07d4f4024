"""grad_strategy="auto": the cost model's decisions, its work estimate, and that auto changes
how the per-term gradients are computed, never what they are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from jaxreg._src.core import strategy
from jaxreg._src.core.strategy import (
    TYPICAL_WORK_PER_ELEMENT,
    VMAP_MAX_WORK,
    auto_groups,
    forward_work,
    per_term,
)

RNG = np.random.default_rng(7)


def never_traced(x):
    raise AssertionError("the terms were traced, but the shapes alone decide here")


def two_sums(x):
    """Work exactly ``2 * x.size``: two reductions over ``x``."""
    return jnp.sum(x), jnp.sum(x)


# ------------------------------------------------------------------------ decisions


@pytest.mark.parametrize(
    "x", [jnp.zeros(3), jnp.zeros((64, 8192)), {"w": jnp.zeros(2)}, [jnp.zeros(2)] * 3]
)
def test_one_term_is_one_group_whatever_x(x):
    assert auto_groups(1, x, never_traced) == ((0,),)
    assert auto_groups(0, x, never_traced) == ()


@pytest.mark.parametrize(
    "x",
    [
        {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)},
        (jnp.zeros(2), jnp.zeros(2)),
        [jnp.zeros(4)],  # even a one-leaf pytree
    ],
)
def test_pytrees_go_per_term_even_when_tiny(x):
    assert auto_groups(3, x, never_traced) == ((0,), (1,), (2,))


def test_many_terms_go_per_term_from_the_shapes_alone():
    x = jnp.zeros(64)
    n = VMAP_MAX_WORK // 64 + 1  # n * x.size, the least work n terms can have, is over
    assert auto_groups(n, x, never_traced) == per_term(n)
    assert auto_groups(100, jnp.zeros((8, 512)), never_traced) == per_term(100)
    # A large x: per term from 2 terms on.
    assert auto_groups(2, jnp.zeros((64, 8192)), never_traced) == ((0,), (1,))


def three_sums(x):
    """Work exactly ``3 * x.size``: three reductions over ``x``."""
    return jnp.sum(x), jnp.sum(x), jnp.sum(x)


def test_threshold_is_on_the_measured_work_and_inclusive():
    # 2 terms doing 3 reductions: the shapes (2 * size) pass, the work (3 * size) decides.
    s = VMAP_MAX_WORK // 3
    assert forward_work(three_sums, jnp.zeros(s)) == 3 * s <= VMAP_MAX_WORK
    assert forward_work(three_sums, jnp.zeros(s + 1)) > VMAP_MAX_WORK >= 2 * (s + 1)
    assert auto_groups(2, jnp.zeros(s), three_sums) == ((0, 1),)
    assert auto_groups(2, jnp.zeros(s + 1), three_sums) == ((0,), (1,))


def test_without_the_terms_each_does_the_typical_work_per_element():
    s = VMAP_MAX_WORK // (3 * TYPICAL_WORK_PER_ELEMENT)
    assert auto_groups(3, jnp.zeros(s)) == ((0, 1, 2),)
    assert auto_groups(3, jnp.zeros(s + 1)) == ((0,), (1,), (2,))


def test_costly_terms_on_a_small_array_go_per_term():
    """A model term (a matmul over data much larger than x): the shapes would allow vmap,
    the work read off the jaxpr does not (vmap would repeat the model's backward)."""
    w = jnp.zeros((8, 4))
    rows = VMAP_MAX_WORK // (8 * 4) + 1
    data = jnp.ones((rows, 8))

    def model_terms(w):
        return jnp.sum(data @ w), jnp.sum(w**2)

    assert forward_work(model_terms, w) > VMAP_MAX_WORK
    assert auto_groups(2, w, model_terms) == ((0,), (1,))
    assert auto_groups(2, w, lambda w: (jnp.sum(w), jnp.sum(w**2))) == ((0, 1),)


def test_decided_on_tracers_inside_jit():
    seen = []

    @jax.jit
    def f(x):
        seen.append(auto_groups(2, x, two_sums))
        return x

    f(jnp.zeros(4))
    f(jnp.zeros(VMAP_MAX_WORK))
    assert seen == [((0, 1),), ((0,), (1,))]


# --------------------------------------------------------------------- work estimate


def test_forward_work_counts_by_hand():
    # exp: 100 elements; sum: reads 100.
    assert forward_work(lambda x: jnp.sum(jnp.exp(x)), jnp.zeros(100)) == 200
    # dot_general: [8, 4] @ [4, 3] is 8 * 3 outputs of 4 multiply-adds.
    a = jnp.ones((8, 4))  # made outside: a constant of the jaxpr, no equation
    assert forward_work(lambda w: a @ w, jnp.zeros((4, 3))) == 96
    # made inside: a broadcast of 32 elements too
    assert forward_work(lambda w: jnp.ones((8, 4)) @ w, jnp.zeros((4, 3))) == 96 + 32
    # A nested jit counts its body.
    assert forward_work(lambda x: jax.jit(jnp.exp)(x), jnp.zeros(10)) == 10


def test_forward_work_control_flow_and_convolutions():
    # scan: a body of 3 scalar ops (convert, add, mul) run 5 times.
    def scan(x):
        return jax.lax.scan(lambda c, xi: (c + xi, xi * 2.0), 0.0, x)[1]

    assert forward_work(scan, jnp.zeros(5)) == 15

    # cond: slice (reads 3), squeeze, gt, convert, then the costlier branch: sin, mul on 3.
    def cond(x):
        return jax.lax.cond(x[0] > 0, lambda x: jnp.sin(x) * 2.0, lambda x: x, x)

    assert forward_work(cond, jnp.zeros(3)) == 3 + 1 + 1 + 1 + 6
    # A 3x3 'SAME' convolution, 3 -> 5 channels on 2 images of 8x8: 2*5*8*8 outputs,
    # each 3*3*3 multiply-adds.
    k = jnp.ones((5, 3, 3, 3))

    def conv(x):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")

    assert forward_work(conv, jnp.ones((2, 3, 8, 8))) == 2 * 5 * 8 * 8 * 27


# ------------------------------------------------------- auto changes how, not what


def quad(x, b):
    return jnp.sum(x**2)


def sines(x, b):
    return jnp.sum(jnp.sin(x))


def mean3(x, b):
    return 3.0 * jnp.mean(x)


def reference(x, w):
    """float64 values, per-term gradients, norms, total gradient and cosines."""
    x = np.asarray(x, np.float64)
    values = np.array([np.sum(x**2), np.sum(np.sin(x)), 3 * np.mean(x)])
    grads = np.stack([2 * x, np.cos(x), np.full_like(x, 3 / x.size)]).reshape(3, -1)
    norms = np.linalg.norm(grads, axis=1)
    return values, grads, norms, w @ grads, grads @ grads.T / np.outer(norms, norms)


def objective(strategy_):
    return jr.compose(
        jr.Term("quad", quad),
        [jr.Term("sines", sines, 0.3), jr.Term("mean3", mean3, 0.05)],
        track_grad_norms=True,
        term_grads=True,
        grad_conflicts=True,
        grad_strategy=strategy_,
    )


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((2, 3), ((0, 1, 2),)), ((64, 1024), ((0,), (1,), (2,)))],
    ids=["auto-vmaps-tiny", "auto-per-term"],
)
def test_auto_matches_per_term_and_the_float64_reference(shape, expected):
    # Hard input: large magnitudes (sin's gradient cos(1e4) etc.), exact zeros, -0.0.
    x = RNG.normal(size=shape).astype(np.float32) * 3
    x.flat[:4] = [1e4, -1e4, 0.0, -0.0]
    x = jnp.asarray(x)
    terms = (quad, sines, mean3)
    assert auto_groups(3, x, lambda x: [t(x, None) for t in terms]) == expected
    w = np.array([1.0, 0.3, 0.05])
    values, grads, norms, total, cos = reference(x, w)
    auto, exact = objective("auto")(x), objective("per_term")(x)
    for out in (auto, exact):
        d = out.to_dict()
        assert d["loss_total"] == pytest.approx(w @ values, rel=1e-5)
        np.testing.assert_allclose(out.term_grads.reshape(3, -1), grads, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.grad.reshape(-1), total, rtol=1e-5, atol=1e-6)
        found = [d["base_loss"]["grad_norm"]] + [
            d["regularizers"][k]["grad_norm"] for k in ("sines", "mean3")
        ]
        np.testing.assert_allclose(found, norms, rtol=1e-5)
        np.testing.assert_allclose(out.grad_cosines, cos, atol=1e-5)
    # And auto against per_term directly, in float32: the same numbers.
    np.testing.assert_allclose(auto.term_grads, exact.term_grads, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(auto.scalars, exact.scalars, rtol=1e-5, atol=1e-6)


def test_auto_on_a_pytree_matches_per_term():
    params = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32), "b": jnp.ones(2)}
    terms = (jr.Term("l2", jr.regularizers.l2), [jr.Term("l1", jr.regularizers.l1, 0.5)])
    auto = jr.compose(*terms, track_grad_norms=True, term_grads=True)(params)
    exact = jr.compose(*terms, track_grad_norms=True, term_grads=True, grad_strategy="per_term")(
        params
    )
    for leaf_a, leaf_e in zip(jax.tree.leaves(auto), jax.tree.leaves(exact), strict=True):
        np.testing.assert_array_equal(leaf_a, leaf_e)


def test_compose_consults_the_cost_model_once_per_trace(monkeypatch):
    calls = []
    real = strategy.forward_work

    def spy(fn, x):
        calls.append(real(fn, x))
        return calls[-1]

    monkeypatch.setattr(strategy, "forward_work", spy)
    tiny = objective("auto")
    tiny(jnp.ones((2, 3)))
    tiny(jnp.ones((2, 3)) * 2)  # no retrace
    # quad: pow; sines: sin, sum; mean3: sum, div, mul; plus stacking the 3 values.
    assert len(calls) == 1 and 6 * 2 <= calls[0] <= 6 * 10
    objective("per_term")(jnp.ones((2, 3)))
    objective("auto")(jnp.ones((64, 1024)))  # ruled out from the shapes: no tracing
    assert len(calls) == 1


def test_auto_attributes_a_nan_gradient_exactly_beyond_toy_sizes():
    """Before issue 15, auto ran one vmap-ed VJP on any x of at most 2^14 elements, which
    spread one term's NaN gradient (0 * inf in the other rows) to every term's norm."""
    x = np.abs(RNG.normal(size=(8, 512))).astype(np.float32)
    x[3, 7] = 0.0  # sqrt's derivative is infinite here: 0 * inf = NaN
    objective = jr.compose(
        jr.Term("ok", quad),
        [
            jr.Term("bad", lambda x, b: jnp.sum(jnp.sqrt(x) * 0.0)),
            jr.Term("lin", mean3, 0.1),
        ],
        track_grad_norms=True,
    )
    d = objective(jnp.asarray(x)).to_dict()
    assert np.isnan(d["regularizers"]["bad"]["grad_norm"])
    assert d["base_loss"]["grad_norm"] == pytest.approx(2 * np.linalg.norm(x), rel=1e-5)
    assert d["regularizers"]["lin"]["grad_norm"] == pytest.approx(3 / np.sqrt(x.size), rel=1e-5)
    with pytest.raises(jr.NonFiniteError) as e:
        jr.check_finite(objective(jnp.asarray(x)))
    assert e.value.where == {"bad": "gradient"}
