r"""More TorchJD aggregators: AlignedMTL, ConFIG, DualProj, GradDrop, GradVac, Krum,
TrimmedMean.

They follow the conventions of ``aggregators.py``. The Gramian methods (AlignedMTL,
ConFIG, DualProj, Krum) have a weight function ``<method>_weights(gramian, *, ...,
with_residual=False)`` and are built with ``from_gramian_weights`` (state
``AggregatorState``). GradVac is a Gramian method with state (its targets): its weight
function also takes and returns them, and its aggregator keeps them in ``GradVacState``.
GradDrop and TrimmedMean act on each coordinate of the stacked gradients, not on the
Gramian; their state is ``AggregatorState`` too (GradDrop draws from its key).

The properties stated are TorchJD's (Quinton & Rey 2024, section 2.2): *non-conflicting*
(:math:`J d \ge 0`), *linear under scaling* (:math:`c \mapsto A(\mathrm{diag}(c) J)`
linear on :math:`c > 0`), *weighted* (:math:`d = J^\top w`), and permutation-invariant
(reordering the terms does not change :math:`d`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from optax.experimental import aggregating

from jaxreg._src.core import gather
from jaxreg._src.core.errors import ConfigError
from jaxreg._src.optim import gram_solvers
from jaxreg._src.optim.aggregators import (
    AggregatorState,
    _check_pref,
    _iterations,
    _pref_weights,
    _solve_dtype,
    _zero_residual,
    apply_weights,
    from_gramian_weights,
    gramian,
)

_SCALE_MODES = ("min", "median", "rmse")


def _eps(dtype: Any) -> float:
    return float(jnp.finfo(dtype).eps)


def _safe(x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, x, 1.0)


def _n_terms(stacked: Any) -> int:
    return jax.tree.leaves(stacked)[0].shape[0]


def _state(seed: int, params: Any) -> AggregatorState:
    state = AggregatorState(jax.random.key(seed), jnp.zeros((), jnp.float32))
    return gather.placed_like(state, params)


# ----------------------------------------------------------------------- AlignedMTL


def _check_scale_mode(scale_mode: str) -> None:
    if scale_mode not in _SCALE_MODES:
        raise ConfigError(
            f"aligned_mtl: scale_mode must be one of {_SCALE_MODES}, found {scale_mode!r}"
        )


def _graded_eigh(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""``(lam, V)`` with :math:`G = V \mathrm{diag}(\lambda) V^\top`, from the SVD of a
    square root :math:`R = D Q \hat\Lambda^{1/2}` (:math:`\hat G = Q \hat\Lambda Q^\top`
    the unit-diagonal Gramian): :math:`G = R R^\top`, so :math:`\lambda = \sigma(R)^2`.
    The singular values of :math:`R` are accurate to :math:`\epsilon\,\sigma_{\max}`,
    so :math:`\lambda_{\min}` to :math:`\epsilon \sqrt{\mathrm{cond}(G)}` relative,
    where ``eigh`` of :math:`G` gives :math:`\epsilon\, \mathrm{cond}(G)` (row norms
    1e-4..1e4: 9e-12 instead of 7e-6 in float64)."""
    _, d, gn = gram_solvers.unit_diagonal(g)
    lam_hat, q = jnp.linalg.eigh(gn)
    root = (d[:, None] * q) * jnp.sqrt(jnp.maximum(lam_hat, 0.0))[None, :]
    u, s, _ = jnp.linalg.svd(root)
    return s * s, u


def aligned_mtl_weights(
    gramian: jax.Array,
    *,
    pref_vector: Any = None,
    scale_mode: str = "min",
    with_residual: bool = False,
) -> Any:
    r"""Aligned-MTL's weights (Senushkin et al. 2023, "Independent Component Alignment
    for Multi-Task Learning", Algorithm 1).

    With the eigendecomposition :math:`G = V \Lambda V^\top` (computed from the SVD of
    a square root of :math:`G`, for accuracy on gradients of very different norms)
    restricted to its rank
    :math:`r` (eigenvalues above :math:`n\,\epsilon \lambda_{\max}`, :math:`\epsilon`
    of the Gramian's dtype), the balance transformation is
    :math:`B = \sqrt{\sigma}\, V_r \Lambda_r^{-1/2} V_r^\top`, which makes the aligned
    gradients :math:`\hat J = B J` orthogonal with equal norms
    (:math:`\hat J \hat J^\top = \sigma V_r V_r^\top`, condition number 1). The weights
    are :math:`w = B p`, :math:`p` the preference vector (default :math:`1/n`), so
    :math:`d = \hat J^\top p = J^\top w`. :math:`\sigma` is the smallest kept
    eigenvalue (``scale_mode="min"``, the paper's), their lower median (``"median"``)
    or their mean (``"rmse"``, the official code's). A zero Gramian gives :math:`w = p`.
    As TorchJD's ``AlignedMTL``.

    Properties (TorchJD): weighted and permutation-invariant; not non-conflicting, not
    linear under scaling.

    Args:
      gramian: the ``n x n`` Gramian.
      pref_vector: ``None`` (:math:`1/n`) or ``n`` weights of the aligned gradients.
      scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
      with_residual: also return
        :math:`\max_{ij} |(B G B - \sigma V_r V_r^\top)_{ij}| / \sigma`, how far the
        aligned Gramian is from :math:`\sigma` times a projector (0 up to rounding).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[4.0, 0.0], [0.0, 1.0]])  # orthogonal, norms 2 and 1
      >>> print(jr.aggregators.aligned_mtl_weights(g))  # both aligned to norm 1
      [0.25 0.5 ]
    """
    _check_scale_mode(scale_mode)
    n = gramian.shape[0]
    g = _solve_dtype(gramian)
    p = _pref_weights(pref_vector, n, g.dtype, "aligned_mtl", jnp.full((n,), 1.0 / n, g.dtype))
    lam, v = _graded_eigh(g)
    keep = lam > jnp.max(lam) * n * _eps(gramian.dtype)
    rank = jnp.sum(keep)
    kept = jnp.where(keep, lam, 0.0)
    if scale_mode == "min":
        sigma = jnp.min(jnp.where(keep, lam, jnp.inf))
    elif scale_mode == "median":  # the lower median, as torch.median
        desc = jnp.sort(jnp.where(keep, lam, -jnp.inf))[::-1]
        sigma = desc[jnp.maximum(rank - 1 - (rank - 1) // 2, 0)]
    else:
        sigma = jnp.sum(kept) / jnp.maximum(rank, 1).astype(g.dtype)
    sigma = jnp.where(rank > 0, sigma, 1.0)
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(_safe(kept)), 0.0)
    b = jnp.sqrt(sigma) * (v * inv_sqrt) @ v.T
    w = jnp.where(rank > 0, b @ p, p)
    if not with_residual:
        return w
    proj = (v * keep.astype(g.dtype)) @ v.T
    residual = jnp.max(jnp.abs(b @ g @ b - sigma * proj)) / sigma
    return w, jnp.where(rank > 0, residual, 0.0)


def aligned_mtl(pref_vector: Any = None, scale_mode: str = "min") -> aggregating.Aggregator:
    r"""Aligned-MTL (Senushkin et al. 2023): combine the gradients after making them
    orthogonal with equal norms.

    See ``aligned_mtl_weights``. The state's ``residual`` is the distance of the aligned
    Gramian from :math:`\sigma` times a projector.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.aligned_mtl()
      >>> update, _ = agg.update({"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}, agg.init(None))
      >>> print(update["w"])
      [0.5 0.5]
    """
    _check_scale_mode(scale_mode)
    pref = _check_pref(pref_vector, "aligned_mtl")
    return from_gramian_weights(
        lambda g, key: aligned_mtl_weights(
            g, pref_vector=pref, scale_mode=scale_mode, with_residual=True
        )
    )


# --------------------------------------------------------------------------- ConFIG


def config_weights(
    gramian: jax.Array, *, pref_vector: Any = None, with_residual: bool = False
) -> Any:
    r"""ConFIG's weights (Liu et al. 2024, "ConFIG: Towards Conflict-free Training of
    Physics Informed Neural Networks", Eq. 2).

    With :math:`U` the unit gradients (rows :math:`g_i / \|g_i\|`, zero rows kept zero)
    and :math:`p` the preference vector (default all ones), the direction is
    :math:`b = U^{+} p` (equal projections :math:`u_i^\top b = p_i` on each unit
    gradient when they are linearly independent) and the update
    :math:`d = \big(\sum_i g_i^\top \hat b\big)\, \hat b`, :math:`\hat b = b / \|b\|`.
    On the Gramian: :math:`b = U^\top q`, :math:`q = \hat G^{+} p` with :math:`\hat G =
    D^{-1} G D^{-1}`, :math:`D = \mathrm{diag}(\|g_i\|)`, so
    :math:`w = \frac{\sum_i \|g_i\| (\hat G q)_i}{q^\top \hat G q} D^{-1} q`
    (0 when :math:`b = 0`). The pseudo-inverse drops eigenvalues of :math:`\hat G` below
    :math:`10\,n\,\epsilon` of the largest (:math:`\epsilon` of the Gramian's dtype):
    TorchJD's pseudo-inverse of :math:`U` keeps singular values down to
    :math:`\max(n, P)\,\epsilon`, so the two differ on unit gradients closer to
    dependence than :math:`\sigma_{\min}/\sigma_{\max} \approx \sqrt{10\,n\,\epsilon}`.

    Properties (TorchJD): linear under scaling, weighted and permutation-invariant; not
    non-conflicting in general (it is when the gradients are linearly independent and
    :math:`p > 0`: every :math:`g_i^\top d > 0`).

    Args:
      gramian: the ``n x n`` Gramian.
      pref_vector: ``None`` (all ones) or the ``n`` target projections :math:`p`.
      with_residual: also return the least-squares residual of :math:`U b = p`,
        :math:`\|U^\top(U b - p)\| / \|p\|` (0 up to rounding and the dropped
        eigenvalues).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # orthogonal, norms 1 and 2
      >>> print(jr.aggregators.config_weights(g))  # d = (1.5, 1.5): equal projections
      [1.5  0.75]
    """
    n = gramian.shape[0]
    g = _solve_dtype(gramian)
    p = _pref_weights(pref_vector, n, g.dtype, "config", jnp.ones((n,), g.dtype))
    norms, d, gn = gram_solvers.unit_diagonal(g)
    lam, v = jnp.linalg.eigh(gn)
    keep = lam > jnp.max(lam) * 10 * n * _eps(gramian.dtype)
    q = v @ (jnp.where(keep, 1.0 / _safe(lam), 0.0) * (v.T @ p))
    gq = gn @ q
    bb = jnp.maximum(q @ gq, 0.0)
    w = jnp.where(bb > 0, (norms @ gq) / _safe(bb), 0.0) * q / d
    if not with_residual:
        return w
    r = gq - p
    pn = jnp.sqrt(p @ p)
    residual = jnp.sqrt(jnp.maximum(r @ gn @ r, 0.0)) / _safe(pn)
    return w, residual


def config(pref_vector: Any = None) -> aggregating.Aggregator:
    r"""ConFIG (Liu et al. 2024): the direction with equal projections on the unit
    gradients, scaled to the sum of the gradients' projections on it.

    See ``config_weights``. The state's ``residual`` is the least-squares residual of
    :math:`U b = p`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.config()
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, agg.init(None))
      >>> print(update["w"])
      [1.5 1.5]
    """
    pref = _check_pref(pref_vector, "config")
    return from_gramian_weights(
        lambda g, key: config_weights(g, pref_vector=pref, with_residual=True)
    )


# ------------------------------------------------------------------------- DualProj


def dualproj_weights(
    gramian: jax.Array,
    *,
    pref_vector: Any = None,
    iterations: int | None = None,
    with_residual: bool = False,
) -> Any:
    r"""DualProj's weights: the projection of :math:`J^\top p` onto the dual cone
    :math:`\{x : J x \ge 0\}` (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for
    Continual Learning", Eq. 11; TorchJD's ``DualProj``).

    By the dual of the projection (Quinton & Rey 2024, Prop. 1), the projection is
    :math:`J^\top v` with :math:`v = \arg\min_{v \ge p} v^\top G v`, :math:`p` the
    preference vector (default :math:`1/n`: the mean is projected). Solved exactly:
    :math:`v = p + D^{-1}\tilde x`, :math:`\tilde x = \arg\min_{\tilde x \ge 0}
    \tfrac12 \tilde x^\top \hat G \tilde x + \tilde x^\top \hat G D p` by the active-set
    NNLS of ``upgrad`` on the unit-diagonal Gramian :math:`\hat G = D^{-1} G D^{-1}`
    (``nnls_gram``), without TorchJD's ``reg_eps`` ridge and ``norm_eps``.

    Properties (TorchJD): non-conflicting, weighted and permutation-invariant; not
    linear under scaling.

    Args:
      gramian: the ``n x n`` Gramian.
      pref_vector: ``None`` (:math:`1/n`) or the ``n`` weights :math:`p` of the
        combination to project.
      iterations: the active-set iteration guard (default ``6 n + 10``).
      with_residual: also return the KKT residual
        :math:`\max_j |\min(\tilde x_j, (\hat G(Dp + \tilde x))_j)| / \sum_i |(Dp)_i|`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])  # g1 = (1, 0), g2 = (-1, 1)
      >>> print(jr.aggregators.dualproj_weights(g))  # the mean (0, 0.5) is in the cone
      [0.5 0.5]
    """
    iterations = _iterations(iterations, "dualproj")
    n = gramian.shape[0]
    g = _solve_dtype(gramian)
    p = _pref_weights(pref_vector, n, g.dtype, "dualproj", jnp.full((n,), 1.0 / n, g.dtype))
    _, d, gn = gram_solvers.unit_diagonal(g)
    dp = d * p
    x, _ = gram_solvers.nnls_gram(gn, -(gn @ dp), iterations)
    w = p + x / d
    if not with_residual:
        return w
    scale = jnp.sum(jnp.abs(dp))
    residual = jnp.max(jnp.abs(jnp.minimum(x, gn @ (dp + x)))) / _safe(scale)
    return w, residual


def dualproj(pref_vector: Any = None, iterations: int | None = None) -> aggregating.Aggregator:
    r"""DualProj (GEM's projection, Lopez-Paz & Ranzato 2017): the mean gradient
    projected onto the dual cone of the gradients.

    See ``dualproj_weights``: the closest vector to :math:`J^\top p` that has a
    non-negative inner product with every gradient. The state's ``residual`` is the
    projection's KKT residual.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.dualproj()
      >>> update, _ = agg.update({"w": jnp.array([[1.0, 0.0], [-2.0, 1.0]])}, agg.init(None))
      >>> print(update["w"])  # the mean (-0.5, 0.5) conflicts with g1: projected
      [0.  0.5]
    """
    iterations = _iterations(iterations, "dualproj")
    pref = _check_pref(pref_vector, "dualproj")
    return from_gramian_weights(
        lambda g, key: dualproj_weights(
            g, pref_vector=pref, iterations=iterations, with_residual=True
        )
    )


# ------------------------------------------------------------------------- GradDrop


def _check_leak(leak: Any) -> np.ndarray | None:
    if leak is None:
        return None
    arr = np.asarray(leak, np.float64)
    if arr.ndim != 1:
        raise ConfigError(
            f"graddrop: leak must be a 1-D vector (one value per term), found shape {arr.shape}"
        )
    return arr


def _graddrop_leaf(
    j: jax.Array, u: jax.Array, f: Callable[[jax.Array], jax.Array], leak: Any
) -> jax.Array:
    total = jnp.sum(j, axis=0)
    mag = jnp.sum(jnp.abs(j), axis=0)
    purity = 0.5 * (1.0 + jnp.where(mag > 0, total / _safe(mag), 0.0))
    fp = f(purity)
    mask = ((fp > u) & (j > 0)) | ((fp < u) & (j < 0))
    if leak is None:
        return jnp.sum(jnp.where(mask, j, jnp.zeros_like(j)), axis=0)
    lk = jnp.asarray(leak, j.dtype).reshape((-1,) + (1,) * (j.ndim - 1))
    return jnp.sum((lk + (1 - lk) * mask.astype(j.dtype)) * j, axis=0)


def graddrop(
    f: Callable[[jax.Array], jax.Array] | None = None, leak: Any = None, seed: int = 0
) -> aggregating.Aggregator:
    r"""GradDrop (Chen et al. 2020, "Just Pick a Sign", Algorithm 1, lines 10-15).

    For each coordinate :math:`k`, the positive sign purity
    :math:`P_k = \tfrac12\big(1 + \sum_i g_{ik} / \sum_i |g_{ik}|\big)` (``1/2`` where
    every gradient is 0) and a uniform draw :math:`U_k \in [0, 1)`; a gradient's
    coordinate is kept when its sign wins the draw,
    :math:`M_{ik} = [f(P_k) > U_k][g_{ik} > 0] + [f(P_k) < U_k][g_{ik} < 0]`, and the
    update is :math:`d_k = \sum_i (\ell_i + (1 - \ell_i) M_{ik})\, g_{ik}`. As TorchJD's
    ``GradDrop``.

    It acts on each coordinate of the stacked gradients (not on the Gramian). Each
    update splits the state's key into the next key and ``sub``; leaf ``k`` (in
    ``jax.tree.leaves`` order) draws :math:`U` as ``jax.random.uniform(
    jax.random.fold_in(sub, k), leaf.shape[1:], leaf.dtype)``. The state is
    ``AggregatorState`` (``residual`` 0).

    Properties (TorchJD): none of non-conflicting, linear under scaling, weighted.
    For a given draw it is permutation-invariant, and with gradients that agree in sign
    on every coordinate (no leak) it returns their sum.

    Args:
      f: a monotonically increasing function applied to :math:`P` (jnp-traceable);
        ``None`` is the identity.
      leak: ``None`` (no leak) or ``n`` values :math:`\ell_i`: how much of gradient
        :math:`i` always passes.
      seed: the seed of the state's PRNG key.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.graddrop(seed=0)
      >>> j = {"w": jnp.array([[1.0, 2.0], [3.0, -2.0]])}  # column 0 agrees in sign
      >>> update, _ = agg.update(j, agg.init(None))
      >>> float(update["w"][0])
      4.0
    """
    f = (lambda p: p) if f is None else f
    leak = _check_leak(leak)

    def init(params):
        return _state(seed, params)

    def update(stacked, state, params=None, **extra):
        del params, extra
        leaves, treedef = jax.tree.flatten(stacked)
        n = leaves[0].shape[0]
        if leak is not None and leak.shape[0] != n:
            raise ConfigError(
                f"graddrop: leak must have one value per term, expected {n}, found {leak.shape[0]}"
            )
        key, sub = jax.random.split(state.key)
        out = []
        for k, leaf in enumerate(leaves):
            u = jax.random.uniform(jax.random.fold_in(sub, k), leaf.shape[1:], leaf.dtype)
            out.append(_graddrop_leaf(leaf, u, f, leak))
        return jax.tree.unflatten(treedef, out), AggregatorState(key, state.residual)

    return aggregating.Aggregator(init, update)


# -------------------------------------------------------------------------- GradVac


class GradVacState(NamedTuple):
    """The state of ``gradvac``.

    Attributes:
      key: the PRNG key of the visiting orders (split at each update).
      targets: ``[n, n]``, the EMA targets :math:`\\hat\\phi_{ij}` of the cosine
        similarities (zeros at ``init``), float64 when x64 is enabled at ``init``, else
        float32.
      residual: float32 scalar, the largest :math:`|\\cos(g_i^{PC}, g_j) -
        \\hat\\phi_{ij}|` after the corrections of the last update (0 up to rounding).

    Example:
      >>> import jaxreg as jr
      >>> jr.aggregators.gradvac(n_tasks=3).init(None).targets.shape
      (3, 3)
    """

    key: jax.Array
    targets: jax.Array
    residual: Any = np.zeros((), np.float32)


def _check_gradvac(beta: float, eps: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"gradvac: beta must be in [0, 1], found {beta!r}")
    if eps < 0.0:
        raise ConfigError(f"gradvac: eps must be >= 0, found {eps!r}")


def gradvac_weights(
    gramian: jax.Array,
    *,
    targets: jax.Array,
    key: jax.Array,
    beta: float = 0.5,
    eps: float = 0.0,
    with_residual: bool = False,
) -> Any:
    r"""GradVac's weights and next targets (Wang et al. 2021, "Gradient Vaccine", Alg. 1).

    For each task :math:`i`, visiting the others :math:`j` in a random order, with
    :math:`\phi_{ij} = \cos(g_i^{PC}, g_j)` and the target :math:`\hat\phi_{ij}`: if
    :math:`\phi_{ij} < \hat\phi_{ij}`,

    .. math::

        g_i^{PC} \leftarrow g_i^{PC} + \frac{\|g_i^{PC}\|\,(\hat\phi_{ij}\sqrt{1 -
        \phi_{ij}^2} - \phi_{ij}\sqrt{1 - \hat\phi_{ij}^2})}{\|g_j\|\sqrt{1 -
        \hat\phi_{ij}^2}}\, g_j,

    which sets the cosine to :math:`\hat\phi_{ij}`; then :math:`\hat\phi_{ij} \leftarrow
    (1 - \beta)\hat\phi_{ij} + \beta \phi_{ij}`. The update is :math:`\sum_i
    g_i^{PC}`, tracked as coefficients on the Gramian as TorchJD's ``GradVac``; with
    zero targets it is PCGrad. The orders are those of ``pcgrad_weights`` (``n``
    permutations from ``jax.random.split(key, n)``; task :math:`i` skips itself).
    ``eps`` is added to the two denominators (TorchJD's default is ``1e-8``, which
    changes the result on gradients of norm near ``1e-4``); with ``eps = 0`` a zero
    denominator skips the correction (a zero gradient, or a target of :math:`\pm 1`).

    Properties: weighted; linear under scaling for given targets and orders with
    ``eps = 0`` (the cosines do not change); not non-conflicting; not
    permutation-invariant (random orders).

    Args:
      gramian: the ``n x n`` Gramian.
      targets: ``[n, n]``, the targets :math:`\hat\phi` (zeros at the start).
      key: the PRNG key of the visiting orders (used, not returned).
      beta: the EMA rate of the targets, in [0, 1].
      eps: ``>= 0``, added to the denominators.
      with_residual: also return the largest :math:`|\cos(g_i^{PC}, g_j) -
        \hat\phi_{ij}|` right after each correction.

    Returns:
      ``(weights, new_targets)``, or ``(weights, new_targets, residual)``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])
      >>> w, t = jr.aggregators.gradvac_weights(g, targets=jnp.zeros((2, 2)), key=jax.random.key(0))
      >>> print(w)  # zero targets: PCGrad's weights
      [2.  1.5]
    """
    _check_gradvac(beta, eps)
    n = gramian.shape[0]
    g = _solve_dtype(gramian)
    if targets.shape != (n, n):
        raise ConfigError(
            f"gradvac: targets must be [n, n] for the n = {n} terms, found {targets.shape}"
        )
    tg = targets.astype(g.dtype)
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n))
    eye = jnp.eye(n, dtype=g.dtype)
    diag = jnp.maximum(jnp.diagonal(g), 0.0)

    def one(i, order, row):
        def body(t, carry):
            c, cg, row, res = carry
            j = order[t]
            other = j != i
            dot = cg[j]
            ni = jnp.sqrt(jnp.maximum(cg @ c, 0.0))
            nj = jnp.sqrt(diag[j])
            den = ni * nj + eps
            phi = jnp.where(den > 0, dot / _safe(den), 0.0)
            hat = row[j]
            s_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
            s_hat = jnp.sqrt(jnp.maximum(1.0 - hat * hat, 0.0))
            den_w = nj * s_hat + eps
            fix = other & (phi < hat) & (den_w > 0)
            w = jnp.where(fix, ni * (hat * s_phi - phi * s_hat) / _safe(den_w), 0.0)
            c = c + w * eye[j]
            cg = cg + w * g[j]
            # The cosine reached (the certificate of the closed form).
            ni2 = jnp.sqrt(jnp.maximum(cg @ c, 0.0))
            cos = cg[j] / _safe(ni2 * nj)
            res = jnp.maximum(res, jnp.where(fix & (ni2 * nj > 0), jnp.abs(cos - hat), 0.0))
            row = jnp.where(other, row.at[j].set((1 - beta) * hat + beta * phi), row)
            return c, cg, row, res

        init = (eye[i], g[i], row, jnp.zeros((), g.dtype))
        c, _, row, res = jax.lax.fori_loop(0, n, body, init)
        return c, row, res

    coefs, rows, res = jax.vmap(one)(jnp.arange(n), orders, tg)
    weights = coefs.sum(0)
    new_targets = rows.astype(targets.dtype)
    if with_residual:
        return weights, new_targets, jnp.max(res)
    return weights, new_targets


def gradvac(
    n_tasks: int, beta: float = 0.5, eps: float = 0.0, seed: int = 0
) -> aggregating.Aggregator:
    r"""GradVac (Wang et al. 2021): raise each pair's cosine similarity to an EMA target.

    See ``gradvac_weights``. Stateful: the targets (``[n_tasks, n_tasks]``, zeros at
    ``init``) and the key of the visiting orders are in ``GradVacState``, carried from
    one update to the next; the first update is PCGrad's. ``n_tasks`` fixes the state's
    shape (the stacked gradients must have ``n_tasks`` rows).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.gradvac(n_tasks=2)
      >>> j = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
      >>> update, state = agg.update(j, agg.init(None))
      >>> print(update["w"])  # the first step is PCGrad's
      [0.5 1.5]
      >>> print(state.targets.round(4))  # half the observed cosines -1/sqrt(2)
      [[ 0.     -0.3536]
       [-0.3536  0.    ]]
    """
    _check_gradvac(beta, eps)
    if not isinstance(n_tasks, int | np.integer) or n_tasks < 1:
        raise ConfigError(f"gradvac: n_tasks must be a positive int, found {n_tasks!r}")

    def init(params):
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        state = GradVacState(
            jax.random.key(seed), jnp.zeros((n_tasks, n_tasks), dtype), jnp.zeros((), jnp.float32)
        )
        return gather.placed_like(state, params)

    def update(stacked, state, params=None, **extra):
        del params, extra
        n = _n_terms(stacked)
        if n != n_tasks:
            raise ConfigError(
                f"gradvac: the stacked gradients must have n_tasks = {n_tasks} rows, found {n}"
            )
        key, sub = jax.random.split(state.key)
        w, targets, residual = gradvac_weights(
            gramian(stacked),
            targets=state.targets,
            key=sub,
            beta=beta,
            eps=eps,
            with_residual=True,
        )
        new = GradVacState(key, targets, jnp.asarray(residual, jnp.float32))
        return apply_weights(w, stacked), new

    return aggregating.Aggregator(init, update)


# ----------------------------------------------------------------------------- Krum


def _check_krum(n_byzantine: int, n_selected: int, n: int | None = None) -> None:
    if not isinstance(n_byzantine, int | np.integer) or n_byzantine < 0:
        raise ConfigError(f"krum: n_byzantine must be an int >= 0, found {n_byzantine!r}")
    if not isinstance(n_selected, int | np.integer) or n_selected < 1:
        raise ConfigError(f"krum: n_selected must be an int >= 1, found {n_selected!r}")
    if n is not None and n < max(n_byzantine + 3, n_selected):
        raise ConfigError(
            f"krum: needs at least max(n_byzantine + 3, n_selected) = "
            f"{max(n_byzantine + 3, n_selected)} terms, found {n}"
        )


def krum_weights(
    gramian: jax.Array, *, n_byzantine: int, n_selected: int = 1, with_residual: bool = False
) -> Any:
    r"""(Multi-)Krum's weights (Blanchard et al. 2017, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent").

    Each gradient's score is the sum of its squared distances to its
    :math:`n - f - 2` nearest other gradients,
    :math:`s(i) = \sum_{i \to j} \|g_i - g_j\|^2`, with
    :math:`\|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij}` (:math:`f` = ``n_byzantine``).
    The ``n_selected`` gradients of lowest score (ties to the lower index) get weight
    ``1 / n_selected``: Krum for 1, Multi-Krum's average otherwise. TorchJD 0.18 sums
    the distances, not their squares, so its selection can differ from the paper's.

    Properties (TorchJD): weighted; not non-conflicting, not linear under scaling.
    Permutation-invariant where no scores tie.

    Args:
      gramian: the ``n x n`` Gramian, ``n >= max(n_byzantine + 3, n_selected)``.
      n_byzantine: :math:`f`, the number of gradients that may be adversarial.
      n_selected: how many gradients are averaged.
      with_residual: also return a residual, always 0 (no problem is solved).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> j = jnp.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-5.0, 9.0]])
      >>> print(jr.aggregators.krum_weights(j @ j.T, n_byzantine=1))
      [1. 0. 0. 0.]
    """
    n = gramian.shape[0]
    _check_krum(n_byzantine, n_selected, n)
    g = _solve_dtype(gramian)
    diag = jnp.diagonal(g)
    dist = jnp.maximum(diag[:, None] + diag[None, :] - 2 * g, 0.0)
    dist = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, dist)
    scores = jnp.sum(jnp.sort(dist, axis=1)[:, : n - n_byzantine - 2], axis=1)
    chosen = jnp.argsort(scores, stable=True)[:n_selected]
    w = jnp.zeros((n,), g.dtype).at[chosen].add(1.0 / n_selected)
    return (w, _zero_residual(w)) if with_residual else w


def krum(n_byzantine: int, n_selected: int = 1) -> aggregating.Aggregator:
    """Krum / Multi-Krum (Blanchard et al. 2017): the average of the ``n_selected``
    gradients closest to their neighbours, robust to ``n_byzantine`` adversarial ones.

    See ``krum_weights``. The state's ``residual`` is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.krum(n_byzantine=1, n_selected=3)
      >>> j = {"w": jnp.array([[1.0, 0.0], [1.2, 0.0], [0.8, 0.0], [-5.0, 9.0]])}
      >>> update, _ = agg.update(j, agg.init(None))
      >>> print(update["w"])
      [1. 0.]
    """
    _check_krum(n_byzantine, n_selected)
    return from_gramian_weights(
        lambda g, key: krum_weights(
            g, n_byzantine=n_byzantine, n_selected=n_selected, with_residual=True
        )
    )


# ---------------------------------------------------------------------- TrimmedMean


def trimmed_mean(trim_number: int) -> aggregating.Aggregator:
    r"""The coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates").

    For each coordinate :math:`k`, with :math:`g_{(1)k} \le \dots \le g_{(n)k}` the
    sorted values and :math:`b` = ``trim_number``:
    :math:`d_k = \frac{1}{n - 2b} \sum_{r = b + 1}^{n - b} g_{(r)k}`. As TorchJD's
    ``TrimmedMean``. It acts on each coordinate (not on the Gramian); the state is
    ``AggregatorState`` (``residual`` 0). Needs ``n >= 2 b + 1`` terms.

    Properties (TorchJD): permutation-invariant; not non-conflicting, not linear under
    scaling, not weighted.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.trimmed_mean(trim_number=1)
      >>> j = {"w": jnp.array([[1.0, -9.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0]])}
      >>> update, _ = agg.update(j, agg.init(None))
      >>> print(update["w"])
      [2.5 0.5]
    """
    if not isinstance(trim_number, int | np.integer) or trim_number < 0:
        raise ConfigError(f"trimmed_mean: trim_number must be an int >= 0, found {trim_number!r}")

    def init(params):
        return _state(0, params)

    def update(stacked, state, params=None, **extra):
        del params, extra
        n = _n_terms(stacked)
        if n < 2 * trim_number + 1:
            raise ConfigError(
                f"trimmed_mean: needs at least 2 * trim_number + 1 = {2 * trim_number + 1} "
                f"terms, found {n}"
            )

        def leaf(x):
            return jnp.mean(jnp.sort(x, axis=0)[trim_number : n - trim_number], axis=0)

        return jax.tree.map(leaf, stacked), state

    return aggregating.Aggregator(init, update)
