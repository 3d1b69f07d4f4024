"""AlignedMTL, ConFIG, DualProj, GradDrop, GradVac, Krum, TrimmedMean and UPGrad's
``pref_vector``: against float64 NumPy/SciPy references written from the papers
(``conflict_refs``), against TorchJD 0.18 where it is installed, and the properties
TorchJD documents, as certificates, in float64 and float32 on hard inputs."""

import functools
import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg as jr
from benchmarks import conflict_refs as ref

CASES = ref.hard_jacobians()
DTYPES = [jnp.float32, jnp.float64]


def _ids(dtype):
    return jnp.dtype(dtype).name


def _scale(j: np.ndarray) -> float:
    return float(np.linalg.norm(j, axis=1).max())


def _close(d, expected, tol, scale):
    """``|d - expected| <= tol * scale`` elementwise (scale: the largest gradient norm)."""
    d = np.asarray(d, np.float64)
    err = np.max(np.abs(d - expected)) / scale
    assert err <= tol, f"error {err:.3g} > {tol:.3g}"


_JITTED = {}


def _jitted(fn, static):
    """``fn(gramian(stacked), pref_vector=..., **static, with_residual=True)``, jitted once
    per function and static options (the tests' shapes repeat: one compile each)."""
    key = (fn, tuple(sorted(static.items())))
    if key not in _JITTED:

        def run(stacked, pref):
            extra = {} if pref is None else {"pref_vector": pref}
            return fn(jr.aggregators.gramian(stacked), with_residual=True, **static, **extra)

        _JITTED[key] = jax.jit(run)
    return _JITTED[key]


def _weights(fn, j, dtype, pref_vector=None, **options):
    """``fn`` on the Gramian of ``j`` (computed in ``dtype``): ``(d, weights, residual)``."""
    with jax.enable_x64(dtype == jnp.float64):
        stacked = jnp.asarray(j, dtype)
        pref = None if pref_vector is None else jnp.asarray(pref_vector, dtype)
        w, residual = _jitted(fn, options)(stacked, pref)
        w = np.asarray(w, np.float64)
    return w @ j, w, float(residual)


def _tol(dtype, f64=1e-10, f32=2e-5):
    return f64 if dtype == jnp.float64 else f32


def _nonconflict(j, d, tol):
    """Non-conflicting: ``<g_i, d> >= -tol |g_i| |d|``."""
    cos = j @ d / np.maximum(np.linalg.norm(j, axis=1) * np.linalg.norm(d), 1e-300)
    assert cos.min() >= -tol, cos


# --------------------------------------------------------------------- AlignedMTL


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", list(CASES))
def test_aligned_mtl_matches_the_svd_reference_and_aligns(name, dtype):
    j = CASES[name]
    eps = float(jnp.finfo(dtype).eps)
    # The eigenvalues come from the SVD of a square root of G: the smallest is accurate
    # to eps * sqrt(cond(G)) (cond 7e16 for "scales"; eigh of G itself gave 7e-6).
    tol = {"scales": 1e-10, "cos-0.999": 1e-12}.get(name, 1e-13)
    if dtype == jnp.float32:
        tol = 5e-4
    for mode in ("min", "median", "rmse"):
        d, _, residual = _weights(jr.aggregators.aligned_mtl_weights, j, dtype, scale_mode=mode)
        expected = ref.aligned_mtl(j, scale_mode=mode, eps=eps)
        _close(d, expected, tol, np.linalg.norm(expected))
        # Certificate: the aligned Gramian B G B is sigma times a projector.
        assert residual <= _tol(dtype, 1e-4 if name == "scales" else 1e-12, 5e-3)
    # Permutation-invariant (the weights follow the rows).
    perm = np.array([2, 0, 3, 1])[: len(j)] if len(j) == 4 else np.arange(len(j))
    d_perm, _, _ = _weights(jr.aggregators.aligned_mtl_weights, j[perm], dtype)
    d, _, _ = _weights(jr.aggregators.aligned_mtl_weights, j, dtype)
    _close(d_perm, d, 10 * tol, np.linalg.norm(d))


def test_aligned_mtl_pref_vector_and_zero_gramian():
    j = CASES["normal"]
    p = np.array([0.1, 0.2, 0.3, 0.4])
    d, _, _ = _weights(jr.aggregators.aligned_mtl_weights, j, jnp.float64, pref_vector=p)
    _close(d, ref.aligned_mtl(j, pref=p), 1e-12, np.linalg.norm(d))
    w = jr.aggregators.aligned_mtl_weights(jnp.zeros((3, 3)))
    np.testing.assert_allclose(w, np.full(3, 1 / 3), rtol=1e-6)


# ------------------------------------------------------------------------- ConFIG


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", list(CASES))
def test_config_matches_the_pinv_reference_with_equal_projections(name, dtype):
    j = CASES[name]
    d, _, residual = _weights(jr.aggregators.config_weights, j, dtype)
    expected = ref.config(j)
    tol = _tol(dtype, 1e-12, 1e-3 if name == "cos-0.999" else 1e-5)
    _close(d, expected, tol, np.linalg.norm(expected))
    assert residual <= _tol(dtype, 1e-12, 1e-3)
    norms = np.linalg.norm(j, axis=1)
    if name in ("normal", "cos-0.999", "scales", "one"):  # independent: conflict-free
        proj = j @ d / norms
        assert np.ptp(proj) <= 2 * tol * np.abs(proj).max() and proj.min() > 0


@pytest.mark.parametrize("name", ["normal", "cos-0.999", "rank3", "duplicated"])
def test_config_is_linear_under_scaling_and_permutation_invariant(name):
    j = CASES[name]
    rng = np.random.default_rng(1)
    c1, c2 = rng.uniform(0.1, 2.0, size=(2, len(j)))
    a, b = 0.7, 1.9

    def agg(m):
        return _weights(jr.aggregators.config_weights, m, jnp.float64)[0]

    expected = a * agg(c1[:, None] * j) + b * agg(c2[:, None] * j)
    _close(agg((a * c1 + b * c2)[:, None] * j), expected, 1e-11, np.linalg.norm(expected))
    _close(agg(j[::-1]), agg(j), 1e-12, _scale(j))


# ----------------------------------------------------------------------- DualProj


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", list(CASES))
def test_dualproj_matches_scipy_nnls_and_is_non_conflicting(name, dtype):
    j = CASES[name]
    d, _, residual = _weights(jr.aggregators.dualproj_weights, j, dtype)
    expected = ref.dualproj(j)
    scale = np.linalg.norm(j.T @ np.full(len(j), 1 / len(j)))  # |the projected mean|
    _close(d, expected, _tol(dtype, 1e-12, 1e-6), scale)
    assert residual <= _tol(dtype, 1e-14, 1e-6)
    assert np.min(j @ d / np.linalg.norm(j, axis=1).clip(1e-300)) >= -_tol(dtype, 1e-13, 1e-6) * (
        scale
    )
    d_perm, _, _ = _weights(jr.aggregators.dualproj_weights, j[::-1], dtype)
    _close(d_perm, d, _tol(dtype, 1e-12, 1e-6), scale)


def test_dualproj_projects_the_preference_and_is_not_linear_under_scaling():
    j = CASES["cos-0.999"]
    p = np.array([2.0, 1.0, 0.5, -0.5])
    d, _, _ = _weights(jr.aggregators.dualproj_weights, j, jnp.float64, pref_vector=p)
    _close(d, ref.dualproj(j, p), 1e-12, _scale(j))
    # Not linear under scaling: scaling one row changes the direction, not only its share.
    c = np.array([1.0, 10.0, 1.0, 1.0])
    scaled, _, _ = _weights(jr.aggregators.dualproj_weights, c[:, None] * j, jnp.float64)
    d0, _, _ = _weights(jr.aggregators.dualproj_weights, j, jnp.float64)
    assert np.abs(scaled - 10 * d0).max() > 1e-3


# ------------------------------------------------------------- UPGrad pref_vector


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", list(CASES))
def test_upgrad_pref_vector_matches_the_sum_of_nnls_projections(name, dtype):
    j = CASES[name]
    n = len(j)
    p = np.array([0.5, -0.25, 2.0, 0.0])[:n] if n > 1 else np.array([3.0])
    d, _, residual = _weights(jr.aggregators.upgrad_weights, j, dtype, pref_vector=p)
    expected = ref.upgrad(j, p)  # negative p_i projected too, not clipped
    scale = _scale(j) * np.abs(p).sum()
    _close(d, expected, _tol(dtype, 1e-12, 2e-6), scale)
    assert residual <= _tol(dtype, 1e-12, 1e-5)
    _nonconflict(j, d, _tol(dtype, 1e-10, 1e-5))
    # The default is the mean: pref_vector = 1/n gives the same weights.
    _, w_mean, _ = _weights(jr.aggregators.upgrad_weights, j, dtype, pref_vector=np.full(n, 1 / n))
    _, w_default, _ = _weights(jr.aggregators.upgrad_weights, j, dtype)
    np.testing.assert_allclose(w_mean, w_default, rtol=_tol(dtype, 1e-12, 1e-6))


def test_upgrad_pref_vector_is_linear_under_scaling_in_the_aggregator():
    j = CASES["cos-0.999"]
    p = np.array([1.0, 2.0, 0.5, 1.0])
    agg = jr.aggregators.upgrad(pref_vector=p)
    rng = np.random.default_rng(2)
    c1, c2 = rng.uniform(0.1, 2.0, size=(2, 4))
    with jax.enable_x64(True):
        step = jax.jit(agg.update)

        def run(m):
            return np.asarray(step(jnp.asarray(m), agg.init(None))[0])

        expected = 0.3 * run(c1[:, None] * j) + 1.7 * run(c2[:, None] * j)
        got = run((0.3 * c1 + 1.7 * c2)[:, None] * j)
    _close(got, expected, 1e-12, np.linalg.norm(expected))


def test_pref_vector_is_validated():
    with pytest.raises(ValueError, match=r"upgrad: pref_vector must be a non-empty 1-D"):
        jr.aggregators.upgrad(pref_vector=[[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"dualproj: pref_vector must be finite"):
        jr.aggregators.dualproj(pref_vector=[1.0, np.nan])
    agg = jr.aggregators.config(pref_vector=[1.0, 2.0, 3.0])
    with pytest.raises(
        ValueError, match=r"config: pref_vector .* expected shape \(2,\), found \(3,\)"
    ):
        agg.update(jnp.eye(2), agg.init(None))


# ----------------------------------------------------------------------- GradDrop


def _graddrop_uniforms(key, stacked):
    """The draws ``graddrop`` documents: leaf k from fold_in(sub, k)."""
    _, sub = jax.random.split(key)
    return [
        np.asarray(jax.random.uniform(jax.random.fold_in(sub, k), x.shape[1:], x.dtype), np.float64)
        for k, x in enumerate(jax.tree.leaves(stacked))
    ]


@functools.cache
def _graddrop_squared(n):
    agg = jr.aggregators.graddrop(f=lambda p: p**2, leak=np.linspace(0.0, 0.6, n), seed=3)
    return agg, jax.jit(agg.update)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", ["normal", "cos-0.999", "scales", "zero-row", "one"])
def test_graddrop_matches_the_reference_for_its_draw(name, dtype):
    j = CASES[name]
    leak = np.linspace(0.0, 0.6, len(j))
    agg, step = _graddrop_squared(len(j))
    with jax.enable_x64(dtype == jnp.float64):
        stacked = {"a": jnp.asarray(j[:, :2], dtype), "b": jnp.asarray(j[:, 2:], dtype)}
        state = agg.init(None)
        out, new = step(stacked, state)
        us = _graddrop_uniforms(state.key, stacked)
        assert not np.array_equal(jax.random.key_data(new.key), jax.random.key_data(state.key))
    for leaf, cols, u in zip("ab", [slice(0, 2), slice(2, None)], us, strict=True):
        expected = ref.graddrop(j[:, cols], u, leak=leak, f=lambda p: p**2)
        _close(out[leaf], expected, _tol(dtype, 1e-15, 1e-6), _scale(j))


def test_graddrop_keeps_agreeing_signs_and_is_permutation_invariant_per_draw():
    rng = np.random.default_rng(4)
    j = np.abs(rng.normal(size=(3, 50))) * np.sign(rng.normal(size=50))  # columns agree
    agg = jr.aggregators.graddrop(seed=1)
    step = jax.jit(agg.update)
    state = agg.init(None)
    out, _ = step(jnp.asarray(j, jnp.float32), state)
    np.testing.assert_allclose(out, j.sum(0), rtol=1e-6)
    mixed = rng.normal(size=(4, 50))
    a, _ = step(jnp.asarray(mixed, jnp.float32), state)
    b, _ = step(jnp.asarray(mixed[[3, 1, 0, 2]], jnp.float32), state)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # Over draws, a conflicting column keeps each sign with its purity's odds.
    col = np.array([[3.0], [-1.0]])
    state, kept = agg.init(None), []
    for _ in range(400):
        out, state = step(jnp.asarray(col, jnp.float32), state)
        kept.append(float(out[0]))
    assert set(np.round(kept, 5)) <= {3.0, -1.0}
    assert abs(np.mean(np.array(kept) == 3.0) - 0.75) < 0.08  # P = (1 + 2/4) / 2


def test_graddrop_leak_is_validated():
    with pytest.raises(ValueError, match="graddrop: leak must be a 1-D"):
        jr.aggregators.graddrop(leak=0.5)
    agg = jr.aggregators.graddrop(leak=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="graddrop: leak must have one value per term, expected 2"):
        agg.update(jnp.eye(2), agg.init(None))


# ------------------------------------------------------------------------ GradVac


def _orders(key, n):
    """The visiting orders ``gradvac_weights`` documents, others only."""
    perms = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n)))
    return [[int(k) for k in perms[i] if k != i] for i in range(n)]


_GRADVAC_AGG = jr.aggregators.gradvac(n_tasks=4, beta=0.3)
_GRADVAC = (_GRADVAC_AGG, jax.jit(_GRADVAC_AGG.update))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", ["normal", "cos-0.999", "scales", "duplicated", "zero-row"])
def test_gradvac_matches_the_reference_over_steps(name, dtype):
    j = CASES[name]
    n = len(j)
    agg, step = _GRADVAC
    targets = np.zeros((n, n))
    with jax.enable_x64(dtype == jnp.float64):
        state = agg.init(None)
        for t in range(3):
            m = j * (1.0 + 0.3 * t)  # same directions, new norms: the targets matter
            key = jax.random.split(state.key)[1]
            out, state = step(jnp.asarray(m, dtype), state)
            expected, targets = ref.gradvac(m, targets, _orders(key, n), beta=0.3)
            _close(out, expected, _tol(dtype, 1e-11, 2e-4), _scale(m))
            np.testing.assert_allclose(
                state.targets, targets, atol=_tol(dtype, 1e-12, 1e-5), rtol=0
            )
            assert float(state.residual) <= _tol(dtype, 1e-10, 1e-3)


def test_gradvac_first_step_is_pcgrad_and_linear_under_scaling():
    j = CASES["cos-0.999"]
    key = jax.random.key(5)
    with jax.enable_x64(True):
        g = jnp.asarray(j @ j.T)
        w, t = jr.aggregators.gradvac_weights(g, targets=jnp.zeros((4, 4)), key=key)
        np.testing.assert_allclose(w, jr.aggregators.pcgrad_weights(g, key=key), rtol=1e-12)
        targets = jnp.asarray(t)  # non-zero targets now
        c1, c2 = np.array([1.0, 3.0, 0.2, 1.5]), np.array([0.5, 0.1, 2.0, 1.0])

        def d(c):
            m = c[:, None] * j
            w, _ = jr.aggregators.gradvac_weights(jnp.asarray(m @ m.T), targets=targets, key=key)
            return np.asarray(w) @ m

        _close(d(0.4 * c1 + 2.0 * c2), 0.4 * d(c1) + 2.0 * d(c2), 1e-12, _scale(j))


def test_gradvac_checks_its_options_and_the_number_of_terms():
    with pytest.raises(ValueError, match=r"gradvac: beta must be in \[0, 1\]"):
        jr.aggregators.gradvac(n_tasks=2, beta=1.5)
    with pytest.raises(ValueError, match="gradvac: eps must be >= 0"):
        jr.aggregators.gradvac(n_tasks=2, eps=-1.0)
    with pytest.raises(ValueError, match="gradvac: n_tasks must be a positive int"):
        jr.aggregators.gradvac(n_tasks=0)
    agg = jr.aggregators.gradvac(n_tasks=3)
    with pytest.raises(ValueError, match="n_tasks = 3 rows, found 2"):
        agg.update(jnp.eye(2), agg.init(None))
    state = agg.init(None)
    assert isinstance(state, jr.aggregators.GradVacState) and state.targets.shape == (3, 3)


# --------------------------------------------------------------------------- Krum


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize(
    "name", ["normal", "cos-0.999", "scales", "rank3", "duplicated", "zero-row"]
)
def test_krum_matches_the_reference(name, dtype):
    j = CASES[name]
    for f, m in [(0, 1), (1, 1), (1, 2), (0, 4)]:
        d, w, _ = _weights(jr.aggregators.krum_weights, j, dtype, n_byzantine=f, n_selected=m)
        _close(d, ref.krum(j, f, m), _tol(dtype, 1e-15, 1e-6), _scale(j))
        assert np.count_nonzero(w) == m and np.isclose(w.sum(), 1.0)  # weighted: an average


def test_krum_discards_the_byzantine_gradients():
    rng = np.random.default_rng(6)
    honest = 1.0 + 0.1 * rng.normal(size=(5, 8))
    attack = np.stack([-50 * np.ones(8), 40 * rng.normal(size=8)])
    j = np.concatenate([honest, attack])
    d, w, _ = _weights(jr.aggregators.krum_weights, j, jnp.float32, n_byzantine=2, n_selected=3)
    assert set(np.flatnonzero(w)) <= set(range(5))
    agg = jr.aggregators.krum(n_byzantine=2, n_selected=3)
    out, _ = jax.jit(agg.update)(jnp.asarray(j, jnp.float32), agg.init(None))
    np.testing.assert_allclose(out, d, rtol=1e-6)
    with pytest.raises(
        ValueError, match=r"krum: needs at least max\(n_byzantine \+ 3, n_selected\) = 5"
    ):
        jr.aggregators.krum_weights(jnp.eye(4), n_byzantine=2)
    with pytest.raises(ValueError, match="krum: n_selected must be an int >= 1"):
        jr.aggregators.krum(n_byzantine=1, n_selected=0)


# -------------------------------------------------------------------- TrimmedMean


@functools.cache
def _trimmed(b):
    agg = jr.aggregators.trimmed_mean(trim_number=b)
    return agg, jax.jit(agg.update)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", ["normal", "cos-0.999", "scales", "duplicated", "zero-row", "one"])
def test_trimmed_mean_matches_the_reference_and_is_permutation_invariant(name, dtype):
    j = CASES[name]
    trims = [0] if len(j) == 1 else [0, 1]
    with jax.enable_x64(dtype == jnp.float64):
        for b in trims:
            agg, step = _trimmed(b)
            out, _ = step({"w": jnp.asarray(j, dtype)}, agg.init(None))
            _close(out["w"], ref.trimmed_mean(j, b), _tol(dtype, 1e-15, 1e-6), _scale(j))
            perm, _ = step({"w": jnp.asarray(j[::-1], dtype)}, agg.init(None))
            np.testing.assert_array_equal(perm["w"], out["w"])  # exactly: the sort is the same
    with pytest.raises(
        ValueError, match=r"needs at least 2 \* trim_number \+ 1 = 3 terms, found 1"
    ):
        agg = jr.aggregators.trimmed_mean(trim_number=1)
        agg.update(jnp.ones((1, 3)), agg.init(None))


# ----------------------------------------------------------------- conventions


NEW_WEIGHT_FNS = {
    "aligned_mtl": jr.aggregators.aligned_mtl_weights,
    "config": jr.aggregators.config_weights,
    "dualproj": jr.aggregators.dualproj_weights,
    "krum": jr.aggregators.krum_weights,
}


@pytest.mark.parametrize("method", NEW_WEIGHT_FNS)
def test_weight_functions_follow_the_convention_and_match_their_aggregator(method):
    fn = NEW_WEIGHT_FNS[method]
    params = list(inspect.signature(fn).parameters.values())
    assert params[0].name == "gramian" and params[-1].name == "with_residual"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    options = {p.name: p.default for p in params[1:-1]}
    aggregator = inspect.signature(getattr(jr.aggregators, method)).parameters
    assert options == {n: p.default for n, p in aggregator.items()}
    j = CASES["normal"]
    kwargs = {"n_byzantine": 1} if method == "krum" else {}
    agg = getattr(jr.aggregators, method)(**kwargs)
    stacked = {"a": jnp.asarray(j[:, :4], jnp.float32), "b": jnp.asarray(j[:, 4:], jnp.float32)}
    out, state = jax.jit(agg.update)(stacked, agg.init(None))
    w, residual = fn(jr.aggregators.gramian(stacked), with_residual=True, **kwargs)
    expected = jr.aggregators.apply_weights(w, stacked)
    for leaf in "ab":
        np.testing.assert_allclose(out[leaf], expected[leaf], rtol=1e-5, atol=1e-6)
    assert isinstance(state, jr.aggregators.AggregatorState)
    # The same residual, up to float32 rounding (jitted and eager round differently).
    np.testing.assert_allclose(state.residual, residual, rtol=1e-3, atol=1e-5)


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match=r"aligned_mtl: scale_mode must be one of .* found 'max'"):
        jr.aggregators.aligned_mtl(scale_mode="max")
    with pytest.raises(ValueError, match="dualproj: iterations must be a positive int"):
        jr.aggregators.dualproj(iterations=0)
    with pytest.raises(ValueError, match="trimmed_mean: trim_number must be an int >= 0"):
        jr.aggregators.trimmed_mean(trim_number=-1)


def test_docs_table_names_every_parameter():
    text = (Path(__file__).parents[1] / "docs" / "optax.md").read_text()
    start = text.index("| aggregator (TorchJD) |")
    rows = [line for line in text[start:].splitlines()[2:] if line.startswith("|")]
    rows = rows[: next((i for i, r in enumerate(rows) if not r.startswith("| `")), len(rows))]
    documented = {}
    for row in rows:
        name, args = re.fullmatch(r"\| `(\w+)\((.*?)\)` \|.*", row).groups()
        documented[name] = [a.strip() for a in args.split(",") if a.strip()]
    expected = ["aligned_mtl", "config", "dualproj", "graddrop", "gradvac", "krum", "trimmed_mean"]
    assert sorted(documented) == expected
    for name, args in documented.items():
        assert args == list(inspect.signature(getattr(jr.aggregators, name)).parameters), name


# ---------------------------------------------------------------------- TorchJD


def _torch(j):
    torch = pytest.importorskip("torch")
    return torch.tensor(j, dtype=torch.float64)


FULL_RANK = ["normal", "cos-0.999", "scales", "one"]


def _krum_scores(j, k):
    """Krum's scores from plain (TorchJD) and squared (paper) distances."""
    d2 = ((j[:, None] - j[None]) ** 2).sum(-1) + np.diag(np.full(len(j), np.inf))
    return (np.sort(np.sqrt(d2), axis=1)[:, :k].sum(1), np.sort(d2, axis=1)[:, :k].sum(1))


def _unique_min(scores):
    s = np.sort(scores)
    return s[1] - s[0] > 1e-9 * abs(s[1])


def test_krum_follows_the_paper_where_torchjd_differs():
    """A seeded input where summed distances (TorchJD 0.18) and summed squared distances
    (Blanchard et al.) pick different gradients: jaxreg picks the paper's."""
    pytest.importorskip("torchjd")
    from torchjd.aggregation import Krum

    rng = np.random.default_rng(7)
    for _ in range(1000):
        j = rng.normal(size=(5, 2)) * rng.uniform(0.1, 3.0, size=(5, 1))
        plain, squared = _krum_scores(j, 2)
        if np.argmin(plain) != np.argmin(squared) and _unique_min(plain) and _unique_min(squared):
            break
    else:
        raise AssertionError("no disagreement found")
    d, _, _ = _weights(jr.aggregators.krum_weights, j, jnp.float64, n_byzantine=1)
    np.testing.assert_array_equal(d, j[np.argmin(squared)])
    np.testing.assert_array_equal(Krum(n_byzantine=1)(_torch(j)).numpy(), j[np.argmin(plain)])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torchjd_gramian_methods(name):
    pytest.importorskip("torchjd")
    import torch
    from torchjd.aggregation import AlignedMTL, ConFIG, DualProj, UPGrad
    from torchjd.linalg import QuadprogProjector

    j = CASES[name]
    n = len(j)
    jt = _torch(j)
    for mode in ("min", "median", "rmse"):
        d, _, _ = _weights(jr.aggregators.aligned_mtl_weights, j, jnp.float64, scale_mode=mode)
        expected = AlignedMTL(scale_mode=mode)(jt).numpy()
        _close(d, expected, 1e-10, np.linalg.norm(expected))
    d, _, _ = _weights(jr.aggregators.config_weights, j, jnp.float64)
    _close(d, ConFIG()(jt).numpy(), 1e-12, _scale(j))
    if name in FULL_RANK:  # quadprog needs a positive definite Gramian without its ridge
        exact = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
        d, _, _ = _weights(jr.aggregators.dualproj_weights, j, jnp.float64)
        _close(d, DualProj(projector=exact)(jt).numpy(), 1e-9, _scale(j))
        p = np.array([0.5, -0.25, 2.0, 1.0])[:n]
        d, _, _ = _weights(jr.aggregators.upgrad_weights, j, jnp.float64, pref_vector=p)
        expected = UPGrad(pref_vector=torch.tensor(p), projector=exact)(jt).numpy()
        _close(d, expected, 1e-9, _scale(j) * np.abs(p).sum())


@pytest.mark.parametrize("name", ["normal", "cos-0.999", "scales", "zero-row"])
def test_matches_torchjd_robust_and_random_methods(name, monkeypatch):
    pytest.importorskip("torchjd")
    import torch
    from torchjd.aggregation import GradDrop, GradVac, Krum, TrimmedMean

    j = CASES[name]
    jt = _torch(j)
    with jax.enable_x64(True):
        for b in (0, 1):
            agg = jr.aggregators.trimmed_mean(trim_number=b)
            out, _ = agg.update(jnp.asarray(j), agg.init(None))
            np.testing.assert_allclose(out, TrimmedMean(trim_number=b)(jt).numpy(), rtol=1e-15)
        # Krum (n - f - 2 = 2 neighbours): TorchJD sums distances, the paper squared
        # distances; where both pick the same gradient, without ties, they agree exactly.
        d, _, _ = _weights(jr.aggregators.krum_weights, j, jnp.float64, n_byzantine=0)
        theirs = Krum(n_byzantine=0)(jt).numpy()
        plain, squared = _krum_scores(j, 2)
        if np.argmin(plain) == np.argmin(squared) and _unique_min(plain) and _unique_min(squared):
            np.testing.assert_allclose(d, theirs, rtol=1e-15)
        else:
            assert name in ("cos-0.999", "zero-row"), name  # the cases that tie

        # GradDrop with the same draw.
        agg = jr.aggregators.graddrop(leak=[0.0, 0.5, 0.1, 0.2])
        state = agg.init(None)
        out, _ = agg.update(jnp.asarray(j), state)
        (u,) = _graddrop_uniforms(state.key, jnp.asarray(j))
        monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(u))
        theirs = GradDrop(leak=torch.tensor([0.0, 0.5, 0.1, 0.2], dtype=torch.float64))(jt)
        monkeypatch.undo()
        np.testing.assert_allclose(out, theirs.numpy(), rtol=1e-14, atol=1e-14 * _scale(j))

        # GradVac over three steps with the same visiting orders (eps=1e-8 as TorchJD's).
        agg = jr.aggregators.gradvac(n_tasks=4, beta=0.4, eps=1e-8)
        tv = GradVac(beta=0.4, eps=1e-8)
        state = agg.init(None)
        for t in range(3):
            m = j * (1.0 + 0.5 * t)
            orders = _orders(jax.random.split(state.key)[1], 4)
            # TorchJD shuffles the others of task i (ascending) with torch.randperm(3).
            wanted = iter(orders)

            def randperm(k, *a, _wanted=wanted, **kw):
                order = next(_wanted)
                return torch.tensor([sorted(order).index(x) for x in order])

            monkeypatch.setattr(torch, "randperm", randperm)
            theirs = tv(torch.tensor(m)).numpy()
            monkeypatch.undo()
            out, state = agg.update(jnp.asarray(m), state)
            np.testing.assert_allclose(out, theirs, rtol=1e-10, atol=1e-12 * _scale(m))
