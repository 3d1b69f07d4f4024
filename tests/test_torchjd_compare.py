"""The NumPy certificates and replays of ``benchmarks/torchjd_compare.py`` (no torch):
each against a hand-computed answer or an independent optimality condition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from benchmarks import torchjd_compare as tc


@pytest.mark.parametrize("seed", range(4))
def test_simplex_projection_kkt(seed):
    """x = max(y - t, 0) on the simplex: the KKT conditions of the projection."""
    y = np.random.default_rng(seed).normal(size=6) * 3
    x = tc._simplex(y)
    assert abs(x.sum() - 1) < 1e-12 and np.all(x >= 0)
    t = np.mean((y - x)[x > 0])
    np.testing.assert_allclose((y - x)[x > 0], t, atol=1e-12)
    assert np.all(y[x == 0] <= t + 1e-12)
    # at |y| ~ 1e20 only the shift by max(y) keeps the threshold exact
    np.testing.assert_array_equal(tc._simplex(np.array([1e20, 0.0])), [1.0, 0.0])


def test_gradvac_replay_first_step_is_pcgrad():
    """Zero targets: GradVac's first step is PCGrad's (by hand for (1, 0), (-1, 1):
    g1 + (0.5, 0.5) and g2 + (1, 0))."""
    j = np.array([[1.0, 0.0], [-1.0, 1.0]])
    orders = [np.array([[0, 1], [1, 0]])]
    d, closest = tc.gradvac_replay(j, orders)
    np.testing.assert_allclose(d, [0.5, 1.5], atol=1e-15)
    assert closest > 0.1
    rng = np.random.default_rng(0)
    j = rng.normal(size=(4, 7))
    orders = [np.stack([rng.permutation(4) for _ in range(4)])]
    np.testing.assert_allclose(
        tc.gradvac_replay(j, orders)[0], tc.pcgrad_replay(j, orders[0])[0], atol=1e-12
    )
    # collinear rows: the tests are rounding (1 - |cos| = 0), undecided
    two = [np.array([[0, 1], [1, 0]])]
    assert tc.gradvac_replay(np.array([[1.0, 0.0], [-2.0, 0.0]]), two)[1] < 1e-10


def test_excess_mtl_replay_by_hand_and_jaxreg():
    """One step: softmax(log(1/n) + E), E_i = sum_k g_ik^2 / sqrt(g_ik^2 + 1e-7); three
    steps against jaxreg's float32 state."""
    j = np.array([[1.0, 2.0], [0.5, -1.0]])
    e = (j**2 / np.sqrt(j**2 + 1e-7)).sum(1)
    w = np.exp(e) / np.exp(e).sum()
    np.testing.assert_allclose(tc.excess_mtl_replay(j, 1), w @ j, rtol=1e-14)
    agg = jr.aggregators.excess_mtl(num_tasks=2)
    state = agg.init({"p": jnp.zeros(2)})
    for _ in range(3):
        d, state = agg.update({"p": jnp.asarray(j, jnp.float32)}, state)
    np.testing.assert_allclose(np.asarray(d["p"]), tc.excess_mtl_replay(j, 3), rtol=1e-5)


def test_cert_pcd_zero_for_jaxreg_positive_for_wrong():
    """PCD's NNLS certificate: 0 for jaxreg's first step on independent secondaries,
    positive for the plain primary gradient where a constraint binds."""
    rng = np.random.default_rng(1)
    j = rng.normal(size=(3, 6))
    j[1] = -j[0] + 0.1 * j[1]  # conflicts with the primary: its constraint binds
    with jax.enable_x64(True):
        agg = jr.aggregators.pcd(num_tasks=3)
        d, _ = agg.update({"p": jnp.asarray(j)}, agg.init({"p": jnp.zeros(6)}))
    assert tc.cert_pcd(j, np.asarray(d["p"]), {}) < 1e-10
    assert tc.cert_pcd(j, j[0], {}) > 1e-2


def test_cert_config_and_krum_by_hand():
    """ConFIG on orthogonal gradients of norms 1 and 2 is (1.5, 1.5); Krum picks the
    row nearest the others by squared distances."""
    j = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert tc.cert_config(j, np.array([1.5, 1.5]), {}) < 1e-15
    assert tc.cert_config(j, np.array([1.0, 2.0]), {}) > 0.1
    j = np.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-5.0, 9.0]])
    np.testing.assert_array_equal(tc._krum_ref(j, {}), j[0])


def test_cert_dualproj():
    """The mean of (1, 0) and (-2, 1) is (-0.5, 0.5); its projection on the dual cone is
    (0, 0.5) (docstring of ``dualproj``); the mean itself conflicts with g1."""
    j = np.array([[1.0, 0.0], [-2.0, 1.0]])
    assert tc.cert_dualproj(j, np.array([0.0, 0.5]), {}) < 1e-12
    assert tc.cert_dualproj(j, j.mean(0), {}) > 0.5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_project_simplex_and_modo_at_large_scale(dtype):
    """Found by the weightings table: unshifted, ``u_1 - (u_1 - 1)`` rounds to 0 at
    |y| ~ 1e16 (1e8 in float32) and every weight became 0 (MoDo at gradient scale
    1e10). The projection of (s, 0) is (1, 0) for any s > 1; MoDo's weights stay on the
    simplex and equal the float64 replay."""
    with jax.enable_x64(dtype == jnp.float64):
        for s in (1e9, 1e20):
            w = jr.weighting.project_simplex(jnp.asarray([s, 0.0, -s], dtype))
            np.testing.assert_array_equal(np.asarray(w), [1.0, 0.0, 0.0])
        j = 1e10 * np.random.default_rng(2).normal(size=(3, 4))
        gs = tc.weighting_matrices(j)
        wm = jr.weighting.modo()
        state = wm.init(3)
        for g in gs:
            w, state = wm.update(jnp.asarray(g, dtype), state)
        assert abs(float(jnp.sum(w)) - 1) < 1e-6
        np.testing.assert_allclose(np.asarray(w, np.float64), tc.modo_replay(gs), atol=1e-6)
