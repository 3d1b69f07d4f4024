r"""Exact solvers for the aggregators' weight problems on a small ``n x n`` Gramian.

Every problem is solved to a tolerance, not for a fixed number of steps, inside a
``lax.while_loop`` with a maximum-iteration guard (so it stays jittable, vmappable and
fixed-shape), and every solver returns the residual of its optimality conditions.

* ``nnls_gram``: :math:`\min_{u \ge 0} \tfrac12 u^\top H u - p^\top u`, the
  Lawson-Hanson active-set method in Gram form (Bro & de Jong 1997). It is exact once
  the active set is right: each step solves the free variables' linear system (LU with
  one step of iterative refinement), and it stops when the KKT conditions hold.
* ``min_norm_simplex``: :math:`\min_{w \in \Delta} w^\top G w` (MGDA), reduced to
  one ``nnls_gram`` (the least-distance-programming trick).
* ``upgrad_solve``, ``cagrad_solve``, ``nash_solve``: the weight problems
  of UPGrad, CAGrad and Nash-MTL.

The Gramian is first scaled to a unit diagonal, :math:`\hat G = D^{-1} G D^{-1}` with
:math:`D = \mathrm{diag}(\|g_i\|)`, where a problem allows it: norm ratios then cost no
accuracy, only the angles between the gradients do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import lu_factor, lu_solve


def _eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def default_max_iter(n: int) -> int:
    """The iteration guard of the active-set solvers: each outer step adds a variable."""
    return 6 * n + 10


def unit_diagonal(g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``(norms, d, G_hat)``: :math:`\hat G = D^{-1} G D^{-1}`, ``d`` the norms with
    zeros replaced by 1 (a zero gradient keeps a zero row)."""
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
    d = jnp.where(norms > 0, norms, 1.0).astype(g.dtype)
    return norms, d, g / d[:, None] / d[None, :]


def _free_solve(h: jax.Array, p: jax.Array, free: jax.Array) -> jax.Array:
    """Solves ``H_FF s_F = p_F`` with ``s = 0`` off ``F`` (one refinement step)."""
    n = h.shape[0]
    m = jnp.where(free[:, None] & free[None, :], h, jnp.eye(n, dtype=h.dtype))
    rhs = jnp.where(free, p, 0.0)
    lu = lu_factor(m)
    s = lu_solve(lu, rhs)
    s = s + lu_solve(lu, rhs - m @ s)
    return jnp.where(free, s, 0.0)


def nnls_gram(
    h: jax.Array, p: jax.Array, max_iter: int | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""``(u, residual)``: :math:`u = \arg\min_{u \ge 0} \tfrac12 u^\top H u - p^\top u`.

    ``H`` is positive semidefinite with ``p`` in its range (a least-squares problem
    :math:`\min_{u\ge0}\|A u - b\|` given as :math:`H = A^\top A`, :math:`p = A^\top b`).
    Lawson-Hanson, one linear solve per iteration: the free variables' system is
    solved; if its solution is positive it is taken, and the fixed variable with the
    largest negative gradient (below :math:`-10\,n\,\epsilon`, scaled) is freed, else
    the iterate moves towards it until a variable reaches zero, which is fixed again.
    It stops when no variable can enter (the KKT conditions hold), or when the variable
    that entered cannot move (the rounding floor).

    ``residual`` is the KKT residual :math:`\max_j |\min(u_j, (Hu - p)_j)|` divided by
    :math:`\max_j |p_j|`.
    """
    n = h.shape[0]
    max_iter = default_max_iter(n) if max_iter is None else max_iter
    dtype = h.dtype
    idx = jnp.arange(n)
    pmax = jnp.max(jnp.abs(p))
    hmax = jnp.max(jnp.abs(h))
    rel = 10 * n * _eps(dtype)

    def cond(c):
        return ~c[4] & (c[3] < max_iter)

    def body(c):
        u, free, entered, it, _ = c
        s = _free_solve(h, p, free)
        bad = free & ~(s > 0)
        feasible = ~jnp.any(bad)
        # Not feasible: move from u towards s until the first free variable hits zero.
        gap = u - s
        ratio = jnp.where(bad & (gap > 0), u / jnp.where(gap > 0, gap, 1.0), 0.0)
        ratio = jnp.where(bad, ratio, jnp.inf)
        out = jnp.argmin(ratio)
        back = u + ratio[out] * (s - u)
        free_back = free & (back > 0) & (idx != out)
        stalled = (out == entered) & (ratio[out] <= 0)
        # Feasible: take s, then free the variable with the most negative gradient.
        w = jnp.where(free, -jnp.inf, p - h @ s)
        j = jnp.argmax(w)
        enter = w[j] > rel * (pmax + hmax * jnp.sum(jnp.abs(s)))
        u = jnp.where(feasible, s, jnp.where(stalled, u, jnp.where(free_back, back, 0.0)))
        free = jnp.where(
            feasible,
            free | ((idx == j) & enter),
            jnp.where(stalled, free & (idx != out), free_back),
        )
        entered = jnp.where(feasible, jnp.where(enter, j, -1), -1)
        done = jnp.where(feasible, ~enter, stalled)
        return u, free, entered, it + 1, done

    init = (jnp.zeros((n,), dtype), jnp.zeros((n,), bool), jnp.asarray(-1), 0, jnp.asarray(False))
    u, _, _, _, _ = lax.while_loop(cond, body, init)
    grad = h @ u - p
    residual = jnp.max(jnp.abs(jnp.minimum(u, grad))) / jnp.where(pmax > 0, pmax, 1.0)
    return u, residual


def mgda_residual(g: jax.Array, w: jax.Array) -> jax.Array:
    r"""MGDA's KKT residual at ``w``: :math:`\max_j |\min(w_j, \frac{\langle g_j, d
    \rangle - \|d\|^2}{\|g_j\| \|d\|})|`, :math:`d = w^\top J` (0 when :math:`d = 0`)."""
    gw = g @ w
    dd = jnp.maximum(w @ gw, 0.0)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0)) * jnp.sqrt(dd)
    slack = jnp.where(norms > 0, (gw - dd) / jnp.where(norms > 0, norms, 1.0), 0.0)
    return jnp.max(jnp.abs(jnp.minimum(w, slack)))


def min_norm_simplex(g: jax.Array, max_iter: int | None = None) -> tuple[jax.Array, jax.Array]:
    r"""``(w, residual)``: :math:`w = \arg\min_{w \in \Delta} w^\top G w` (MGDA).

    For two tasks, the closed form :math:`w_1 = \mathrm{clip}(\frac{\langle g_2, g_2 -
    g_1\rangle}{\|g_1 - g_2\|^2}, 0, 1)`. Otherwise, with :math:`H = \hat G + \bar d
    \bar d^\top` (:math:`\bar d \propto 1/\|g_i\|`) and :math:`\hat u = \arg\min_{\hat
    u \ge 0} \tfrac12 \hat u^\top H \hat u - \bar d^\top \hat u`, :math:`w \propto
    D^{-1}\hat u`: the KKT conditions of the two problems coincide (:math:`G w =
    \lambda 1 + \mu`, :math:`\lambda = w^\top G w`), also when :math:`0` is in the
    convex hull, where :math:`\lambda = 0`. ``residual`` is ``mgda_residual``.
    """
    n = g.shape[0]
    if n == 2:
        den = g[0, 0] + g[1, 1] - 2 * g[0, 1]
        w1 = jnp.clip((g[1, 1] - g[0, 1]) / jnp.where(den > 0, den, 1.0), 0.0, 1.0)
        w = jnp.stack([w1, 1 - w1])
        w = jnp.where(den > 0, w, jnp.full((2,), 0.5, g.dtype))
        return w, mgda_residual(g, w)
    _, d, gn = unit_diagonal(g)
    inv = 1.0 / d
    dbar = inv / jnp.max(inv)
    u, _ = nnls_gram(gn + dbar[:, None] * dbar[None, :], dbar, max_iter)
    u = u / d
    w = u / jnp.sum(u)
    return w, mgda_residual(g, w)


def upgrad_residual(g: jax.Array, v: jax.Array) -> jax.Array:
    r"""The largest KKT residual of UPGrad's ``n`` projections ``v`` (rows): with
    :math:`\tilde u = D(v_i - e_i)/\|g_i\|`, :math:`\max_j |\min(\tilde u_j, (\hat G(e_i +
    \tilde u))_j)|` (the projection of the unit gradient, in its units)."""
    n = g.shape[0]
    norms, d, gn = unit_diagonal(g)
    eye = jnp.eye(n, dtype=g.dtype)
    scale = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    u = (v - eye) * d[None, :] * scale[:, None]
    grad = (eye + u) @ gn
    return jnp.max(jnp.abs(jnp.minimum(u, grad)))


def upgrad_solve(
    g: jax.Array, max_iter: int | None = None, pref: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""``(weights, residual)`` of UPGrad: the mean of
    :math:`v_i = \arg\min_{v \ge e_i} v^\top G v`, one ``nnls_gram`` per task
    (with a preference vector ``pref``: :math:`\sum_i \max(p_i, 0)\, v_i`, the sum of
    the projections of :math:`p_i g_i`, since the problem is positively homogeneous in
    the bound and the projection of :math:`-g_i` is 0).

    With :math:`v = e_i + \|g_i\| D^{-1} \tilde u`, the problem is
    :math:`\min_{\tilde u \ge 0} \tfrac12 \tilde u^\top \hat G \tilde u + \tilde u^\top
    \hat G e_i`, the least-squares projection of :math:`-g_i/\|g_i\|` on the cone of
    the unit gradients. For two tasks, the closed form
    :math:`v_1 = (1, \max(0, -G_{12}/G_{22}))` (and symmetrically).
    ``residual`` is ``upgrad_residual``.
    """
    v = upgrad_projections(g, max_iter)
    return upgrad_combine(v, pref), upgrad_residual(g, v)


def upgrad_combine(v: jax.Array, pref: jax.Array | None = None) -> jax.Array:
    """UPGrad's weights from its projections: their mean, or ``max(pref, 0) @ v``."""
    return v.mean(0) if pref is None else jnp.maximum(pref, 0.0).astype(v.dtype) @ v


def upgrad_projections(g: jax.Array, max_iter: int | None = None) -> jax.Array:
    """The ``n`` rows :math:`v_i` of ``upgrad_solve`` (whose mean is UPGrad's weights)."""
    n = g.shape[0]
    norms, d, gn = unit_diagonal(g)
    eye = jnp.eye(n, dtype=g.dtype)
    if n == 2:
        diag = jnp.diagonal(g)
        off = jnp.maximum(-g[0, 1], 0.0) / jnp.where(diag > 0, diag, 1.0)
        off = jnp.where(diag > 0, off, 0.0)
        v = jnp.stack([jnp.stack([1.0, off[1]]), jnp.stack([off[0], 1.0])]).astype(g.dtype)
    else:

        def one(i):
            u, _ = nnls_gram(gn, -gn[:, i], max_iter)
            return eye[i] + norms[i] * u / d

        v = jax.vmap(one)(jnp.arange(n))
    return v


def _simplex_kkt(w: jax.Array, r: jax.Array) -> jax.Array:
    """Largest violation of the simplex KKT conditions for the gradient ``r`` at ``w``."""
    lam = w @ r
    scale = jnp.max(jnp.abs(r))
    return jnp.max(jnp.abs(jnp.minimum(w, r - lam))) / jnp.where(scale > 0, scale, 1.0)


def cagrad_solve(
    g: jax.Array, c: float, max_iter: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``(w, g_w_norm_over_cn, residual)`` for CAGrad's dual problem
    :math:`\min_{w \in \Delta} b^\top w + c_n \sqrt{w^\top G w}`, :math:`b = G m`,
    :math:`m = 1/n`, :math:`c_n = c \|g_0\|`.

    At the optimum, with :math:`s = \|g_w\| / c_n`, :math:`w` is also the minimiser of
    :math:`\|\sum_i w_i (g_i + s\, g_0)\|^2` on the simplex (an MGDA problem, solved
    exactly by ``min_norm_simplex``), and on its support :math:`F` the KKT system is
    linear in :math:`s`: :math:`w_F = x_0 + s x_1` with
    :math:`s^2 = x_0^\top G x_0 / (c_n^2 - x_1^\top G x_1)`. Each step solves the MGDA
    problem at the current :math:`s`, then takes the closed form on its support when it
    is feasible and no worse, else the majorize-minimize update
    :math:`s = \|g_w\|/c_n`; it stops on the KKT conditions.
    """
    n = g.shape[0]
    max_iter = 20 if max_iter is None else max_iter
    dtype = g.dtype
    scale = jnp.maximum(jnp.trace(g) / n, jnp.finfo(dtype).tiny)
    gs = g / scale
    m = jnp.full((n,), 1.0 / n, dtype)
    b = gs @ m
    cn2 = c**2 * jnp.maximum(m @ b, 0.0)
    cn = jnp.sqrt(cn2)
    safe_cn = jnp.where(cn > 0, cn, 1.0)
    tol = 10 * n * _eps(dtype)
    eye = jnp.eye(n + 1, dtype=dtype)

    def norm_w(w):
        return jnp.sqrt(jnp.maximum(w @ gs @ w, 0.0))

    def objective(w):
        return w @ b + cn * norm_w(w)

    def kkt(w):
        gw = norm_w(w)
        return _simplex_kkt(w, b + cn / jnp.where(gw > 0, gw, 1.0) * (gs @ w))

    def closed_form(free):
        f = free.astype(dtype)
        both = free[:, None] & free[None, :]
        top = jnp.concatenate([jnp.where(both, gs, eye[:n, :n]), -f[:, None]], axis=1)
        mat = jnp.concatenate([top, jnp.concatenate([f, jnp.zeros((1,), dtype)])[None]])
        mat = jnp.where(jnp.any(free), mat, eye)
        rhs = jnp.stack(
            [
                jnp.concatenate([jnp.zeros((n,), dtype), jnp.ones((1,), dtype)]),
                jnp.concatenate([jnp.where(free, -b, 0.0), jnp.zeros((1,), dtype)]),
            ],
            axis=1,
        )
        lu = lu_factor(mat)
        x = lu_solve(lu, rhs)
        x = x + lu_solve(lu, rhs - mat @ x)
        x0, x1 = x[:n, 0], x[:n, 1]
        q0, den = x0 @ gs @ x0, cn2 - x1 @ gs @ x1
        s = jnp.sqrt(jnp.maximum(q0, 0.0) / jnp.where(den > 0, den, 1.0))
        w = x0 + s * x1
        valid = (den > 0) & (q0 > 0) & jnp.all(w >= -tol) & jnp.all(jnp.isfinite(w))
        return s, jnp.maximum(w, 0.0) / jnp.sum(jnp.maximum(w, 0.0)), valid

    def step(s):
        shifted = gs + s * (b[:, None] + b[None, :]) + s * s * (m @ b)
        w_qp, _ = min_norm_simplex(shifted)
        _, w_cf, valid = closed_form(w_qp > 0)
        take = valid & (objective(w_cf) <= objective(w_qp))
        w = jnp.where(take, w_cf, w_qp)
        return w, norm_w(w) / safe_cn

    def cond(carry):
        _, _, it, res = carry
        return (it < max_iter) & (res > tol)

    def body(carry):
        _, s, it, _ = carry
        w, s_new = step(s)
        return w, s_new, it + 1, kkt(w)

    w0 = m
    s0 = norm_w(m) / safe_cn
    w, s, _, residual = lax.while_loop(cond, body, (w0, s0, 0, jnp.asarray(jnp.inf, dtype)))
    trivial = cn <= 0
    return (
        jnp.where(trivial, m, w),
        jnp.where(trivial, 0.0, s),
        jnp.where(trivial, jnp.zeros((), dtype), residual),
    )


def nash_solve(
    g: jax.Array, max_iter: int | None = None, ridge: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    r"""``(alpha, residual)``: :math:`\alpha > 0` with :math:`(G\alpha)_i = 1/\alpha_i`.

    The solution is the minimiser of the self-concordant
    :math:`f(a) = \tfrac12 a^\top \hat G a - \sum_i \log a_i` (scaled: :math:`\alpha =
    D^{-1} a`), found by Newton's method from the best point on the ray :math:`t\,1`:
    damped steps :math:`1/(1+\lambda)` while the Newton decrement :math:`\lambda \ge
    1/4` (they keep :math:`a > 0`), full steps after, until :math:`\lambda^2 \le (n
    \epsilon)^2` or a full step stops shrinking it fourfold (the rounding floor). For
    two tasks the start is the solution, :math:`a_i = 1/\sqrt{1 + \cos(g_1, g_2)}`.

    A solution exists iff :math:`0` is not in the convex hull of the gradients (else
    :math:`f` decreases without bound along the non-negative :math:`v` with
    :math:`v^\top J = 0`). Existence is decided first, on the squared distance
    :math:`\lambda = \min_{w\in\Delta} w^\top \hat G w` of the hull of the unit
    gradients to 0 (``min_norm_simplex``): none exists when :math:`\lambda \le 10\, n\,
    \epsilon`, the rounding floor of :math:`\hat G` (so in float32, hulls within about
    :math:`5\cdot 10^{-3}` of 0 count as stationary), and then, or when a gradient is
    zero, or when Newton's method ends at a point with a residual of 1 or more, the
    weights are zero and the residual is ``inf``. (The Newton decrement alone does not
    decide it: on rank-deficient stationary inputs it falls below 1/4 while the iterate
    runs off along :math:`v`.) ``ridge`` adds :math:`\rho \|g_i\|^2` to :math:`G_{ii}`.
    ``residual`` is :math:`\max_i |\alpha_i (G\alpha)_i - 1|` (``inf`` when unsolved).
    """
    n = g.shape[0]
    max_iter = 100 if max_iter is None else max_iter
    dtype = g.dtype
    _, d, gn = unit_diagonal(g)
    gn = gn + ridge * jnp.eye(n, dtype=dtype)
    total = jnp.sum(gn)
    a0 = jnp.full((n,), 1.0, dtype) * jnp.sqrt(n / jnp.where(total > 0, total, n))
    if n == 2:  # the solution is symmetric: a_i = 1/sqrt(1 + ridge + cos), the start a0
        a = a0
        # lambda = (1 + cos) / 2 = total / 4 for two unit gradients.
        solved = (total / 4 > 10 * n * _eps(dtype)) & jnp.all(jnp.diagonal(g) > 0)
        residual = jnp.max(jnp.abs(a * (gn @ a) - 1.0))
        inf = jnp.asarray(jnp.inf, dtype)
        return jnp.where(solved, a / d, 0.0), jnp.where(solved, residual, inf)
    floor = (n * _eps(dtype)) ** 2

    def cond(c):
        _, _, _, it, done = c
        return ~done & (it < max_iter)

    def body(c):
        a, _, prev, it, _ = c
        grad = gn @ a - 1.0 / a
        hess = gn + jnp.diag(1.0 / a**2)
        lu = lu_factor(hess)
        delta = lu_solve(lu, grad)
        delta = delta + lu_solve(lu, grad - hess @ delta)
        lam2 = grad @ delta
        pure = lam2 < 1.0 / 16
        stalled = pure & (prev < 1.0 / 16) & (lam2 > prev / 4)
        new = a - jnp.where(pure, 1.0, 1.0 / (1.0 + jnp.sqrt(jnp.maximum(lam2, 0.0)))) * delta
        ok = jnp.all(jnp.isfinite(new)) & jnp.all(new > 0)
        a = jnp.where(ok & ~stalled, new, a)
        done = ~ok | stalled | (lam2 <= floor)
        return a, lam2, jnp.minimum(lam2, prev), it + 1, done

    inf = jnp.asarray(jnp.inf, dtype)
    a, _, best, _, _ = lax.while_loop(cond, body, (a0, inf, inf, 0, jnp.asarray(False)))
    w, _ = min_norm_simplex(gn)
    exists = w @ gn @ w > 10 * n * _eps(dtype)
    residual = jnp.max(jnp.abs(a * (gn @ a) - 1.0))
    solved = (
        exists
        & (best < 1.0 / 16)
        & jnp.all(jnp.isfinite(a))
        & jnp.all(jnp.diagonal(g) > 0)
        & (residual < 1.0)
    )
    alpha = jnp.where(solved, a / d, 0.0)
    return alpha, jnp.where(solved, residual, inf)


def cagrad_direction(
    g: jax.Array, c: float, max_iter: int | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""``(coef, gap)``: CAGrad's direction :math:`d = \mathrm{coef}^\top J` (before the
    rescaling), certified by its duality gap.

    The primal problem is :math:`\max_d \min_i \langle g_i, d\rangle` over the ball
    :math:`\|d - g_0\| \le c_n`. Two feasible candidates are compared on their primal
    value :math:`p(d) = \min_i (G\,\mathrm{coef})_i`:

    * the dual one, :math:`d = g_0 + g_w / s` from ``cagrad_solve``;
    * the projection of :math:`g_0` on the dual cone :math:`\{x : Jx \ge 0\}`,
      :math:`d = g_0 + J^\top u`, :math:`u = \arg\min_{u\ge0} \tfrac12 u^\top G u +
      u^\top G m` (``nnls_gram``), when it lies in the ball. Where the dual optimum is
      :math:`g_w = 0` (0 in the convex hull, e.g. weakly stationary inputs), the dual
      one's direction :math:`g_w / \|g_w\|` is rounding noise, while this one attains
      the optimum 0 and is unique (so the result does not depend on the row order).

    ``gap`` is :math:`(F(w) - p(d)) / \|g_0\|^2 \ge 0` (up to rounding), with
    :math:`F(w) = b^\top w + c_n \|g_w\|` the dual value (the smaller of its values at
    the solver's :math:`w` and at the min-norm point), an upper bound on every
    :math:`p`: a solver-free certificate of optimality. For a zero mean gradient the
    direction is 0 and the gap 0.
    """
    n = g.shape[0]
    dtype = g.dtype
    scale = jnp.maximum(jnp.trace(g) / n, jnp.finfo(dtype).tiny)
    gs = g / scale
    m = jnp.full((n,), 1.0 / n, dtype)
    b = gs @ m
    g0sq = jnp.maximum(m @ b, 0.0)
    cn = c * jnp.sqrt(g0sq)
    w, s, _ = cagrad_solve(g, c, max_iter)
    dual_coef = m + jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0) * w
    u, _ = nnls_gram(gs, -b, max_iter)
    proj_coef = m + u
    in_ball = u @ gs @ u <= cn**2

    def primal(coef):
        return jnp.min(gs @ coef)

    take_proj = in_ball & (primal(proj_coef) > primal(dual_coef))
    coef = jnp.where(take_proj, proj_coef, dual_coef)

    def dual(v):
        return v @ b + cn * jnp.sqrt(jnp.maximum(v @ gs @ v, 0.0))

    # The bound at the min-norm point is tight where the dual optimum has g_w = 0.
    dual_value = jnp.minimum(dual(w), dual(min_norm_simplex(gs)[0]))
    trivial = cn <= 0
    gap = (dual_value - primal(coef)) / jnp.where(trivial, 1.0, g0sq)
    return jnp.where(trivial, m, coef), jnp.where(trivial, 0.0, jnp.maximum(gap, 0.0))


def upgrad_products_residual(g: jax.Array, v: jax.Array, products: jax.Array) -> jax.Array:
    r"""``upgrad_residual`` of the projections ``v`` with the products
    :math:`\langle d_i, g_j\rangle` given (computed from the gradients, ``upgrad_refine``)."""
    return jnp.max(upgrad_products_residuals(g, v, products))


def upgrad_products_residuals(g: jax.Array, v: jax.Array, products: jax.Array) -> jax.Array:
    """The ``n`` KKT residuals of ``upgrad_products_residual``, one per projection."""
    n = g.shape[0]
    norms, d, _ = unit_diagonal(g)
    inv = jnp.where(norms > 0, 1.0 / d, 0.0)
    scaled_u = (v - jnp.eye(n, dtype=g.dtype)) * d[None, :] * inv[:, None]
    return jnp.max(jnp.abs(jnp.minimum(scaled_u, products * inv[:, None] * inv[None, :])), axis=1)


def nnls_gram_from(
    h: jax.Array,
    x0: jax.Array,
    grad0: jax.Array,
    max_iter: int | None = None,
    factor: jax.Array | None = None,
) -> jax.Array:
    r"""``nnls_gram`` warm-started at ``x0 >= 0`` with an accurate gradient ``grad0``.

    Solves :math:`\min_{u \ge 0} \tfrac12 (u - x_0)^\top H (u - x_0) + g_0^\top (u -
    x_0)`, where :math:`g_0` is the objective's gradient at :math:`x_0` computed more
    accurately than :math:`H x_0 - p` could be (iterative refinement: the rounding error
    of :math:`H` then only enters through the correction :math:`u - x_0`). The same
    Lawson-Hanson steps as ``nnls_gram``, in the correction: the free variables'
    step solves :math:`H_{FF}\,\delta_F = -(g_0 - H_{:,N} x_{0,N})_F` (an eigenvalue
    pseudo-inverse cut at :math:`\epsilon`, so a dependent free set gets the minimum-norm
    step), the gradient at :math:`u` is :math:`g_0 + H (u - x_0)`, and the active set
    starts at the support of :math:`x_0`. It stops when no variable can enter (the KKT
    conditions with that gradient hold) or when the variable that entered cannot move.

    With ``factor`` :math:`L` (:math:`H = L L^\top`, ``gram_factor``), the free step is
    :math:`\delta_F = U_F \Sigma_F^{-2} U_F^\top r_F` from the SVD :math:`L_F = U_F
    \Sigma_F V_F^\top` of the free rows (cut at :math:`10\sqrt n\,\epsilon\,\sigma_
    \max`): the singular values of the factor carry errors of
    :math:`\epsilon\,\sigma_\max`, so eigenvalues of :math:`H_{FF}` are resolved down to
    about :math:`\epsilon^2` where the eigenvalues of a rounded :math:`H` stop at
    :math:`\epsilon`.
    """
    n = h.shape[0]
    max_iter = default_max_iter(n) if max_iter is None else max_iter
    dtype = h.dtype
    idx = jnp.arange(n)
    hmax = jnp.max(jnp.abs(h))
    gmax = jnp.max(jnp.abs(grad0))
    rel = 10 * n * _eps(dtype)

    def step(free):
        rhs = -jnp.where(free, grad0 - h @ jnp.where(free, 0.0, x0), 0.0)
        if factor is None:
            m = jnp.where(free[:, None] & free[None, :], h, 0.0)
            pinv = jnp.linalg.pinv(m, rtol=_eps(dtype), hermitian=True)
            delta = pinv @ rhs
            delta = delta + pinv @ (rhs - m @ delta)
        else:  # no refinement against the rounded H: it would bring back its noise
            u_, sig, _ = jnp.linalg.svd(jnp.where(free[:, None], factor, 0.0))
            cut = 10 * jnp.sqrt(n) * _eps(dtype) * sig[0]
            inv2 = jnp.where(sig > cut, 1.0 / jnp.where(sig > cut, sig, 1.0) ** 2, 0.0)
            delta = u_ @ (inv2 * (u_.T @ rhs))
        return jnp.where(free, x0 + delta, 0.0)

    def cond(c):
        return ~c[4] & (c[3] < max_iter)

    def body(c):
        u, free, entered, it, _ = c
        s = step(free)
        bad = free & ~(s > 0)
        feasible = ~jnp.any(bad)
        gap = u - s
        ratio = jnp.where(bad & (gap > 0), u / jnp.where(gap > 0, gap, 1.0), 0.0)
        ratio = jnp.where(bad, ratio, jnp.inf)
        out = jnp.argmin(ratio)
        back = u + ratio[out] * (s - u)
        free_back = free & (back > 0) & (idx != out)
        stalled = (out == entered) & (ratio[out] <= 0)
        w = jnp.where(free, -jnp.inf, -(grad0 + h @ (s - x0)))
        j = jnp.argmax(w)
        enter = w[j] > rel * (gmax + hmax * jnp.sum(jnp.abs(s - x0)))
        u = jnp.where(feasible, s, jnp.where(stalled, u, jnp.where(free_back, back, 0.0)))
        free = jnp.where(
            feasible,
            free | ((idx == j) & enter),
            jnp.where(stalled, free & (idx != out), free_back),
        )
        entered = jnp.where(feasible, jnp.where(enter, j, -1), -1)
        done = jnp.where(feasible, ~enter, stalled)
        return u, free, entered, it + 1, done

    x0 = jnp.maximum(x0, 0.0)
    init = (x0, x0 > 0, jnp.asarray(-1), 0, jnp.asarray(False))
    return lax.while_loop(cond, body, init)[0]


def gram_factor(q: jax.Array, m: jax.Array) -> jax.Array:
    r"""A factor :math:`L` with :math:`L L^\top = Q M Q^\top`, accurate column by column.

    ``q`` is orthogonal (the eigenvectors of a rounded Gramian :math:`H`) and ``m`` is
    :math:`Q^\top H Q` computed from the gradients themselves (:math:`B B^\top` with
    :math:`B = Q^\top D^{-1} J`), so its small diagonal entries are accurate where the
    rounded :math:`H`'s small eigenvalues are noise. With :math:`S = \mathrm{diag}(M)^
    {1/2}` and :math:`S^{-1} M S^{-1} = W \Gamma W^\top` (a well-conditioned matrix),
    :math:`L = Q S W \Gamma^{1/2}`.
    """
    s = jnp.sqrt(jnp.maximum(jnp.diagonal(m), 0.0))
    s = jnp.where(s > 0, s, 1.0)
    gam, w = jnp.linalg.eigh(m / s[:, None] / s[None, :])
    return (q * s[None, :]) @ (w * jnp.sqrt(jnp.maximum(gam, 0.0))[None, :])


def upgrad_refine(
    g: jax.Array,
    v: jax.Array,
    products: jax.Array,
    max_iter: int | None = None,
    factor: jax.Array | None = None,
) -> jax.Array:
    r"""One refinement of UPGrad's projections ``v`` (rows) with accurate products.

    ``products[i, j]`` is :math:`\langle d_i, g_j\rangle`, :math:`d_i = v_i^\top J`,
    computed from the gradients themselves (:math:`J (J^\top v_i)`): its rounding error
    is :math:`\epsilon \|d_i\| \|g_j\|`, where :math:`(G v_i)_j` from a rounded Gramian
    carries :math:`\epsilon \|v_i\| \|g_i\| \|g_j\|`. That caps :math:`\|d_i\|` at about
    :math:`\sqrt{\epsilon}\,\|v_i\|\max\|g\|` when the projection is near 0
    (stationary inputs: the Gramian squares the condition number). Each projection's
    problem, in the unit-diagonal variables :math:`x = D(v_i - e_i)`, is re-solved by
    ``nnls_gram_from`` warm-started at the current :math:`x` with the gradient
    :math:`D^{-1}(J d_i)`: the active set may change (variables enter and leave), and
    the Gramian's rounding error only scales the correction.
    """
    n = g.shape[0]
    dtype = g.dtype
    norms, d, gn = unit_diagonal(g)
    eye = jnp.eye(n, dtype=dtype)
    inv = jnp.where(norms > 0, 1.0 / d, 0.0)

    def one(ui, qi):
        x = nnls_gram_from(gn, ui * d, qi * inv, max_iter, factor)
        return x * inv

    return eye + jax.vmap(one)(v - eye, products.astype(dtype))
