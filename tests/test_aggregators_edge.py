"""Edge cases of the exact aggregators on TorchJD-style matrices (stationary, rank-deficient)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxreg as jr
from benchmarks import jd_samplers

agg = jr.aggregators
SHAPES = [(5, 3, 3), (9, 11, 6), (7, 13, 2), (20, 10, 5)]


@functools.cache
def _cases():
    """``{(kind, m, n, r): [J, ...]}``: 3 float64 Jacobians per kind and shape."""
    rng = np.random.default_rng(0)
    return {
        (kind, *shape): [jd_samplers.sample(kind, *shape, rng) for _ in range(3)]
        for kind in ("strong", "weak", "non_weak")
        for shape in SHAPES
    }


@functools.cache
def _batched(fn_name: str):
    fns = {
        "nash": lambda g: agg.nash_mtl_weights(g, with_residual=True),
        "cagrad": lambda g: agg.cagrad_weights(g, c=0.5, rescale=0, with_residual=True),
    }
    return jax.jit(jax.vmap(fns[fn_name]))


def _run(fn_name, js):
    with jax.enable_x64(True):
        grams = jnp.asarray(np.stack([j @ j.T for j in js]))
        w, res = _batched(fn_name)(grams)
        return np.asarray(w), np.asarray(res)


@pytest.mark.parametrize("shape", SHAPES)
def test_nash_mtl_no_solution_on_weakly_stationary_inputs(shape):
    # 0 is in the convex hull of the rows: f(a) = a'Ga/2 - sum log a is unbounded below
    # along the v >= 0 with v'J = 0, so no alpha solves alpha * (G alpha) = 1.
    for kind in ("strong", "weak"):
        js = _cases()[(kind, *shape)]
        w, res = _run("nash", js)
        assert np.all(w == 0), (kind, shape, w)
        assert np.all(np.isinf(res)), (kind, shape, res)
    # ... while without it the equation is solved to rounding and |d|^2 = n.
    js = _cases()[("non_weak", *shape)]
    w, res = _run("nash", js)
    assert np.all(res < 1e-9), res
    for alpha, j in zip(w, js, strict=True):
        d = alpha @ j
        np.testing.assert_allclose(d @ d, shape[0], rtol=1e-8)
        np.testing.assert_allclose(alpha * (j @ j.T @ alpha), 1.0, atol=1e-9)


def _primal(j, coef):
    """CAGrad's primal value min_i <g_i, d> / |g0|^2 of d = coef' J, and the ball check."""
    g0 = j.mean(0)
    d = coef @ j
    return np.min(j @ d) / (g0 @ g0), np.linalg.norm(d - g0) / np.linalg.norm(g0)


def _dual_bound(j, w):
    """Weak duality: F(w) = <g0, g_w> + c |g0| |g_w| >= min_i <g_i, d> for feasible d."""
    g0 = j.mean(0)
    gw = w @ j
    return (g0 @ gw + 0.5 * np.linalg.norm(g0) * np.linalg.norm(gw)) / (g0 @ g0)


def _best_dual_bound(j, rng):
    """min F(w) over SLSQP runs from several starts and the min-norm point of the hull
    (scipy's NNLS): an upper bound on the optimum, independent of jaxreg's solvers."""
    m = len(j)
    a = np.vstack([j.T, np.ones((1, m))])
    target = np.zeros(len(a))
    target[-1] = 1.0
    u = scipy.optimize.nnls(a, target)[0]
    bounds = [_dual_bound(j, u / u.sum())]
    for x0 in [np.full(m, 1 / m), *rng.dirichlet(np.ones(m), size=4)]:
        res = scipy.optimize.minimize(
            lambda w: _dual_bound(j, w),
            x0,
            method="SLSQP",
            bounds=[(0, 1)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        bounds.append(_dual_bound(j, np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()))
    return min(bounds)


@pytest.mark.parametrize("shape", SHAPES)
def test_cagrad_is_optimal_and_order_free_on_weakly_stationary_inputs(shape):
    rng = np.random.default_rng(1)
    js = _cases()[("weak", *shape)] + _cases()[("strong", *shape)]
    perms = [rng.permutation(shape[0]) for _ in js]
    coef, gap = _run("cagrad", js)
    coef_p, _ = _run("cagrad", [j[p] for j, p in zip(js, perms, strict=True)])
    for j, c, c_p, p, g in zip(js, coef, coef_p, perms, gap, strict=True):
        value, radius = _primal(j, c)
        assert radius <= 0.5 + 1e-12  # feasible
        # Certified: the primal value reaches an upper bound on the optimum.
        bound = _best_dual_bound(j, rng)
        assert value >= bound - 1e-6, (value, bound)
        assert 0 <= g < 1e-5
        np.testing.assert_allclose(c_p @ j[p], c @ j, atol=1e-6 * np.linalg.norm(j.mean(0)))
