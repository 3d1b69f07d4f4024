"""UPGrad in float32 on stationary rank-deficient Jacobians (TorchJD's samplers, 20 x 100).

A float32 Gramian carries rounding errors of eps |g_i||g_j|; where the projections onto
the dual cone are near 0 (0 in the convex hull of the gradients), solving on it alone
leaves updates of about sqrt(eps) |v| max|g| (3e-3 max|g| here, cosines down to -0.4 on
an update that should be 0). The aggregator corrects the projections with products read
from the gradients themselves (``gram_solvers.upgrad_refine``), re-running the active
set in the correction with free steps from a Gramian factor whose small eigenvalues are
read from the gradients (``gram_solvers.gram_factor``).

The bound asserted, 2e-5 max|g|, is 0.9 to 3.9 eps ||w||_1 max|g| for these inputs
(||w||_1 = 43 to 190, eps = 2^-23): applying the exact weights in float32 alone is off
by up to eps ||w||_1 max|g| (``python -m benchmarks.float32_stationary`` prints the
measured ratio C).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from benchmarks import jd_samplers
from jaxreg._src.optim import gram_solvers


@functools.cache
def _step():
    agg = jr.aggregators.upgrad()
    return jax.jit(lambda j: agg.update({"w": j}, agg.init(None)))


def _update(j):
    upd, state = _step()(jnp.asarray(j, jnp.float32))
    return np.asarray(upd["w"], np.float64), float(state.residual)


_BOUND = 2e-5  # of max|g|: 0.9 to 3.9 eps ||w||_1 here (module docstring)


def _check(kind, seed):
    rng = np.random.default_rng(seed)
    j = jd_samplers.sample(kind, 20, 100, 19, rng)
    gmax = np.linalg.norm(j, axis=1).max()
    with jax.enable_x64(True):
        d64 = np.asarray(jr.aggregators.upgrad_weights(jnp.asarray(j @ j.T))) @ j
    d, residual = _update(j)
    assert np.linalg.norm(d - d64) <= _BOUND * gmax, np.linalg.norm(d - d64) / gmax
    # non-conflicting to the same absolute accuracy: <g_j, d> >= -bound |g_j| max|g|
    slack = (j @ d / np.linalg.norm(j, axis=1)).min() / gmax
    assert slack >= -_BOUND, slack
    assert residual <= 1e-4
    # permutation-invariant and linear under scaling, to the same absolute accuracy
    p = rng.permutation(20)
    perm = np.linalg.norm(_update(j[p])[0] - d) / gmax
    assert perm <= _BOUND, perm
    scale = np.linalg.norm(_update(1e3 * j)[0] - 1e3 * d) / (1e3 * gmax)
    assert scale <= _BOUND, scale
    return d, d64, gmax


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_strongly_stationary_update_is_zero_in_float32(seed):
    # v'J = 0 with v > 0: the dual cone {x: Jx >= 0} is the null space of J, which every
    # row is orthogonal to, so every projection, and the update, is exactly 0. Seeds 3
    # and 4 (smallest singular values 8e-4 and 3e-2) were off by 7e-2 and 4e-3 max|g|
    # before the active set was re-run in the correction.
    d, d64, gmax = _check("strong", seed)
    assert np.linalg.norm(d64) <= 1e-10 * gmax
    assert np.linalg.norm(d) <= _BOUND * gmax


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_weakly_stationary_update_matches_float64(seed):
    # Seeds 0, 3 and 4 were off by 5e-3, 7e-3 and 2e-3 max|g| (seed 3 with cosines
    # down to -0.29) before the active set was re-run in the correction.
    _check("weak", seed)


def _nnls_kkt(h, p, u):
    grad = h @ u - p
    return np.max(np.abs(np.minimum(u, grad))) / np.max(np.abs(p))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nnls_gram_from_matches_scipy_from_any_start(seed):
    # min_{u >= 0} |A u - b|^2 / 2 (full column rank: one solution), warm-started at a
    # random x0 with the gradient H x0 - p; SciPy's NNLS on A itself is the reference.
    from scipy.optimize import nnls

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(12, 6))
    b = rng.normal(size=12)
    ref, _ = nnls(a, b)
    h, p = a.T @ a, a.T @ b
    x0 = np.abs(rng.normal(size=6)) * (rng.random(6) < 0.5)
    with jax.enable_x64(True):
        u = np.asarray(
            gram_solvers.nnls_gram_from(jnp.asarray(h), jnp.asarray(x0), jnp.asarray(h @ x0 - p))
        )
        fac = np.linalg.cholesky(h)
        uf = np.asarray(
            gram_solvers.nnls_gram_from(
                jnp.asarray(h), jnp.asarray(x0), jnp.asarray(h @ x0 - p), factor=jnp.asarray(fac)
            )
        )
    np.testing.assert_allclose(u, ref, atol=1e-10)
    np.testing.assert_allclose(uf, ref, atol=1e-10)
    assert _nnls_kkt(h, p, u) <= 1e-12


def test_gram_factor_reproduces_the_gramian_and_its_small_eigenvalue():
    # M = Q^T H Q with H of eigenvalues 1 ... 1e-9 (float64): L L^T = Q M Q^T, and the
    # factor's smallest singular value squared is H's smallest eigenvalue.
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    lam = np.array([1e-9, 1e-4, 0.1, 1.0, 2.0])
    h = q @ np.diag(lam) @ q.T
    q2 = np.linalg.qr(q + 1e-3 * rng.normal(size=(5, 5)))[0]  # nearly the eigenvectors
    m = q2.T @ h @ q2
    with jax.enable_x64(True):
        fac = np.asarray(gram_solvers.gram_factor(jnp.asarray(q2), jnp.asarray(m)))
    np.testing.assert_allclose(fac @ fac.T, h, atol=1e-14)
    sv = np.linalg.svd(fac, compute_uv=False)
    np.testing.assert_allclose(sv[::-1] ** 2, lam, rtol=1e-5)


def test_correction_reads_every_leaf_of_a_pytree():
    # The same gradients split over two leaves of different shapes: the re-solve (its
    # products and its factor read leaf by leaf) gives the single-leaf update.
    rng = np.random.default_rng(3)
    j = jd_samplers.sample("strong", 20, 100, 19, rng).astype(np.float32)
    agg = jr.aggregators.upgrad()
    tree = {"a": jnp.asarray(j[:, :40]), "b": jnp.asarray(j[:, 40:].reshape(20, 6, 10))}
    upd, state = jax.jit(lambda t: agg.update(t, agg.init(None)))(tree)
    d = np.concatenate([np.asarray(upd["a"]), np.asarray(upd["b"]).reshape(-1)])
    gmax = np.linalg.norm(j, axis=1).max()
    assert float(state.residual) <= 1e-4
    assert np.linalg.norm(d) <= _BOUND * gmax  # strongly stationary: the update is 0
    np.testing.assert_allclose(d, _update(j)[0], atol=_BOUND * gmax)
