"""The TorchJD aggregators jaxreg adds, against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr


def _imtl_ref(j):
    """IMTL-G on the Jacobian in float64: ``(w, d, spread)``.

    The least-squares minimum-norm ``x`` with ``u_i^T x = 1`` on the unit gradients
    (``pinv(U) @ 1``; no Gramian is inverted), its minimum-norm coefficients
    ``U^T a = x``, ``v = a / |g_i|``, ``w = v / sum(v)`` (TorchJD's normalisation),
    ``d = x / sum(v)``; zeros where no direction has positive projections on all.
    ``spread`` is ``max_i |u_i^T x - 1|`` (0 when equal projections exist).
    """
    norms = np.linalg.norm(j, axis=1)
    nz = norms > 0
    u = np.zeros_like(j)
    u[nz] = j[nz] / norms[nz, None]
    x = np.linalg.lstsq(u, nz.astype(np.float64), rcond=None)[0]
    a = np.linalg.lstsq(u.T, x, rcond=None)[0]
    v = np.where(nz, a / np.where(nz, norms, 1.0), 0.0)
    spread = float(np.max(np.abs(u[nz] @ x - 1.0), initial=0.0))
    if np.linalg.norm(x) < 1e-8 or abs(v.sum()) < 1e-9 * np.abs(v).sum():
        return np.zeros(len(j)), np.zeros(j.shape[1]), spread
    return v / v.sum(), x / v.sum(), spread


def _cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 6))
    pair = np.array([[1.0, 0.0, 0.0], [-0.999, np.sqrt(1 - 0.999**2), 0.0]])
    scaled = rng.normal(size=(6, 20)) * np.logspace(-4, 4, 6)[:, None]  # cond(G) ~ 1e16
    b = rng.normal(size=(3, 7)) * np.array([[1e-4], [1.0], [1e4]])
    c = rng.normal(size=(3, 8))
    return {
        "normal": a,
        "cos-0.999": pair,
        "scales": scaled,
        "scales-cos-0.999": pair * np.array([[1e-4], [1e4]]),
        "dup-zero": np.vstack([b, 3.0 * b[1:2], np.zeros((1, 7))]),  # equal projections exist
        "rank-def": np.vstack([c, c[0] + c[1]]) * np.array([[1e-4], [1.0], [1e4], [1e2]]),
        "opposite": np.array([[1.0, 2.0, 0.0], [-1e-3, -2e-3, 0.0]]),  # no common direction
        "zero": np.zeros((2, 3)),
        "one": a[:1],
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", list(_cases()))
def test_imtl_g_equal_projections_against_jacobian_reference(name, dtype):
    j = _cases()[name]
    with jax.enable_x64(dtype == jnp.float64):
        agg = jr.aggregators.imtl_g()
        upd, state = jax.jit(agg.update)({"w": jnp.asarray(j, dtype)}, agg.init(None))
        d = np.asarray(upd["w"], np.float64)
        w = np.asarray(jr.aggregators.imtl_g_weights(jnp.asarray(j @ j.T, dtype)), np.float64)
    w_ref, d_ref, spread_ref = _imtl_ref(j)
    cos_pair = "cos" in name  # cond(G_hat) = 2e3
    tol = (1e-11 if dtype == jnp.float64 else 1e-5) * (2e3 if cos_pair else 1.0)
    scale = max(np.abs(d_ref).max(), 1e-300)
    np.testing.assert_allclose(d, d_ref, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(
        w * np.linalg.norm(j, axis=1),
        w_ref * np.linalg.norm(j, axis=1),
        rtol=tol,
        atol=tol * np.abs(w_ref * np.linalg.norm(j, axis=1)).max(),
    )
    assert w.sum() == pytest.approx(1.0 if w_ref.any() else 0.0, abs=tol)
    # the defining property: equal projections on the unit gradients, to the rounding
    nz = np.linalg.norm(j, axis=1) > 0
    if spread_ref < 1e-12 and d_ref.any():
        proj = j[nz] @ d / np.linalg.norm(j[nz], axis=1)
        assert np.ptp(proj) <= tol * np.abs(proj).mean()
        assert float(state.residual) <= tol
    else:  # no equal-projection direction: the residual (float32 in the state) says how far
        assert float(state.residual) == pytest.approx(spread_ref, rel=max(tol, 1e-6), abs=tol)


@pytest.mark.parametrize("name", ["normal", "scales", "dup-zero", "rank-def"])
def test_imtl_g_weights_permutation_and_scale_invariant(name):
    j = _cases()[name]
    p = np.arange(len(j))[::-1]
    with jax.enable_x64(True):
        w = np.asarray(jr.aggregators.imtl_g_weights(jnp.asarray(j @ j.T)))
        w2 = np.asarray(jr.aggregators.imtl_g_weights(jnp.asarray(1e6 * (j @ j.T))))
        wp = np.asarray(jr.aggregators.imtl_g_weights(jnp.asarray(j[p] @ j[p].T)))
    top = np.abs(w).max()
    np.testing.assert_allclose(w2, w, rtol=1e-10, atol=1e-12 * top)
    np.testing.assert_allclose(wp, w[p], rtol=1e-10, atol=1e-12 * top)


def test_imtl_g_is_not_non_conflicting():
    # u3 = (1, 1, 1)/sqrt(3): x = (1, 1, sqrt(3) - 2), U^T a = x for
    # a = (3 - sqrt(3), 3 - sqrt(3), 3 - 2 sqrt(3)); a small |g_3| makes sum(a_i / |g_i|) < 0,
    # so the equal projections are all negative.
    j = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.05, 0.05, 0.05]])
    with jax.enable_x64(True):
        agg = jr.aggregators.imtl_g()
        upd, state = agg.update({"w": jnp.asarray(j)}, agg.init(None))
    d = np.asarray(upd["w"])
    r3 = np.sqrt(3.0)
    s = 2 * (3 - r3) + (3 - 2 * r3) / np.linalg.norm(j[2])
    np.testing.assert_allclose(d, np.array([1.0, 1.0, r3 - 2]) / s, rtol=1e-12)
    proj = j @ d / np.linalg.norm(j, axis=1)
    np.testing.assert_allclose(proj, np.full(3, 1 / s), rtol=1e-12)
    assert s < 0 and proj.max() < 0 and float(state.residual) < 1e-14


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


def test_imtl_g_homogeneous_but_not_linear_under_scaling():
    # d = x / sum_i(a_i / (c_i |g_i|)) for row scales c: the direction x depends on the unit
    # gradients only, the length is not linear in c (TorchJD's "linear under scaling": no).
    j = _cases()["normal"]
    c1, c2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.25, 1.0])
    with jax.enable_x64(True):
        agg = jr.aggregators.imtl_g()

        def f(m):
            return np.asarray(agg.update({"w": jnp.asarray(m)}, agg.init(None))[0]["w"])

        d, d5 = f(j), f(5.0 * j)
        d1, d2, d12 = f(c1[:, None] * j), f(c2[:, None] * j), f((c1 + c2)[:, None] * j)
    np.testing.assert_allclose(d5, 5.0 * d, rtol=1e-12)
    for di in (d1, d2, d12):  # same direction
        np.testing.assert_allclose(di / np.linalg.norm(di), d / np.linalg.norm(d), atol=1e-12)
    assert np.linalg.norm(d12 - d1 - d2) > 0.1 * np.linalg.norm(d12)
