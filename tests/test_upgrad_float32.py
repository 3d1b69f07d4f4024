"""UPGrad in float32 on stationary rank-deficient Jacobians (TorchJD's samplers, 20 x 100).

A float32 Gramian carries rounding errors of eps |g_i||g_j|; where the projections onto
the dual cone are near 0 (0 in the convex hull of the gradients), solving on it alone
leaves updates of about sqrt(eps) |v| max|g| (3e-3 max|g| here, cosines down to -0.4 on
an update that should be 0). The aggregator corrects the projections with products read
from the gradients themselves (``gram_solvers.upgrad_refine``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from benchmarks import jd_samplers


@functools.cache
def _step():
    agg = jr.aggregators.upgrad()
    return jax.jit(lambda j: agg.update({"w": j}, agg.init(None)))


def _update(j):
    upd, state = _step()(jnp.asarray(j, jnp.float32))
    return np.asarray(upd["w"], np.float64), float(state.residual)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strongly_stationary_update_is_zero_in_float32(seed):
    # v'J = 0 with v > 0: the dual cone {x: Jx >= 0} is the null space of J, which every
    # row is orthogonal to, so every projection, and the update, is exactly 0.
    rng = np.random.default_rng(seed)
    j = jd_samplers.sample("strong", 20, 100, 19, rng)
    gmax = np.linalg.norm(j, axis=1).max()
    d, residual = _update(j)
    assert np.linalg.norm(d) <= 2e-5 * gmax, np.linalg.norm(d) / gmax
    assert residual <= 1e-4
    # permutation-invariant and linear under scaling, to the same absolute accuracy
    p = rng.permutation(20)
    assert np.linalg.norm(_update(j[p])[0] - d) <= 4e-5 * gmax
    assert np.linalg.norm(_update(1e3 * j)[0] - 1e3 * d) <= 4e-5 * 1e3 * gmax


@pytest.mark.parametrize("seed", [1, 2])
def test_weakly_stationary_update_matches_float64(seed):
    rng = np.random.default_rng(seed)
    j = jd_samplers.sample("weak", 20, 100, 19, rng)
    gmax = np.linalg.norm(j, axis=1).max()
    with jax.enable_x64(True):
        d64 = np.asarray(jr.aggregators.upgrad_weights(jnp.asarray(j @ j.T))) @ j
    d, _ = _update(j)
    assert np.linalg.norm(d - d64) <= 2e-5 * gmax, np.linalg.norm(d - d64) / gmax
    cos = j @ d / np.linalg.norm(j, axis=1) / np.linalg.norm(d)
    assert cos.min() >= -1e-4  # non-conflicting to float32 accuracy
