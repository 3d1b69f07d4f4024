"""``jr.transforms.regularize`` against optax's own transforms; adaptive weightings
against NumPy transcriptions of their papers' update rules."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxreg as jr

WD = 1e-2


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}


def _grads(i):
    return jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)) - 0.05 * p, _params())


def _run(opt, steps=4, jit=True):
    with jax.numpy_dtype_promotion("standard"):  # optax's own adam mixes int and float
        return _run_standard(opt, steps, jit)


def _run_standard(opt, steps, jit):
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    for i in range(steps):
        updates, state = update(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_l2_term_equals_add_decayed_weights():
    reg = jr.transforms.regularize([jr.Term("l2", jr.regularizers.l2, weight=WD / 2)])
    ours, state = _run(optax.chain(reg, optax.adam(1e-2)))
    theirs, _ = _run(optax.chain(optax.add_decayed_weights(WD), optax.adam(1e-2)))
    _assert_close(ours, theirs)
    # The state holds the last step's measurements (taken before that step's update).
    assert int(state[0].step) == 4
    assert state[0].weight[0] == pytest.approx(WD / 2)
    np.testing.assert_allclose(state[0].contribution, state[0].weight * state[0].value)


def test_schedules_multisteps_and_metrics():
    schedule = optax.linear_schedule(0.0, WD, transition_steps=4)
    reg = jr.transforms.regularize(
        [jr.Term("l2", jr.regularizers.l2, weight=lambda step: schedule(step) / 2)]
    )
    ours, _ = _run(optax.chain(reg, optax.sgd(0.1)), steps=5)
    theirs, _ = _run(optax.chain(optax.add_decayed_weights(schedule), optax.sgd(0.1)), steps=5)
    _assert_close(ours, theirs)

    multi = optax.MultiSteps(optax.chain(reg, optax.sgd(0.1)), every_k_schedule=2)
    reference = optax.MultiSteps(
        optax.chain(optax.add_decayed_weights(schedule), optax.sgd(0.1)), every_k_schedule=2
    )
    _assert_close(_run(multi, steps=6)[0], _run(reference, steps=6)[0])

    params = _params()
    reg2 = jr.transforms.regularize(
        [jr.Term("l2", jr.regularizers.l2, 0.5), jr.Term("l1", jr.regularizers.l1, 0.1)]
    )
    _, state = reg2.update(jax.tree.map(jnp.zeros_like, params), reg2.init(params), params)
    m = jr.transforms.metrics(state, ["l2", "l1"])
    flat = np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)]).astype(np.float64)
    assert m["l2"]["value"] == pytest.approx(np.sum(flat**2), rel=1e-5)
    assert m["l2"]["grad_norm"] == pytest.approx(2 * np.linalg.norm(flat), rel=1e-5)
    assert m["l1"]["contribution"] == pytest.approx(0.1 * np.abs(flat).sum(), rel=1e-5)
    with pytest.raises(ValueError, match="needs the parameters"):
        reg2.update(params, reg2.init(params))


# ----------------------------------------------------------------- guardrails


def _l2(weight):
    return jr.transforms.regularize([jr.Term("l2", jr.regularizers.l2, weight=weight)])


def _steps(opt, params, grads, steps):
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
        update = jax.jit(opt.update)
        for _ in range(steps):
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
    return params, state


def test_regularize_after_adam_climbs_the_penalty_and_is_flagged():
    params, zero = {"w": jnp.array([2.0])}, {"w": jnp.zeros(1)}
    # After adam, the L2 gradient 2 * 0.05 * w is added to the final step: w *= 1.1.
    wrong, state = _steps(optax.chain(optax.adam(1e-2), _l2(0.05)), params, zero, 20)
    assert float(wrong["w"][0]) == pytest.approx(2.0 * 1.1**20, rel=1e-5)
    assert round(float(wrong["w"][0]), 2) == 13.46
    assert int(state[1].misplaced) == 19  # every update after the first one tells
    with pytest.warns(jr.transforms.RegularizeOrderWarning, match="Put it first"):
        jr.transforms.metrics(state)
    # Eagerly (outside jit) update warns itself.
    opt = optax.chain(optax.sgd(0.1), _l2(0.05))
    eager_state, p = opt.init(params), params
    with pytest.warns(jr.transforms.RegularizeOrderWarning):
        for _ in range(3):
            updates, eager_state = opt.update(zero, eager_state, p)
            p = optax.apply_updates(p, updates)
    # The right order shrinks the weight, and nothing is flagged.
    right, state = _steps(jr.transforms.regularized(optax.adam(1e-2), [
        jr.Term("l2", jr.regularizers.l2, weight=0.05)]), params, zero, 20)  # fmt: skip
    assert float(right["w"][0]) < 2.0
    assert int(state[0].misplaced) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jr.transforms.metrics(state)


@pytest.mark.parametrize(
    "make",
    [
        lambda reg: optax.chain(reg, optax.sgd(0.1)),
        lambda reg: optax.chain(reg, optax.sgd(0.1, momentum=0.9)),
        lambda reg: optax.chain(reg, optax.adam(1e-2)),
        # Decoupled (AdamW style): after the normalisation, before the learning rate.
        lambda reg: optax.chain(optax.scale_by_adam(), reg, optax.scale_by_learning_rate(1e-2)),
        lambda reg: optax.MultiSteps(optax.chain(reg, optax.sgd(0.1)), every_k_schedule=2),
    ],
)
def test_right_orders_are_not_flagged(make):
    reg = jr.transforms.regularize([jr.Term("l2", jr.regularizers.l2, weight=WD / 2)])
    _, state = _run(make(reg), steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = jr.transforms.metrics(state)
    assert m["l2"]["weight"] == pytest.approx(WD / 2)
    misplaced = [
        int(s.misplaced)
        for s in jax.tree.leaves(
            state, is_leaf=lambda s: isinstance(s, jr.transforms.RegularizeState)
        )
        if isinstance(s, jr.transforms.RegularizeState)
    ]
    assert misplaced == [0]


def test_metrics_reads_the_whole_chain_state():
    params = _params()
    flat = np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)]).astype(np.float64)
    expected = {"l2": np.sum(flat**2), "l1": np.abs(flat).sum()}
    reg = jr.transforms.regularize(
        [jr.Term("l2", jr.regularizers.l2, 0.5), jr.Term("l1", jr.regularizers.l1, 0.1)]
    )
    chains = {
        "chain": optax.chain(reg, optax.adam(1e-2)),
        "inject_hyperparams": optax.inject_hyperparams(
            lambda learning_rate: optax.chain(reg, optax.sgd(learning_rate))
        )(learning_rate=0.1),
        "multi_steps": optax.MultiSteps(optax.chain(reg, optax.sgd(0.1)), every_k_schedule=1),
    }
    for label, opt in chains.items():
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(params)
            _, state = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), state, params)
        m = jr.transforms.metrics(state)
        assert set(m) == {"l2", "l1"}, label
        for name, value in expected.items():
            assert m[name]["value"] == pytest.approx(value, rel=1e-5), (label, name)
    # Two regularize states: their terms are merged; a name in both is an error.
    other = jr.transforms.regularize([jr.Term("l1b", jr.regularizers.l1, 0.2)])
    both = optax.chain(reg, optax.sgd(0.1), other)
    state = both.init(params)
    _, state = both.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert set(jr.transforms.metrics(state)) == {"l2", "l1", "l1b"}
    twice = optax.chain(reg, optax.sgd(0.1), reg)
    state = twice.init(params)
    with pytest.raises(jr.transforms.TransformError, match="appears in two regularize states"):
        jr.transforms.metrics(state)
    with pytest.raises(jr.transforms.TransformError, match="found no RegularizeState"):
        jr.transforms.metrics(optax.adam(1e-2).init(params))
    with pytest.raises(jr.transforms.TransformError, match="3 names"):
        jr.transforms.metrics(reg.init(params), ["a", "b", "c"])


def test_composite_output_instead_of_grad_is_named():
    params = _params()
    objective = jr.compose(jr.Term("loss", lambda p, _: jnp.sum(p["w"] ** 2)))
    out = objective(params)
    opt = jr.transforms.regularized(optax.sgd(0.1), [jr.Term("l2", jr.regularizers.l2, 0.5)])
    state = opt.init(params)
    with pytest.raises(jr.JaxregError, match=r"CompositeOutput.*out\.grad"):
        opt.update(out, state, params)
    with pytest.raises(jr.transforms.TransformError, match="structure of params"):
        opt.update({"w": params["w"]}, state, params)
    updates, _ = opt.update(out.grad, state, params)  # the right call works
    np.testing.assert_allclose(
        np.asarray(updates["w"]), -0.1 * (2 * params["w"] + params["w"]), rtol=1e-6
    )


def test_integer_parameter_leaves_pass_through_the_optax_path():
    params = {
        "a": jnp.asarray([1.5, -0.5]),
        "count": jnp.asarray(7, jnp.int32),
        "z": {"w": jnp.asarray([[2.0, -1.0]]), "on": jnp.asarray(True)},
    }
    reg = jr.transforms.regularize(
        [
            jr.Term("l2", jr.regularizers.l2, weight=0.05),
            jr.Term("l1", jr.regularizers.l1, weight=0.1),
            # A term that reads the integer leaf: it sees the whole pytree.
            jr.Term("scaled", lambda p, _: jnp.sum(p["z"]["w"]) * p["count"].astype(jnp.float32)),
        ]
    )
    opt = optax.chain(reg, optax.sgd(0.1))
    grads = {
        "a": jnp.asarray([0.1, 0.2]),
        "count": jnp.asarray(0, jnp.int32),
        "z": {"w": jnp.asarray([[0.3, 0.4]]), "on": jnp.asarray(False)},
    }
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)
        update = jax.jit(opt.update)
        updates, state = update(grads, state, params)
    a, w = np.asarray(params["a"], np.float64), np.asarray(params["z"]["w"], np.float64)
    np.testing.assert_allclose(
        np.asarray(updates["a"]),
        -0.1 * (np.array([0.1, 0.2]) + 0.1 * a + 0.1 * np.sign(a)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(updates["z"]["w"]),
        -0.1 * (np.array([[0.3, 0.4]]) + 0.1 * w + 0.1 * np.sign(w) + 7.0),
        rtol=1e-6,
    )
    assert int(updates["count"]) == 0 and not bool(updates["z"]["on"])
    m = jr.transforms.metrics(state)
    assert m["l2"]["value"] == pytest.approx(np.sum(a**2) + np.sum(w**2), rel=1e-6)
    assert m["scaled"]["value"] == pytest.approx(7.0, rel=1e-6)


# ----------------------------------------------------------------- weightings


@pytest.fixture(scope="module")
def objective():
    """Three quadratic terms with known values and gradient norms."""
    return jr.compose(
        jr.Term("a", lambda x, _: jnp.sum((x - 1.0) ** 2)),
        [
            jr.Term("b", lambda x, _: 3.0 * jnp.sum(x**2), weight=0.5),
            jr.Term("c", lambda x, _: jnp.sum(jnp.abs(x + 2.0)), weight=0.2),
        ],
        track_grad_norms=True,
    )


def _observe(out):
    d = out.to_dict()
    names = ["a", "b", "c"]
    entry = {"a": d["base_loss"], **d["regularizers"]}
    return (
        np.array([entry[n]["value"] for n in names]),
        np.array([entry[n]["grad_norm"] for n in names]),
        np.array([entry[n].get("weight", 1.0) for n in names]),
    )


def _trajectory(objective, weighting, steps=5):
    """Runs the weighting on a moving x; returns what it saw and the weights it set."""
    x = jnp.linspace(-1.0, 2.0, 6)
    out = objective(x, None)
    state = weighting.init(out)
    update = jax.jit(weighting.update)
    seen, set_weights = [], []
    for i in range(steps):
        weights, state = update(out, state)
        seen.append(_observe(out))
        set_weights.append(np.array([float(weights[n]) for n in ("a", "b", "c")]))
        x = x * 0.8 + 0.1 * i
        out = objective(x, None, weights=weights)
    assert objective.trace_count == 1  # new weights every step, one compiled program
    return seen, set_weights


def test_balance_grad_norms_hits_the_shares(objective):
    weighting = jr.weighting.balance_grad_norms({"b": 0.25, "c": 0.1}, decay=0.0)
    seen, weights = _trajectory(objective, weighting)
    for (_, norms, _), w in zip(seen, weights, strict=True):
        weighted = w * norms  # the shares at the point the weights were computed from
        np.testing.assert_allclose(weighted / weighted.sum(), [0.65, 0.25, 0.1], rtol=1e-5)
        assert w[0] == 1.0  # the base keeps its weight
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        jr.weighting.balance_grad_norms({"b": 1.5})
    with pytest.raises(ValueError, match="unknown term"):
        jr.weighting.balance_grad_norms({"zz": 0.5}).init(objective(jnp.zeros(6), None))


def test_balance_grad_norms_averages_norms(objective):
    weighting = jr.weighting.balance_grad_norms({"b": 0.25}, decay=0.5)
    seen, weights = _trajectory(objective, weighting, steps=3)
    ema, current = np.zeros(3), np.array([1.0, 0.5, 0.2])
    for k, ((_, norms, _), got) in enumerate(zip(seen, weights, strict=True), start=1):
        ema = 0.5 * ema + 0.5 * norms
        avg = ema / (1 - 0.5**k)
        total = (current[0] * avg[0] + current[2] * avg[2]) / 0.75
        current = np.array([current[0], 0.25 * total / avg[1], current[2]])
        np.testing.assert_allclose(got, current, rtol=1e-5)


def test_gradnorm_matches_the_paper_update(objective):
    seen, weights = _trajectory(objective, jr.weighting.gradnorm(alpha=1.5, learning_rate=0.1))
    w = np.array([1.0, 0.5, 0.2])
    initial = seen[0][0]
    for (values, norms, _), got in zip(seen, weights, strict=True):
        g = w * norms
        ratio = values / initial
        target = g.mean() * (ratio / ratio.mean()) ** 1.5
        new = np.maximum(w - 0.1 * np.sign(g - target) * norms, 0)
        w = new * 1.7 / new.sum()
        np.testing.assert_allclose(got, w, rtol=1e-4)


def test_uncertainty_and_dwa_match_their_formulas(objective):
    seen, weights = _trajectory(objective, jr.weighting.uncertainty(learning_rate=0.1))
    s = np.zeros(3)
    for (values, _, _), got in zip(seen, weights, strict=True):
        s = s - 0.1 * (1 - np.exp(-s) * values)
        np.testing.assert_allclose(got, np.exp(-s), rtol=1e-5)

    seen, weights = _trajectory(objective, jr.weighting.dwa(temperature=2.0))
    history = []
    for (values, _, _), got in zip(seen, weights, strict=True):
        history.append(values)
        if len(history) < 2:
            np.testing.assert_allclose(got, np.ones(3))
        else:
            r = history[-1] / history[-2]
            e = np.exp(r / 2.0)
            np.testing.assert_allclose(got, 3 * e / e.sum(), rtol=1e-5)


def test_famo_matches_the_official_update(objective):
    lr, gamma = 0.05, 0.001
    seen, weights = _trajectory(objective, jr.weighting.famo(learning_rate=lr, gamma=gamma))
    xi = np.zeros(3)
    m = v = np.zeros(3)
    t = 0
    previous = None
    for (values, _, _), got in zip(seen, weights, strict=True):
        d = values + 1e-8
        if previous is not None:  # AdamW step on the softmax VJP of the log-loss decrease
            delta = np.log(previous) - np.log(d)
            z = np.exp(xi) / np.exp(xi).sum()
            grad = z * (delta - z @ delta)
            t += 1
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            step = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
            xi = xi - lr * (step + gamma * xi)
        previous = d
        z = np.exp(xi) / np.exp(xi).sum()
        c = (z / d).sum()
        np.testing.assert_allclose(got, z / (c * d), rtol=1e-4)
