"""The TorchJD aggregators jaxreg adds, against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr


def _imtl_ref(j):
    g = j @ j.T
    d = np.sqrt(np.diag(g))
    v = np.linalg.pinv(g, hermitian=True) @ d
    return v / v.sum()


def _cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 6))
    pair = np.array([[1.0, 0.0, 0.0], [-0.999, np.sqrt(1 - 0.999**2), 0.0]])
    scaled = rng.normal(size=(3, 5)) * np.array([[1e-4], [1.0], [1e4]])
    return {"normal": a, "cos-0.999": pair, "scales": scaled, "one": a[:1]}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ["normal", "cos-0.999", "one"])
def test_imtl_g_matches_reference_and_equal_projections(name, dtype):
    j = _cases()[name]
    with jax.enable_x64(dtype == jnp.float64):
        agg = jr.aggregators.imtl_g()
        upd, state = jax.jit(agg.update)({"w": jnp.asarray(j, dtype)}, agg.init(None))
        d = np.asarray(upd["w"], np.float64)
    ref = _imtl_ref(j) @ j
    tol = 1e-10 if dtype == jnp.float64 else 2e-3
    np.testing.assert_allclose(d, ref, rtol=tol, atol=tol * np.abs(ref).max())
    proj = j @ ref / np.linalg.norm(j, axis=1)
    if name != "scales":  # 1e-8..1e8 eigenvalues: pinv drops one, as TorchJD's does
        assert np.ptp(proj) <= 1e-8 * np.abs(proj).max() and proj.min() >= 0  # non-conflicting
    assert float(state.residual) <= (1e-9 if dtype == jnp.float64 else 1e-2)
    # invariant to the gradients' scale and permutation-invariant
    with jax.enable_x64(True):
        w = np.asarray(jr.aggregators.imtl_g_weights(jnp.asarray(j @ j.T)))
        w2 = np.asarray(jr.aggregators.imtl_g_weights(jnp.asarray(9.0 * (j @ j.T))))
        p = np.arange(len(j))[::-1]
        wp = np.asarray(jr.aggregators.imtl_g_weights(jnp.asarray(j[p] @ j[p].T)))
    np.testing.assert_allclose(w, w2, rtol=1e-9)
    np.testing.assert_allclose(wp, w[p], rtol=1e-8, atol=1e-12)


def test_random_is_softmax_of_normal_and_the_key_advances():
    agg = jr.aggregators.random(seed=3)
    state = agg.init(None)
    j = {"w": jnp.eye(3)}
    step = jax.jit(agg.update)
    u1, state1 = step(j, state)
    u2, _ = step(j, state1)
    sub = jax.random.split(state.key)[1]
    ref = np.exp(np.asarray(jax.random.normal(sub, (3,))))
    np.testing.assert_allclose(np.asarray(u1["w"]), ref / ref.sum(), rtol=1e-6)
    assert not np.allclose(u1["w"], u2["w"])
    assert abs(float(u1["w"].sum()) - 1) < 1e-6 and float(u1["w"].min()) > 0
