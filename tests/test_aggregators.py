"""Aggregators against independent float64 NumPy implementations and their properties."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxreg as jr

agg = jr.aggregators


# ----------------------------------------------------------------- NumPy references


def np_pcgrad(g: np.ndarray, orders) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1, on explicit gradients with the given visiting orders."""
    out = np.zeros(g.shape[1])
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            if j != i and gi @ g[j] < 0 and g[j] @ g[j] > 0:
                gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        out += gi
    return out


def np_box_qp(gram: np.ndarray, lower: np.ndarray, simplex: bool = False) -> np.ndarray:
    """min v'Gv s.t. v >= lower (and sum v = 1 if simplex), exactly, by enumerating the
    set of free coordinates (small n only): the optimum is one of these candidates."""
    n = len(gram)
    best, best_v = np.inf, None
    for k in range(0 if not simplex else 1, n + 1):
        for free in itertools.combinations(range(n), k):
            free = list(free)
            fixed = [j for j in range(n) if j not in free]
            v = lower.astype(np.float64).copy()
            gff = gram[np.ix_(free, free)]
            rhs = -gram[np.ix_(free, fixed)] @ v[fixed]
            if not free:
                pass  # every coordinate at its bound
            elif simplex:  # KKT with the equality constraint sum v = 1
                m = np.block([[2 * gff, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
                b = np.concatenate([2 * rhs, [1.0 - v[fixed].sum()]])
                v[free] = np.linalg.lstsq(m, b, rcond=None)[0][:k]
            else:
                v[free] = np.linalg.lstsq(gff, rhs, rcond=None)[0]
            if np.all(v >= lower - 1e-9) and (not simplex or abs(v.sum() - 1) < 1e-9):
                value = v @ gram @ v
                if value < best - 1e-12:
                    best, best_v = value, v
    return best_v


def np_mgda(g):
    w = np_box_qp(g @ g.T, np.zeros(len(g)), simplex=True)
    return w @ g


def np_upgrad(g):
    gram = g @ g.T
    n = len(g)
    return np.mean([np_box_qp(gram, np.eye(n)[i]) @ g for i in range(n)], axis=0)


def np_cagrad(g, c=0.5):
    """Liu et al. 2021 (the official code's objective), minimised on a fine simplex grid."""
    n = len(g)
    gram = g @ g.T
    mean = np.full(n, 1 / n)
    g0_norm = np.sqrt(mean @ gram @ mean + 1e-8)
    cn = c * g0_norm + 1e-8
    steps = 4000 if n == 2 else 300
    grid = [
        np.array(p) / steps
        for p in itertools.product(range(steps + 1), repeat=n - 1)
        if sum(p) <= steps
    ]
    ws = np.array([np.append(p, 1 - p.sum()) for p in grid])
    obj = ws @ (gram @ mean) + cn * np.sqrt(np.einsum("ki,ij,kj->k", ws, gram, ws) + 1e-8)
    w = ws[np.argmin(obj)]
    gw = w @ g
    d = g.mean(0) + cn / (np.linalg.norm(gw) + 1e-8) * gw
    return d / (1 + c**2)


# ----------------------------------------------------------------- helpers


def run(aggregator, g: np.ndarray) -> np.ndarray:
    """Runs an aggregator on a pytree split of the rows of ``g`` (two leaves)."""
    g32 = jnp.asarray(g, jnp.float32)
    stacked = {"a": g32[:, :3], "b": g32[:, 3:].reshape(len(g), -1, 1)}
    params = jax.tree.map(lambda x: x[0], stacked)
    update, _ = jax.jit(aggregator.update)(stacked, aggregator.init(params))
    return np.concatenate([np.asarray(update["a"]), np.asarray(update["b"]).ravel()])


def random_jacobian(n, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def degenerate():
    rng = np.random.default_rng(7)
    g1 = rng.normal(size=8)
    return {
        "aligned": np.stack([g1, 2 * g1]),
        "opposed": np.stack([g1, -g1]),
        "zero": np.stack([g1, np.zeros(8)]),
        "one": g1[None],
    }


CASES = [random_jacobian(2, seed=s) for s in range(3)] + [
    random_jacobian(3, seed=s) for s in range(3, 6)
]


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("g", CASES + list(degenerate().values()))
def test_mgda_is_the_min_norm_point_of_the_hull(g):
    got = run(agg.mgda(), g)
    np.testing.assert_allclose(got, np_mgda(g), rtol=2e-3, atol=2e-4)
    # KKT of the min-norm problem: <d, g_i> >= |d|^2 for every i.
    assert np.all(g @ got >= got @ got - 1e-3 * max(1.0, got @ got))


@pytest.mark.parametrize("g", CASES + list(degenerate().values()))
def test_upgrad_matches_reference_and_conflicts_with_no_term(g):
    got = run(agg.upgrad(), g)
    np.testing.assert_allclose(got, np_upgrad(g), rtol=2e-3, atol=2e-4)
    assert np.all(g @ got >= -1e-4 * np.abs(g).max() ** 2)


def test_upgrad_is_the_mean_without_conflict():
    g = degenerate()["aligned"]
    np.testing.assert_allclose(run(agg.upgrad(), g), g.mean(0), rtol=1e-4)


@pytest.mark.parametrize("g", CASES + list(degenerate().values()))
def test_pcgrad_matches_reference_for_some_visiting_order(g):
    got = run(agg.pcgrad(seed=3), g)
    n = len(g)
    per_task = [list(itertools.permutations([j for j in range(n) if j != i])) for i in range(n)]
    candidates = [np_pcgrad(g, orders) for orders in itertools.product(*per_task)]
    assert any(np.allclose(got, c, rtol=1e-4, atol=1e-5) for c in candidates)
    if n == 2:  # with two tasks, the result conflicts with neither
        assert np.all(g @ got >= -1e-4 * np.abs(g).max() ** 2)


@pytest.mark.parametrize("g", [*CASES, degenerate()["aligned"], degenerate()["one"]])
def test_cagrad_matches_reference(g):
    got = run(agg.cagrad(c=0.5), g)
    np.testing.assert_allclose(got, np_cagrad(g), rtol=1e-2, atol=1e-3 * np.abs(g).max())


@pytest.mark.parametrize("g", [*CASES, degenerate()["one"]])
def test_nash_mtl_solves_the_bargaining_equations(g):
    gram = g @ g.T
    alpha = np.asarray(agg.nash_mtl_weights(jnp.asarray(gram, jnp.float32)), np.float64)
    assert np.all(alpha > 0)
    np.testing.assert_allclose(alpha * (gram @ alpha), np.ones(len(g)), rtol=1e-3)
    np.testing.assert_allclose(run(agg.nash_mtl(), g), alpha @ g, rtol=1e-3, atol=1e-5)


def test_weighted_sum_and_degenerate_values():
    g = random_jacobian(3, seed=9)
    np.testing.assert_allclose(
        run(agg.weighted_sum([1.0, 2.0, 0.5]), g), np.array([1.0, 2.0, 0.5]) @ g, rtol=1e-5
    )
    d = degenerate()
    for method in (agg.mgda(), agg.upgrad(), agg.pcgrad()):
        np.testing.assert_allclose(run(method, d["opposed"]), 0.0, atol=1e-4)
    np.testing.assert_allclose(run(agg.mgda(), d["zero"]), 0.0, atol=1e-5)
    np.testing.assert_allclose(run(agg.upgrad(), d["zero"]), d["zero"].mean(0), rtol=1e-4)
    np.testing.assert_allclose(run(agg.pcgrad(), d["zero"]), d["zero"].sum(0), rtol=1e-5)
    for method in (agg.mgda(), agg.upgrad(), agg.pcgrad()):
        np.testing.assert_allclose(run(method, d["one"]), d["one"][0], rtol=1e-4)


def test_chains_with_optax_and_compose_term_grads():
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    objective = jr.compose(
        None,
        [
            jr.Term("a", lambda p, _: jnp.sum((p["w"] - 1.0) ** 2) + jnp.sum(p["b"] ** 2)),
            jr.Term("b", lambda p, _: jnp.sum((p["w"] + 1.0) ** 2)),
        ],
        term_grads=True,
    )
    opt = optax.chain(agg.upgrad(), optax.sgd(0.1))
    state = opt.init(params)
    out = objective(params, None)
    with jax.numpy_dtype_promotion("standard"):
        updates, state = opt.update(out.term_grads, state, params)
    stacked = np.concatenate(
        [np.asarray(out.term_grads["b"]), np.asarray(out.term_grads["w"])], axis=1
    )
    expected = -0.1 * np_upgrad(stacked.astype(np.float64))
    got = np.concatenate([np.asarray(updates["b"]), np.asarray(updates["w"])])
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5)


def test_toy_problem_conflict_aware_methods_reach_the_front():
    """The CAGrad/Nash-MTL toy: from the two upper starts, the mean stalls in the flat
    conflicting region; MGDA and Nash-MTL reach Pareto-stationary points."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "toy_pareto.py"
    spec = importlib.util.spec_from_file_location("toy_pareto", path)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes int and float
        for start in [(-8.5, 7.5), (9.0, 9.0)]:
            mean_end, _ = toy.trajectory(agg.weighted_sum([0.5, 0.5]), start, 20_000)
            assert toy.stationarity(mean_end) > 0.3, start
            for method, steps in ((agg.mgda(), 20_000), (agg.nash_mtl(), 40_000)):
                end, _ = toy.trajectory(method, start, steps)
                assert toy.stationarity(end) < 0.05, (start, method)


@pytest.mark.parametrize("n_leaves", [2, 70], ids=["pairwise", "blockwise"])
def test_gramian_matches_numpy_on_both_paths(n_leaves):
    # 3 terms: 6 pairs per leaf, so 2 leaves take the pairwise reductions and 70 leaves
    # (420 pairs x leaves, over the 384 limit) the blockwise product.
    rng = np.random.default_rng(n_leaves)
    stacked = {f"p{i}": rng.normal(size=(3, 4, 5)).astype(np.float32) for i in range(n_leaves)}
    flat = np.concatenate([v.reshape(3, -1) for v in stacked.values()], axis=1).astype(np.float64)
    got = jax.jit(agg.gramian)(jax.tree.map(jnp.asarray, stacked))
    np.testing.assert_allclose(got, flat @ flat.T, rtol=1e-5, atol=1e-4)


def test_aggregator_in_one_jit_with_compose_matches_separate_calls():
    params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(3)}
    objective = jr.compose(
        None,
        [
            jr.Term("a", lambda p, _: jnp.sum((p["w"] - 1.0) ** 2) + jnp.sum(p["b"])),
            jr.Term("b", lambda p, _: jnp.sum((p["w"] + 0.5) ** 2) - jnp.sum(p["b"] ** 2)),
            jr.Term("c", lambda p, _: jnp.sum(jnp.sin(p["w"])) * jnp.sum(p["b"])),
        ],
        term_grads=True,
    )
    method = agg.upgrad()
    state = method.init(params)
    step = jax.jit(lambda p: method.update(objective(p, None).term_grads, state)[0])
    separate = method.update(objective(params, None).term_grads, state)[0]
    stacked = np.concatenate(
        [np.asarray(objective(params, None).term_grads[k]) for k in ("b", "w")], axis=1
    )
    expected = np_upgrad(stacked.astype(np.float64))
    for got in (step(params), separate):
        flat = np.concatenate([np.asarray(got["b"]), np.asarray(got["w"])])
        np.testing.assert_allclose(flat, expected, rtol=2e-3, atol=1e-5)
