r"""TorchJD's adaptive aggregators: FairGrad, PCD and ExcessMTL, and weightings as aggregators.

FairGrad follows the conventions of ``aggregators.py`` (``fairgrad_weights(gramian, *,
..., with_residual=False)``, an aggregator built with ``from_gramian_weights``). PCD and
ExcessMTL keep statistics across steps; their state is an explicit ``NamedTuple`` of
arrays of fixed shapes (``PCDState``, ``ExcessMTLState``), so ``update`` can sit in a
jitted step or a ``lax.scan``. They need the number of terms when the state is made:
an aggregator's ``init`` sees only the parameters.

``cross_gramian`` forms the matrix :math:`J_1 J_2^\top` of two independent batches that
the task weightings MoDo and SDMGrad (``jaxreg.weighting``) are meant to read.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import lu_factor, lu_solve
from optax.experimental import aggregating

from jaxreg._src.core import gather
from jaxreg._src.core.errors import ConfigError
from jaxreg._src.core.linalg import cross_gram
from jaxreg._src.optim import gram_solvers
from jaxreg._src.optim.aggregators import (
    _iterations,
    _solve_dtype,
    apply_weights,
    from_gramian_weights,
    gramian,
)

# ------------------------------------------------------------------------- FairGrad


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and alpha >= 0):
        raise ConfigError(f"fairgrad: alpha must be a float >= 0, found {alpha!r}")


# Newton steps on FairGrad's relative equations after the potential's minimisation
# (at most the iteration guard).
_FAIRGRAD_POLISH = 8


def _fairgrad_solve(g: jax.Array, alpha: float, max_iter: int) -> tuple[jax.Array, jax.Array]:
    """``(w, residual)``: ``w > 0`` with ``(G w)_i = w_i^(-1/alpha)``, or zeros and inf."""
    n = g.shape[0]
    dtype = g.dtype
    eps = float(jnp.finfo(dtype).eps)
    p = 1.0 / alpha
    # In x = D w (D the gradients' norms) the equation is G^ x = c * x^-p with the
    # unit-diagonal G^ and c_i = D_i^(p - 1): norm ratios then cost no accuracy. c is
    # divided by its largest entry (k), which scales x by k^(1/(1+p)).
    norms, dd, gs = gram_solvers.unit_diagonal(g)
    logd = jnp.log(dd)
    expo = (p - 1.0) * logd
    top = jnp.max(expo)
    c = jnp.exp(expo - top)

    def phi(x):  # the convex potential 1/2 x'G^x - sum c_i h(x_i), h' = x^-p
        h = jnp.log(x) if alpha == 1.0 else x ** (1.0 - p) / (1.0 - p)
        return 0.5 * x @ gs @ x - jnp.sum(c * h)

    def cond(carry):
        return ~carry[3] & (carry[2] < max_iter)

    def body(carry):
        w, prev, it, _ = carry
        grad = gs @ w - c * w**-p
        hess = gs + jnp.diag(c * p * w ** (-p - 1.0))
        lu = lu_factor(hess)
        delta = lu_solve(lu, grad)
        delta = delta + lu_solve(lu, grad - hess @ delta)
        lam2 = grad @ delta  # the squared Newton decrement
        # The largest step that keeps w > 0 (with a margin); far from the solution,
        # backtracking on phi; close to it (lam2 < 1/16), full steps until the decrement
        # stops shrinking fourfold at the rounding floor (lam2 < n eps), where phi cannot
        # rank steps. phi is not self-concordant: with c spread over decades (row norms
        # 1e-4..1e4, alpha != 1) full steps with lam2 < 1/16 can shrink it only linearly
        # for a while, which is not a stall (stopping there left residuals of 0.6-1).
        shrink = jnp.where(delta > 0, 0.99 * w / jnp.where(delta > 0, delta, 1.0), jnp.inf)
        t0 = jnp.minimum(1.0, jnp.min(shrink))
        pure = lam2 < 1.0 / 16
        f0 = phi(w)

        def bt_cond(t):
            return (phi(w - t * delta) > f0 - 0.25 * t * lam2) & (t > 1e-12) & ~pure

        t = lax.while_loop(bt_cond, lambda t: 0.5 * t, t0)
        new = w - t * delta
        stalled = pure & (prev < n * eps) & (lam2 > prev / 4)
        ok = jnp.all(jnp.isfinite(new)) & jnp.all(new > 0)
        w_next = jnp.where(ok & ~stalled, new, w)
        done = ~ok | stalled | (lam2 <= (n * eps) ** 2) | (t <= 1e-12)
        return w_next, lam2, it + 1, done

    w0 = c ** (1.0 / (1.0 + p)) * (jnp.sum(gs) / n + 1.0) ** (-alpha / (1.0 + alpha))
    inf = jnp.asarray(jnp.inf, dtype)
    w, _, _, _ = lax.while_loop(cond, body, (w0, inf, 0, jnp.asarray(False)))

    # Polish: Newton on the relative equations F_i(y) = x_i^p (G^x)_i / c_i - 1 in
    # y = log x, where every task weighs the same (phi barely sees tasks with a tiny
    # c_i, and cannot rank steps along them), with a backtracking search on |F|.
    def rel(x):
        return x**p * (gs @ x) / c - 1.0

    def polish(_, carry):
        x, f = carry
        jac = (x**p / c)[:, None] * (p * jnp.diag(gs @ x) + gs * x[None, :])
        lu = lu_factor(jac)
        dy = lu_solve(lu, f)
        dy = jnp.clip(dy, -2.0, 2.0)
        # the longest of the steps 1, 1/2, ..., 1/128 that lowers |F|
        ts = 0.5 ** jnp.arange(8, dtype=x.dtype)
        xs = x[None, :] * jnp.exp(-ts[:, None] * dy[None, :])
        fs = jax.vmap(rel)(xs)
        norms = jnp.where(jnp.all(jnp.isfinite(fs), axis=1), jnp.sum(fs**2, axis=1), jnp.inf)
        ok = norms < jnp.sum(f**2)
        k = jnp.argmax(ok)
        better = ok[k]
        return jnp.where(better, xs[k], x), jnp.where(better, fs[k], f)

    w, _ = lax.fori_loop(0, min(_FAIRGRAD_POLISH, max_iter), polish, (w, rel(w)))
    residual = jnp.max(jnp.abs(rel(w)))
    # A solution exists iff 0 is not in the convex hull of the gradients (else the
    # potential decreases without bound, or towards an unattained infimum).
    mn, _ = gram_solvers.min_norm_simplex(gs)
    exists = mn @ gs @ mn > 10 * n * eps
    solved = exists & jnp.all(jnp.diagonal(g) > 0) & jnp.all(jnp.isfinite(w)) & (residual < 1.0)
    w = w * jnp.exp(top / (1.0 + p)) / dd
    solved = solved & jnp.all(norms > 0) & jnp.all(jnp.isfinite(w))
    return jnp.where(solved, w, 0.0), jnp.where(solved, residual, jnp.inf)


def fairgrad_weights(
    gramian: jax.Array,
    *,
    alpha: float,
    iterations: int | None = None,
    with_residual: bool = False,
) -> Any:
    r"""FairGrad's weights (Ban & Ji 2024, "Fair Resource Allocation in Multi-Task
    Learning", Eq. 4): :math:`w > 0` with :math:`(G w)_i = w_i^{-1/\alpha}`.

    The update :math:`d = w^\top J` gives each task the utility
    :math:`\langle g_i, d\rangle = w_i^{-1/\alpha}` of :math:`\alpha`-fair resource
    allocation. ``w`` is the unique minimiser of the strictly convex
    :math:`\tfrac12 w^\top G w - \sum_i h(w_i)`, :math:`h' = w^{-1/\alpha}`, found by
    Newton's method with backtracking, in :math:`x = D w` (:math:`D` the gradients'
    norms, so the Gramian has a unit diagonal and norm ratios cost no accuracy),
    stopping on the Newton decrement. TorchJD and the official
    code run ``scipy.optimize.least_squares`` on the same equation from the uniform
    weights instead. ``alpha = 0`` is linear scalarisation: the uniform weights
    :math:`1/n` (as TorchJD). ``alpha = 1`` is Nash-MTL's equation (``nash_mtl_weights``).

    A solution exists iff 0 is not in the convex hull of the gradients (decided as in
    ``nash_mtl_weights``); otherwise, or when a gradient is zero, the weights are zero and
    the residual ``inf``.

    Properties: non-conflicting (:math:`\langle g_i, d\rangle > 0` for every task when a
    solution exists), permutation-invariant; not linear under scaling: :math:`J \to cJ`
    gives :math:`d \to c^{(1 - \alpha)/(1 + \alpha)} d`.

    Args:
      gramian: the ``n x n`` Gramian.
      alpha: the fairness parameter, ``>= 0`` (1: proportional fairness; large:
        max-min fairness).
      iterations: the Newton iteration guard (default 100; about 5-15 are used), also
        bounding the 8 polishing Newton steps on the relative equations.
      with_residual: also return :math:`\max_i |w_i^{1/\alpha}(G w)_i - 1|` (0 for
        ``alpha = 0``).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, 0.0], [0.0, 4.0]])  # orthogonal, norms 1 and 2
      >>> [round(float(v), 4) for v in jr.aggregators.fairgrad_weights(g, alpha=1.0)]
      [1.0, 0.5]
    """
    _check_alpha(alpha)
    iterations = _iterations(iterations, "fairgrad")
    g = _solve_dtype(gramian)
    n = g.shape[0]
    if alpha == 0:
        w = jnp.full((n,), 1.0 / n, g.dtype)
        residual = jnp.zeros((), g.dtype)
    else:
        w, residual = _fairgrad_solve(g, float(alpha), 100 if iterations is None else iterations)
    return (w, residual) if with_residual else w


def fairgrad(alpha: float, iterations: int | None = None) -> aggregating.Aggregator:
    r"""FairGrad (Ban & Ji 2024): :math:`\alpha`-fair utilities :math:`\langle g_i, d\rangle`.

    See [`fairgrad_weights`][jaxreg.aggregators.fairgrad_weights]. The state's
    ``residual`` is its equation residual (``inf`` when no solution exists; the update is
    then 0).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.fairgrad(alpha=2.0)
      >>> update, state = agg.update({"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}, agg.init(None))
      >>> [round(float(v), 4) for v in update["w"]]
      [1.0, 1.0]
    """
    _check_alpha(alpha)
    iterations = _iterations(iterations, "fairgrad")
    return from_gramian_weights(
        lambda g, key: fairgrad_weights(g, alpha=alpha, iterations=iterations, with_residual=True)
    )


# ------------------------------------------------------------------------------ PCD


def _taus(tau: Any, n: int, dtype) -> jax.Array:
    t = np.asarray(tau, np.float64)
    if t.ndim == 0:
        t = np.full((max(n - 1, 0),), float(t))
    if t.ndim != 1 or t.shape[0] != n - 1:
        raise ConfigError(
            f"pcd: tau must be a float or one value per secondary term ({n - 1}), "
            f"found shape {t.shape}"
        )
    if np.any(t < 0) or np.any(t > 1):
        raise ConfigError(f"pcd: tau must be in [0, 1], found {tau!r}")
    return jnp.asarray(t, dtype)


def pcd_weights(
    gramian: jax.Array,
    *,
    tau: Any = 0.02,
    scales: jax.Array | None = None,
    with_residual: bool = False,
) -> Any:
    r"""PCD's weights (Varam et al. 2026, "Priority-Constrained Descent"); row 0 is primary.

    With :math:`\tilde g_i = s_i g_i` (``scales`` :math:`s`; default
    :math:`1/\|g_i\|`, the normalisation of one step),

    .. math::
      \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2 \ \text{ s.t. }\
      \langle \tilde g_j, d\rangle \ge \tau_j \|\tilde g_j\|^2,\ j = 2..n,

    and the update is :math:`\tilde d` rescaled to :math:`\|g_1\|`. By duality
    :math:`\tilde d = \tilde g_1 + \sum_j \mu_j \tilde g_j` with the multipliers
    :math:`\mu = \arg\min_{\mu \ge 0} \tfrac12 \mu^\top \tilde G_{SS} \mu - b^\top \mu`,
    :math:`b_j = \tau_j \tilde G_{jj} - \tilde G_{j1}`, solved exactly by the active-set
    NNLS of ``mgda_weights`` (TorchJD: Goldfarb-Idnani's dual active-set method; both
    give the unique minimiser). The weights are :math:`(1, \mu) \odot s \cdot \|g_1\| /
    \|\tilde d\|`. As TorchJD: zero when :math:`g_1 = 0` or :math:`\tilde d = 0` (up to
    the Gramian's rounding); :math:`e_1` (the update :math:`g_1`) when the constraints
    are infeasible, i.e. 0 is in the convex hull of the secondary gradients with a
    positive :math:`\tau` on its support.

    Properties (TorchJD): not permutation-invariant (row 0 is primary); with feasible
    constraints every secondary term gets :math:`\langle \tilde g_j, \tilde d\rangle
    \ge \tau_j \|\tilde g_j\|^2` (non-conflicting for the secondaries when
    :math:`\tau > 0`); invariant to the scale of each secondary row (with
    :math:`1/\|g_i\|` scales, or a constant scale under the moving average).

    Args:
      gramian: the ``n x n`` Gramian, row and column 0 the primary term.
      tau: the guaranteed fraction in [0, 1], a float or ``n - 1`` values.
      scales: ``[n]`` positive scales :math:`s_i` (``pcd`` passes
        :math:`1/\sqrt{\hat v_i + \epsilon}`); ``None``: :math:`1/\|g_i\|` (0 for a zero
        gradient).
      with_residual: also return the largest constraint violation
        :math:`\max_j (\tau_j\|\tilde g_j\|^2 - \langle \tilde g_j, \tilde d\rangle)^+`
        together with the KKT residual of the multipliers, relative to
        :math:`\max_j \tilde G_{jj}` (0 when the constraints are dropped).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> g = jnp.array([[1.0, -1.0], [-1.0, 2.0]])  # the secondary conflicts
      >>> [round(float(v), 4) for v in jr.aggregators.pcd_weights(g, tau=0.0)]
      [1.4142, 0.7071]
    """
    g = _solve_dtype(gramian)
    n = g.shape[0]
    dtype = g.dtype
    taus = _taus(tau, n, dtype)
    sq = jnp.maximum(jnp.diagonal(g), 0.0)
    if scales is None:
        norms = jnp.sqrt(sq)
        s = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    else:
        s = jnp.asarray(scales, dtype)
    gn = g * s[:, None] * s[None, :]
    eps = float(jnp.finfo(gramian.dtype).eps)
    precision = 10.0 * eps
    if n == 1:
        w = jnp.where(sq[0] > 0, jnp.ones((1,), dtype), 0.0)
        return (w, jnp.zeros((), dtype)) if with_residual else w
    gss = gn[1:, 1:]
    b = taus * jnp.diagonal(gss) - gn[1:, 0]
    top = jnp.maximum(jnp.max(jnp.diagonal(gss)), jnp.finfo(dtype).tiny)
    mu, _ = gram_solvers.nnls_gram(gss / top, b / top)
    # Infeasible constraints: 0 in the convex hull of the secondaries with tau > 0 there
    # (Gordan); then the dual is unbounded and the solver's mu meaningless.
    sec_norms = jnp.sqrt(jnp.diagonal(gss))
    live = (sec_norms > 0) & (taus > 0)
    dsec = jnp.where(live, sec_norms, 1.0)
    hat = jnp.where(live[:, None] & live[None, :], gss / dsec[:, None] / dsec[None, :], 0.0)
    hat = hat + jnp.diag(jnp.where(live, 0.0, 1e3))  # dead rows never enter the hull
    wmin, _ = gram_solvers.min_norm_simplex(hat)
    feasible = ~jnp.any(live) | (wmin @ hat @ wmin > 10 * n * eps)
    slack = gss @ mu - b
    violation = jnp.maximum(jnp.max(-slack), 0.0) / top
    kkt = jnp.max(jnp.abs(jnp.minimum(mu * jnp.diagonal(gss) / top, slack / top)))
    feasible = feasible & jnp.all(jnp.isfinite(mu)) & (violation < jnp.sqrt(eps))
    mu = jnp.where(feasible, mu, 0.0)
    w = jnp.concatenate([jnp.ones((1,), dtype), mu])
    dsq = w @ gn @ w
    magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diagonal(gn), 0.0))) ** 2
    keep = (sq[0] > 0) & (dsq > precision * magnitude)
    weights = jnp.where(keep, w * s * jnp.sqrt(sq[0] / jnp.where(keep, dsq, 1.0)), 0.0)
    residual = jnp.where(feasible, jnp.maximum(violation, kkt), 0.0)
    return (weights, residual) if with_residual else weights


class PCDState(NamedTuple):
    r"""The state of ``pcd``.

    Attributes:
      sq_norm_ema: ``[n]`` (float64 when x64 is enabled, else float32), the
        exponential moving average of each term's squared gradient norm (not
        bias-corrected).
      step: int32 scalar, the number of updates so far.
      residual: float32 scalar, ``pcd_weights``' residual at the last update.
    """

    sq_norm_ema: jax.Array
    step: jax.Array
    residual: jax.Array


def pcd(
    num_tasks: int, tau: Any = 0.02, beta: float = 0.999, eps: float = 1e-8
) -> aggregating.Aggregator:
    r"""PCD (Varam et al. 2026): follow the primary gradient, guarantee each secondary
    a fraction ``tau`` of its normalised progress.

    Term 0 of the stacked gradients is the primary objective. Each step updates
    :math:`v \leftarrow \beta v + (1-\beta)\,\mathrm{diag}\,G`, sets
    :math:`s_i = 1/\sqrt{\hat v_i + \epsilon}` with the bias-corrected :math:`\hat v =
    v / (1 - \beta^t)` (0 where it is 0) and solves ``pcd_weights`` with these scales.
    A step whose Gramian is not finite returns NaN and leaves the average as it was
    (as TorchJD).

    Args:
      num_tasks: the number of stacked gradients ``n`` (the state's size).
      tau: the guaranteed fraction in [0, 1], a float or ``n - 1`` values.
      beta: the moving average's decay in [0, 1).
      eps: added to the average before its inverse square root, ``>= 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.pcd(2, tau=0.0)
      >>> update, state = agg.update({"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}, agg.init(None))
      >>> [round(float(v), 4) for v in update["w"]]
      [0.7071, 0.7071]
    """
    _taus(tau, num_tasks, jnp.float32)
    if not 0 <= beta < 1:
        raise ConfigError(f"pcd: beta must be in [0, 1), found {beta!r}")
    if not eps >= 0:
        raise ConfigError(f"pcd: eps must be >= 0, found {eps!r}")

    def init(params):
        state = PCDState(
            jnp.zeros((num_tasks,), jax.dtypes.canonicalize_dtype(jnp.float64)),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.float32),
        )
        return gather.placed_like(state, params)

    def update(stacked, state, params=None, **extra):
        del params, extra
        g = _solve_dtype(gramian(stacked))
        if g.shape[0] != num_tasks:
            raise ConfigError(f"pcd: expected {num_tasks} stacked gradients, found {g.shape[0]}")
        finite = jnp.all(jnp.isfinite(g))
        sq = jnp.where(finite, jnp.diagonal(g), 0.0)
        ema = beta * state.sq_norm_ema.astype(g.dtype) + (1.0 - beta) * sq
        step = state.step + 1
        debiased = ema / (1.0 - beta ** step.astype(g.dtype))
        den = jnp.sqrt(debiased + eps)
        scales = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)
        w, residual = pcd_weights(
            jnp.where(finite, g, 0.0), tau=tau, scales=scales, with_residual=True
        )
        w = jnp.where(finite, w, jnp.nan)
        new = PCDState(
            jnp.where(finite, ema, state.sq_norm_ema.astype(ema.dtype)).astype(
                state.sq_norm_ema.dtype
            ),
            jnp.where(finite, step, state.step),
            jnp.asarray(residual, jnp.float32),
        )
        return apply_weights(w, stacked), new

    return aggregating.Aggregator(init, update)


# ------------------------------------------------------------------------ ExcessMTL


class ExcessMTLState(NamedTuple):
    r"""The state of ``excess_mtl``.

    Attributes:
      weights: float32 ``[n]``, the task weights :math:`\alpha` (uniform after ``init``).
      sq_grad_sum: the running sum of the squared gradients :math:`S`, a pytree shaped
        like the stacked gradients (``[n, ...]`` leaves, float32): as large as ``n``
        copies of the parameters.
      initial: float32 ``[n]``, the baseline excess risks (set on the first step after
        the warmup).
      warmup_sum: float32 ``[n]``, the sum of the excess risks seen during the warmup.
      step: int32 scalar, the number of updates so far.
    """

    weights: jax.Array
    sq_grad_sum: Any
    initial: jax.Array
    warmup_sum: jax.Array
    step: jax.Array


def excess_mtl(
    num_tasks: int, robust_step_size: float = 1.0, n_warmup_steps: int = 0
) -> aggregating.Aggregator:
    r"""ExcessMTL (He et al. 2024, "Robust Multi-Task Learning with Excess Risks").

    Each step accumulates :math:`S \leftarrow S + g_i^{\odot 2}` (AdaGrad's diagonal),
    estimates each task's excess risk :math:`\hat E_i = \sum_k g_{ik}^2 / \sqrt{S_{ik} +
    10^{-7}}` (Eqs. 6-7), divides it by the baseline :math:`\hat E_i^0` (Section 3.2)
    and takes the exponentiated-gradient step :math:`\alpha \leftarrow
    \operatorname{softmax}(\log\alpha + \eta_\alpha \hat E / (\hat E^0 + 10^{-7}))`
    (Eq. 9). The update is :math:`\sum_i \alpha_i g_i`. As TorchJD: the weights start
    uniform (:math:`1/n`), the first ``n_warmup_steps`` updates keep them and average
    :math:`\hat E` into the baseline; with no warmup the first step's :math:`\hat E` is
    the baseline and that step uses it undivided (as the official code).

    Properties (TorchJD): weighted (non-negative weights summing to 1), stateful; not
    non-conflicting, not permutation-invariant across steps (the state follows the rows).

    This method needs the gradients themselves, not only their Gramian; its state holds
    ``n`` copies of the parameters.

    Args:
      num_tasks: the number of stacked gradients ``n``.
      robust_step_size: :math:`\eta_\alpha > 0`.
      n_warmup_steps: the number of warmup updates, ``>= 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> agg = jr.aggregators.excess_mtl(2)
      >>> stacked = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> update, state = agg.update(stacked, agg.init({"w": jnp.zeros(2)}))
      >>> [round(float(v), 4) for v in state.weights]  # E = (1, 2): softmax of log(1/2) + E
      [0.2689, 0.7311]
    """
    if not robust_step_size > 0:
        raise ConfigError(f"excess_mtl: robust_step_size must be > 0, found {robust_step_size!r}")
    if not (isinstance(n_warmup_steps, int) and n_warmup_steps >= 0):
        raise ConfigError(
            f"excess_mtl: n_warmup_steps must be an int >= 0, found {n_warmup_steps!r}"
        )

    def init(params):
        if params is None:
            raise ConfigError(
                "excess_mtl: init needs the parameters (its state is shaped like them)"
            )
        zeros = jax.tree.map(lambda p: jnp.zeros((num_tasks, *jnp.shape(p)), jnp.float32), params)
        vec = jnp.zeros((num_tasks,), jnp.float32)
        state = ExcessMTLState(
            jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            zeros,
            vec,
            vec,
            jnp.zeros((), jnp.int32),
        )
        return gather.placed_like(state, params)

    def update(stacked, state, params=None, **extra):
        del params, extra
        sq = jax.tree.map(lambda x: jnp.square(x.astype(jnp.float32)), stacked)
        total = jax.tree.map(jnp.add, state.sq_grad_sum, sq)
        risks = sum(
            jnp.sum((a / jnp.sqrt(s + 1e-7)).reshape(num_tasks, -1), axis=1)
            for a, s in zip(jax.tree.leaves(sq), jax.tree.leaves(total), strict=True)
        )
        warm = state.step < n_warmup_steps
        first = state.step == n_warmup_steps
        warmup_sum = jnp.where(warm, state.warmup_sum + risks, state.warmup_sum)
        if n_warmup_steps > 0:
            initial = jnp.where(first, warmup_sum / n_warmup_steps, state.initial)
            scaled = risks / (initial + 1e-7)
        else:
            initial = jnp.where(first, risks, state.initial)
            scaled = jnp.where(first, risks, risks / (initial + 1e-7))
        moved = jax.nn.softmax(jnp.log(state.weights) + robust_step_size * scaled)
        weights = jnp.where(warm, state.weights, moved)
        new = ExcessMTLState(weights, total, initial, warmup_sum, state.step + 1)
        return apply_weights(weights, stacked), new

    return aggregating.Aggregator(init, update)


# ------------------------------------------------------------ weightings as aggregators


def cross_gramian(stacked_a: Any, stacked_b: Any) -> jax.Array:
    r"""The ``n x n`` matrix :math:`A_{ij} = \langle g_i^{(a)}, g_j^{(b)}\rangle` of two
    stackings of the same terms' gradients (two independent batches, for MoDo and
    SDMGrad): :math:`J_a J_b^\top`, not symmetric in general.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxreg as jr
      >>> a = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> b = {"w": jnp.array([[2.0, 1.0], [0.0, 3.0]])}
      >>> print(jr.aggregators.cross_gramian(a, b))
      [[2. 0.]
       [1. 3.]]
    """
    la, lb = jax.tree.leaves(stacked_a), jax.tree.leaves(stacked_b)
    if len(la) != len(lb):
        raise ConfigError(f"cross_gramian: the two stackings have {len(la)} and {len(lb)} leaves")
    n = la[0].shape[0]
    dtypes = [jnp.dtype(jnp.float32), *(jnp.dtype(x.dtype) for x in la + lb)]
    acc = max(dtypes, key=lambda t: jnp.finfo(t).bits)
    return sum(
        (
            cross_gram(a.astype(acc).reshape(n, -1), b.astype(acc).reshape(n, -1))
            for a, b in zip(la, lb, strict=True)
        ),
        start=jnp.zeros((n, n), acc),
    )
