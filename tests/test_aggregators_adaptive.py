"""FairGrad, PCD, ExcessMTL and the matrix weightings (MoDo, SDMGrad, CR-MOGM).

Each is checked against an independent float64 NumPy reference written from the paper's
formula (a root finder, an enumeration of the active sets, a replay of the updates), on
its stated properties, and against TorchJD 0.18 where it is installed.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jaxreg as jr
from benchmarks import jd_samplers

agg = jr.aggregators


@functools.cache
def _cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 7))
    pair = np.array([[1.0, 0.0, 0.0], [-0.999, np.sqrt(1 - 0.999**2), 0.0]])
    third = np.array([[0.3, 0.2, 1.0]])
    return {
        "normal": a,
        "cos-0.999": np.vstack([pair, third]),
        "scales": rng.normal(size=(3, 5)) * np.array([[1e-4], [1.0], [1e4]]),
        "rank-def": jd_samplers.sample("non_weak", 4, 6, 2, rng),
        "duplicated": np.vstack([a[:2], a[:1]]),
        "one": a[:1],
    }


def _gram64(j):
    return j @ j.T


# ---------------------------------------------------------------------------- FairGrad


def _fairgrad_ref(j, alpha):
    """Solves (G w)_i = w_i^(-1/alpha) with two SciPy solvers (float64), and keeps the one
    whose residual certifies it: Levenberg-Marquardt in log variables, and a
    trust-region minimisation of the convex potential polished by a root finder."""
    g = j @ j.T
    p = 1 / alpha

    def certified(w):
        return np.all(w > 0) and np.max(np.abs(w**p * (g @ w) - 1)) < 1e-9

    def f(u):
        return np.exp(u * p) * (g @ np.exp(u)) - 1.0

    start = np.log(np.diag(g) ** (-alpha / (1 + alpha)))
    lm = scipy.optimize.least_squares(
        f, start, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=10000
    )
    w = np.exp(lm.x)
    if certified(w):
        return w
    s = np.trace(g) / len(g)
    gs = g / s

    def h(w):
        return np.log(w) if alpha == 1 else w ** (1 - p) / (1 - p)

    def jac(w):
        return gs @ w - w**-p

    def hess(w):
        return gs + np.diag(p * w ** (-p - 1))

    sol = scipy.optimize.minimize(
        lambda w: 0.5 * w @ gs @ w - np.sum(h(w)),
        np.ones(len(g)),
        jac=jac,
        hess=hess,
        method="trust-constr",
        bounds=scipy.optimize.Bounds(1e-12, np.inf),
        options={"gtol": 1e-14, "xtol": 1e-15, "maxiter": 5000},
    )
    w = scipy.optimize.root(jac, sol.x, jac=hess, method="hybr", tol=1e-15).x
    w = w * s ** (-alpha / (1 + alpha))
    assert certified(w)  # the reference's own certificate
    return w


@functools.cache
def _fairgrad_jit(alpha):
    return jax.jit(lambda g: agg.fairgrad_weights(g, alpha=alpha, with_residual=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", ["normal", "cos-0.999", "scales", "rank-def", "duplicated", "one"])
def test_fairgrad_matches_reference_and_is_fair(name, alpha, dtype):
    j = _cases()[name]
    with jax.enable_x64(dtype == jnp.float64):
        w, res = _fairgrad_jit(alpha)(agg.gramian({"w": jnp.asarray(j, dtype)}))
        w = np.asarray(w, np.float64)
    ref = _fairgrad_ref(j, alpha)
    d, dref = w @ j, ref @ j
    tol = 1e-9 if dtype == jnp.float64 else 2e-3
    if dtype == jnp.float32 and name == "scales":  # rows of norm 1e-4 next to 1e4
        tol = 2e-2
    assert np.linalg.norm(d - dref) <= tol * np.linalg.norm(dref), (d, dref)
    # alpha-fair utilities <g_i, d> = w_i^(-1/alpha) > 0: non-conflicting
    util = j @ dref
    assert np.all(util > 0)
    assert float(res) <= (1e-9 if dtype == jnp.float64 else 5e-3)


def test_fairgrad_properties_float64():
    j = _cases()["normal"]
    with jax.enable_x64(True):
        g = jnp.asarray(_gram64(j))
        w1 = np.asarray(_fairgrad_jit(1.0)(g)[0])
        nash = np.asarray(agg.nash_mtl_weights(g))
        np.testing.assert_allclose(w1, nash, rtol=1e-10)  # alpha = 1 is Nash-MTL
        np.testing.assert_allclose(np.asarray(_fairgrad_jit(0.0)(g)[0]), np.full(4, 0.25))
        p = np.array([2, 0, 3, 1])
        for alpha in (0.5, 2.0):
            w = np.asarray(_fairgrad_jit(alpha)(g)[0])
            wp = np.asarray(_fairgrad_jit(alpha)(jnp.asarray(_gram64(j[p])))[0])
            np.testing.assert_allclose(wp, w[p], rtol=1e-10)  # permutation-invariant
            c = 3.0  # J -> cJ gives d -> c^((1 - alpha)/(1 + alpha)) d
            wc = np.asarray(_fairgrad_jit(alpha)(c * c * g)[0])
            np.testing.assert_allclose(
                wc @ (c * j), c ** ((1 - alpha) / (1 + alpha)) * (w @ j), rtol=1e-10
            )
        # orthogonal gradients: w_i = |g_i|^(-2 alpha / (1 + alpha))
        w = np.asarray(_fairgrad_jit(2.0)(jnp.diag(jnp.array([1.0, 4.0, 9.0])))[0])
        np.testing.assert_allclose(w, np.array([1.0, 2.0, 3.0]) ** (-4 / 3), rtol=1e-12)


@pytest.mark.parametrize("kind", ["strong", "weak"])
def test_fairgrad_no_solution_on_stationary_inputs(kind):
    rng = np.random.default_rng(1)
    j = jd_samplers.sample(kind, 5, 4, 3, rng)
    with jax.enable_x64(True):
        w, res = _fairgrad_jit(2.0)(jnp.asarray(_gram64(j)))
    assert np.all(np.asarray(w) == 0) and np.isinf(float(res))
    zero = np.vstack([_cases()["normal"][:2], np.zeros((1, 7))])
    with jax.enable_x64(True):
        w, res = _fairgrad_jit(2.0)(jnp.asarray(_gram64(zero)))
    assert np.all(np.asarray(w) == 0) and np.isinf(float(res))


def _mismatched_scales():
    """Solvable inputs with row norms 1e-4..1e4 and near-opposite pairs: the TorchJD
    comparison's cases (FairGrad once declared them unsolvable) and two built here."""
    from benchmarks import torchjd_compare as tc

    bench = {c.name: c.j for c in tc.cases()}
    rng = np.random.default_rng(3)
    out = {
        name: bench[name]
        for name in (
            "row scales 1e-4..1e4 + cos -0.99 5x100",
            "row scales 1e-4..1e4 + cos -0.99 3x20",
            "row scales 1e-4..1e4 4x50",
        )
    }
    pair = tc._pair(-0.999, 30, 1.0, rng)  # cos -0.999, norms 1e-4 and 1e4, a third at 1
    out["cos -0.999 1e-4/1e4 + 1"] = np.vstack(
        [1e-4 * pair[0], 1e4 * pair[1], rng.normal(size=30) / np.sqrt(30)]
    )
    j = np.vstack([tc._pair(-0.99, 40, 1.0, rng), rng.normal(size=(2, 40)) / np.sqrt(40)])
    out["cos -0.99 1e4/1e-4 + 1e-2, 1e2"] = j * np.array([1e4, 1e-4, 1e-2, 1e2])[:, None]
    return out


def _fairgrad_certificate(g, w, alpha, eps):
    r"""``(residual, floor)``: :math:`\max_i |w_i^{1/\alpha}(G w)_i - 1|` in float64 and the
    rounding floor of its evaluation, :math:`10 n \epsilon \max_i (|G||w|)_i/|(G w)_i|`
    (near-opposite rows of norms 1e-4 and 1e4 cancel in :math:`(G w)_i`)."""
    gw = g @ w
    floor = 10 * len(w) * eps * np.max((np.abs(g) @ w) / np.abs(gw))
    return np.max(np.abs(w ** (1 / alpha) * gw - 1)), floor


_MISMATCHED = [
    "row scales 1e-4..1e4 + cos -0.99 5x100",
    "row scales 1e-4..1e4 + cos -0.99 3x20",
    "row scales 1e-4..1e4 4x50",
    "cos -0.999 1e-4/1e4 + 1",
    "cos -0.99 1e4/1e-4 + 1e-2, 1e2",
]
# float32 where the evaluation's rounding floor is below 1: alpha = 0.5 makes
# max (|G||w|)_i/|(G w)_i| reach 1e5-1e11 here (beyond float32's 1/eps), alpha = 2 on the
# cos -0.999 and cos -0.99 x 1e4/1e-4 cases 1e6-1e7.
_MISMATCHED_32 = [(name, 1.0) for name in _MISMATCHED] + [(name, 2.0) for name in _MISMATCHED[:3]]


@pytest.mark.parametrize(
    "name, alpha, dtype",
    [(name, alpha, jnp.float64) for name in _MISMATCHED for alpha in (0.5, 1.0, 2.0)]
    + [(name, alpha, jnp.float32) for name, alpha in _MISMATCHED_32],
)
def test_fairgrad_solves_mismatched_scales(name, alpha, dtype):
    # Linearly independent rows (0 is not in their hull): a solution exists. It used to
    # end with zero weights and an infinite residual, or a residual of 0.6-1.
    j = _mismatched_scales()[name]
    assert np.linalg.matrix_rank(j / np.linalg.norm(j, axis=1, keepdims=True)) == len(j)
    with jax.enable_x64(dtype == jnp.float64):
        g = jnp.asarray(_gram64(j), dtype)
        w, res = _fairgrad_jit(alpha)(g)
    w = np.asarray(w, np.float64)
    assert np.all(w > 0), w
    # the defining equation, in float64 NumPy on the (rounded) unscaled Gramian
    tol = 1e-9 if dtype == jnp.float64 else 1e-3
    residual, floor = _fairgrad_certificate(
        np.asarray(g, np.float64), w, alpha, float(jnp.finfo(dtype).eps)
    )
    assert floor < 1  # the check can fail
    assert residual <= max(tol, floor), (residual, floor)
    assert float(res) <= max(tol, floor)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_no_solution_at_mismatched_scales(alpha):
    # 0 in the hull: g next to -g (norms 1e-4 and 1e4), and a zero row next to rows of
    # norms 1e-4 and 1e4: zero weights and an infinite residual.
    rng = np.random.default_rng(4)
    v = rng.normal(size=(2, 20))
    opposite = np.vstack([1e-4 * v[0], -1e4 * v[0], v[1]])
    zero = np.vstack([1e-4 * v[0], 1e4 * v[1], np.zeros(20)])
    for j in (opposite, zero):
        with jax.enable_x64(True):
            w, res = _fairgrad_jit(alpha)(jnp.asarray(_gram64(j)))
        assert np.all(np.asarray(w) == 0) and np.isinf(float(res))


def test_fairgrad_against_torchjd():
    torch = pytest.importorskip("torch")
    tja = pytest.importorskip("torchjd.aggregation")
    for name in ("normal", "cos-0.999", "rank-def", "duplicated"):
        j = _cases()[name]
        for alpha in (0.5, 1.0, 2.0):
            theirs = tja.FairGradWeighting(alpha)(torch.tensor(_gram64(j))).numpy()
            with jax.enable_x64(True):
                ours = np.asarray(agg.fairgrad_weights(jnp.asarray(_gram64(j)), alpha=alpha))
            # least_squares stops at its default tolerances (about 1e-8 relative)
            np.testing.assert_allclose(ours @ j, theirs @ j, rtol=1e-5, atol=1e-6)


def test_fairgrad_aggregator_jits_and_rejects_bad_alpha():
    a = agg.fairgrad(alpha=2.0)
    j = _cases()["normal"]
    upd, state = jax.jit(a.update)({"w": jnp.asarray(j, jnp.float32)}, a.init(None))
    ref = _fairgrad_ref(j, 2.0) @ j
    np.testing.assert_allclose(np.asarray(upd["w"]), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    assert float(state.residual) < 1e-3
    with pytest.raises(jr.ConfigError, match="alpha"):
        agg.fairgrad(alpha=-1.0)


# ---------------------------------------------------------------------------------- PCD


def _pcd_ref(j, tau, scales=None):
    """PCD by enumerating the active sets of the QP (the paper's reference, App. B.2)."""
    m = j.shape[0]
    norms = np.linalg.norm(j, axis=1)
    s = np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 0) if scales is None else scales
    jt = j * s[:, None]
    g1, sec = jt[0], jt[1:]
    taus = np.broadcast_to(np.asarray(tau, float), (m - 1,))
    target = taus * np.sum(sec**2, axis=1)
    best = None
    for k in range(m):
        for act in itertools.combinations(range(m - 1), k):
            act = list(act)
            mu = np.zeros(m - 1)
            if act:
                ga = sec[act]
                sol, *_ = np.linalg.lstsq(ga @ ga.T, target[act] - ga @ g1, rcond=None)
                mu[act] = sol
            d = g1 + mu @ sec
            if np.all(mu >= -1e-12) and np.all(sec @ d >= target - 1e-9):
                val = 0.5 * np.sum((d - g1) ** 2)
                if best is None or val < best[0] - 1e-14:
                    best = (val, d)
    if best is None:  # infeasible: the constraints are dropped
        return j[0].copy()
    d = best[1]
    return d * norms[0] / np.linalg.norm(d) if np.linalg.norm(d) > 0 else d


@functools.cache
def _pcd_jit(tau):
    return jax.jit(lambda g: agg.pcd_weights(g, tau=tau, with_residual=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("tau", [0.0, 0.3])
@pytest.mark.parametrize("name", ["normal", "cos-0.999", "scales", "rank-def", "duplicated", "one"])
def test_pcd_matches_active_set_enumeration(name, tau, dtype):
    j = _cases()[name]
    with jax.enable_x64(dtype == jnp.float64):
        w, res = _pcd_jit(tau)(agg.gramian({"w": jnp.asarray(j, dtype)}))
        w = np.asarray(w, np.float64)
    ref = _pcd_ref(j, tau)
    tol = 1e-9 if dtype == jnp.float64 else 2e-3
    assert np.linalg.norm(w @ j - ref) <= tol * np.linalg.norm(ref), (w @ j, ref)
    # certificate: each secondary gets tau of its normalised progress. With the unit
    # scales, w_1 = 1 / |d~|, so d~ = d / (w_1 |g_1|).
    if len(j) > 1:
        unit = j / np.linalg.norm(j, axis=1, keepdims=True)
        dt = (w @ j) / (w[0] * np.linalg.norm(j[0]))
        assert np.all(unit[1:] @ dt >= tau - 10 * tol)
    assert float(res) <= (1e-9 if dtype == jnp.float64 else 1e-3)


def test_pcd_special_cases_and_scale_invariance():
    rng = np.random.default_rng(3)
    g1 = rng.normal(size=5)
    u = rng.normal(size=5)
    with jax.enable_x64(True):
        # infeasible: two anti-parallel secondaries -> the primary gradient
        j = np.stack([g1, u, -2.0 * u])
        w = np.asarray(agg.pcd_weights(jnp.asarray(_gram64(j)), tau=0.1))
        np.testing.assert_allclose(w, [1.0, 0.0, 0.0])
        # a zero primary gradient -> 0
        j = np.stack([np.zeros(5), u, g1])
        assert np.all(np.asarray(agg.pcd_weights(jnp.asarray(_gram64(j)))) == 0)
        # secondary rows scaled by any positive factor: the same update
        j = _cases()["normal"]
        c = np.array([1.0, 1e-3, 7.0, 1e3])
        d1 = np.asarray(agg.pcd_weights(jnp.asarray(_gram64(j)), tau=0.2)) @ j
        d2 = np.asarray(agg.pcd_weights(jnp.asarray(_gram64(j * c[:, None])), tau=0.2)) @ (
            j * c[:, None]
        )
        np.testing.assert_allclose(d1, d2, rtol=1e-10)


def test_pcd_aggregator_against_torchjd_over_steps():
    torch = pytest.importorskip("torch")
    tja = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(4)
    theirs = tja.PCD(tau=0.2, beta=0.9)
    with jax.enable_x64(True):
        a = agg.pcd(4, tau=0.2, beta=0.9)
        state = a.init(None)
        step = jax.jit(a.update)
        for _ in range(4):
            j = rng.normal(size=(4, 6)) * np.array([[1.0], [3.0], [0.1], [1.0]])
            upd, state = step({"w": jnp.asarray(j)}, state)
            ref = theirs(torch.tensor(j)).numpy()
            np.testing.assert_allclose(np.asarray(upd["w"]), ref, rtol=1e-9, atol=1e-12)
            assert float(state.residual) < 1e-9
    assert int(state.step) == 4


def test_pcd_non_finite_step_keeps_the_average():
    a = agg.pcd(3)
    state = a.init(None)
    j = jnp.asarray(_cases()["normal"][:3], jnp.float32)
    _, state = a.update({"w": j}, state)
    upd, state2 = a.update({"w": j.at[0, 0].set(jnp.nan)}, state)
    assert np.all(np.isnan(np.asarray(upd["w"])))
    np.testing.assert_array_equal(np.asarray(state2.sq_norm_ema), np.asarray(state.sq_norm_ema))
    assert int(state2.step) == 1
    with pytest.raises(jr.ConfigError, match="tau"):
        agg.pcd(3, tau=[0.1])


# ---------------------------------------------------------------------------- ExcessMTL


def _excess_ref(js, eta, warmup):
    m = js[0].shape[0]
    w = np.full(m, 1 / m)
    s = np.zeros_like(js[0])
    initial, wsum, out = None, np.zeros(m), []
    for t, j in enumerate(js):
        s = s + j**2
        e = np.sum(j**2 / np.sqrt(s + 1e-7), axis=1)
        if t < warmup:
            wsum += e
            out.append(w.copy())
            continue
        if initial is None:
            if warmup > 0:
                initial = wsum / warmup
                e = e / (initial + 1e-7)
            else:
                initial = e
        else:
            e = e / (initial + 1e-7)
        z = np.log(w) + eta * e
        w = np.exp(z - z.max())
        w = w / w.sum()
        out.append(w.copy())
    return out


@pytest.mark.parametrize("warmup", [0, 2])
def test_excess_mtl_replays_the_paper_update(warmup):
    rng = np.random.default_rng(5)
    js = [rng.normal(size=(3, 4)) * np.array([[1.0], [0.2], [2.0]]) for _ in range(5)]
    ref = _excess_ref(js, 0.5, warmup)
    a = agg.excess_mtl(3, robust_step_size=0.5, n_warmup_steps=warmup)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(1)}
    state = a.init(params)
    step = jax.jit(a.update)
    for j, wref in zip(js, ref, strict=True):
        stacked = {"a": jnp.asarray(j[:, :3], jnp.float32), "b": jnp.asarray(j[:, 3:], jnp.float32)}
        upd, state = step(stacked, state)
        np.testing.assert_allclose(np.asarray(state.weights), wref, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(upd["a"]), wref @ j[:, :3], rtol=1e-4, atol=1e-6)
        assert abs(float(state.weights.sum()) - 1) < 1e-6 and float(state.weights.min()) >= 0


def test_excess_mtl_against_torchjd():
    torch = pytest.importorskip("torch")
    tja = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(6)
    theirs = tja.ExcessMTLWeighting(robust_step_size=0.7, n_warmup_steps=1)
    a = agg.excess_mtl(3, robust_step_size=0.7, n_warmup_steps=1)
    with jax.enable_x64(True):
        state = a.init({"w": jnp.zeros(5)})
        for _ in range(4):
            j = rng.normal(size=(3, 5))
            _, state = a.update({"w": jnp.asarray(j)}, state)
            np.testing.assert_allclose(
                np.asarray(state.weights), theirs(torch.tensor(j)).numpy(), rtol=1e-6
            )


# ------------------------------------------------------------------ matrix weightings


def _simplex_ref(y):
    """Projection on the simplex by bisection on the threshold (independent of sorting)."""
    lo, hi = y.min() - 1, y.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(y - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(y - (lo + hi) / 2, 0)


def test_project_simplex_matches_bisection():
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        for y in [rng.normal(size=5) * 3, np.array([0.2, 0.3, 0.5]), np.array([5.0, -1.0])]:
            np.testing.assert_allclose(
                np.asarray(jr.weighting.project_simplex(jnp.asarray(y))),
                _simplex_ref(y),
                atol=1e-12,
            )


def test_modo_and_sdmgrad_replay_and_match_torchjd():
    rng = np.random.default_rng(8)
    mats = [rng.normal(size=(3, 6)) @ rng.normal(size=(3, 6)).T for _ in range(3)]
    # MoDo: lambda <- P(lambda - gamma (A lambda + rho lambda))
    with jax.enable_x64(True):
        modo = jr.weighting.modo(gamma=0.05, rho=0.1)
        state = modo.init(3)
        lam = np.full(3, 1 / 3)
        for a in mats:
            w, state = jax.jit(modo.update)(jnp.asarray(a), state)
            lam = _simplex_ref(lam - 0.05 * (a @ lam + 0.1 * lam))
            np.testing.assert_allclose(np.asarray(w), lam, atol=1e-12)
        # SDMGrad: momentum SGD on the simplex, the iterate kept across calls
        sdm = jr.weighting.sdmgrad(lr=0.3, momentum=0.5, iterations=7, lambda_=0.3)
        state = sdm.init(3)
        wi, wt = np.full(3, 1 / 3), np.full(3, 1 / 3)
        for a in mats:
            out, state = jax.jit(sdm.update)(jnp.asarray(a), state)
            an = a / (np.mean(np.sqrt(np.maximum(np.diag(a), 0))) ** 2 + 1e-8)
            v = None
            for _ in range(7):
                grad = an @ (wi + 0.3 * wt)
                v = grad if v is None else 0.5 * v + grad
                wi = _simplex_ref(wi - 0.3 * v)
            np.testing.assert_allclose(np.asarray(out), (wi + 0.3 * wt) / 1.3, atol=1e-10)
    torch = pytest.importorskip("torch")
    tja = pytest.importorskip("torchjd.aggregation")
    with jax.enable_x64(True):
        for ours, theirs in [
            (jr.weighting.modo(gamma=0.05, rho=0.1), tja.MoDoWeighting(gamma=0.05, rho=0.1)),
            (jr.weighting.sdmgrad(), tja.SDMGradWeighting()),
            (
                jr.weighting.cr_mogm(jr.weighting.modo(), alpha=0.7),
                tja.CRMOGMWeighting(tja.MoDoWeighting(), alpha=0.7),
            ),
        ]:
            state = ours.init(3)
            for a in mats:
                w, state = ours.update(jnp.asarray(a), state)
                np.testing.assert_allclose(
                    np.asarray(w), theirs(torch.tensor(a)).numpy(), atol=1e-10
                )


def test_cr_mogm_is_an_ema_of_the_wrapped_weights_in_a_scan():
    rng = np.random.default_rng(9)
    js = rng.normal(size=(4, 3, 5))
    with jax.enable_x64(True):
        a = jr.weighting.as_aggregator(
            jr.weighting.cr_mogm(agg.upgrad_weights, alpha=0.6), num_tasks=3
        )

        def step(state, j):
            upd, state = a.update({"w": j}, state)
            return state, (upd["w"], state.weights)

        _, (upds, ws) = jax.jit(lambda s, x: jax.lax.scan(step, s, x))(
            a.init(None), jnp.asarray(js)
        )
        hats = [np.asarray(agg.upgrad_weights(jnp.asarray(j @ j.T))) for j in js]
    lam = hats[0]
    for k, (hat, w, upd, j) in enumerate(zip(hats, ws, upds, js, strict=True)):
        lam = hat if k == 0 else 0.6 * lam + 0.4 * hat
        np.testing.assert_allclose(np.asarray(w), lam, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(upd), lam @ j, rtol=1e-9, atol=1e-12)
    # initial weights: the first output is already smoothed
    cr = jr.weighting.cr_mogm(agg.mgda_weights, alpha=0.5, initial_weights=jnp.array([1.0, 0.0]))
    w, _ = cr.update(jnp.eye(2), cr.init(2))
    np.testing.assert_allclose(np.asarray(w), [0.75, 0.25], rtol=1e-6)
    with pytest.raises(jr.ConfigError, match="initial_weights"):
        cr.init(3)


def test_cross_gramian_is_ja_jb_transposed():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    out = agg.cross_gramian({"x": jnp.asarray(a, jnp.float32)}, {"x": jnp.asarray(b, jnp.float32)})
    np.testing.assert_allclose(np.asarray(out), a.reshape(3, -1) @ b.reshape(3, -1).T, rtol=1e-5)
