"""Accuracy of the aggregators against exact float64 solutions on hard Jacobians.

The cases (deterministic, :func:`hard_cases`) have 2-8 tasks and 10-1000 parameters:
nearly opposed pairs (cosines -0.97 to -0.999), nearly dependent sets (a gradient within
1e-2 to 1e-4 of the span of the others, so that the unit-diagonal Gramian has condition
numbers up to about 1e8) and random sets, all with gradient norms spread over up to 4
orders of magnitude (so ``cond(G)`` reaches 1e8 and beyond). The references are
independent float64 NumPy/SciPy solutions computed on the Jacobian itself:

* UPGrad: ``v_i = e_i + argmin_{u >= 0} ||J^T u + g_i||`` by ``scipy.optimize.nnls``;
* MGDA: the least-distance problem ``min ||J^T u||^2 + (1^T u - 1)^2, u >= 0`` by
  ``scipy.optimize.nnls`` (``w = u / sum u``);
* CAGrad: enumeration of every support with its closed-form KKT solution;
* Nash-MTL: ``scipy.optimize.root`` on ``a * (G a) = 1`` in log variables.

For each aggregator and precision, the table gives the number of cases whose relative
error ``||d - d*|| / ||d*||`` exceeds the bound (1e-4 in float64, 1e-3 in float32) and
the worst error. float32 runs take the float32-rounded Jacobian and compare with the
float64 solution for that same rounded Jacobian.

Run: ``python -m benchmarks.aggregators_accuracy``.
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import jaxreg as jr

BOUND = {"float64": 1e-4, "float32": 1e-3}


# ----------------------------------------------------------------- the hard cases


def _unit(v):
    return v / np.linalg.norm(v)


SHAPES = [(2, 10), (3, 100), (5, 1000), (8, 100), (2, 1000), (3, 10), (5, 100), (8, 1000)]


def issue_pair(d: int = 100, seed: int = 0) -> np.ndarray:
    """The issue's example: two gradients at cos = -0.97 with a 30x norm ratio."""
    g = np.random.default_rng(seed).normal(size=(2, d))
    u1 = _unit(g[0])
    v = _unit(g[1] - (g[1] @ u1) * u1)
    return np.stack([u1, 30 * (-0.97 * u1 + np.sqrt(1 - 0.97**2) * v)])


def hard_cases(
    count: int = 64, seed: int = 0, shapes=SHAPES, d_issue: int = 100
) -> list[tuple[str, np.ndarray]]:
    """``count + 1`` deterministic ``(name, J)`` pairs, ``J`` of shape ``[n, d]``
    (float64), cycling through ``shapes``; the last is :func:`issue_pair`."""
    rng = np.random.default_rng(seed)
    cosines = [-0.97, -0.99, -0.999]
    gaps = [1e-2, 1e-3, 1e-4]
    cases = []
    for k in range(count):
        n, d = shapes[k % len(shapes)]
        kind = ("opposed", "dependent", "random", "opposed")[(k // len(shapes)) % 4]
        g = rng.normal(size=(n, d))
        if kind == "opposed":
            cos = cosines[k % 3]
            u1, v = _unit(g[0]), g[1] - (g[1] @ _unit(g[0])) * _unit(g[0])
            g[1] = cos * u1 + np.sqrt(1 - cos**2) * _unit(v)
            g[0] = u1
            name = f"opposed cos={cos}"
        elif kind == "dependent" and n >= 3:
            gap = gaps[k % 3]
            coef = rng.normal(size=n - 1)
            g[-1] = coef @ g[:-1] + gap * np.linalg.norm(coef @ g[:-1]) * _unit(g[-1])
            name = f"dependent gap={gap:g}"
        elif kind == "dependent":  # two tasks: a pair at cos = -0.999 (exactly)
            u1, v = _unit(g[0]), g[1] - (g[1] @ _unit(g[0])) * _unit(g[0])
            g[0], g[1] = u1, -0.999 * u1 + np.sqrt(1 - 0.999**2) * _unit(v)
            name = "opposed cos=-0.999"
        else:
            name = "random"
        ratio = 10.0 ** (4 * (k % 5) / 4)  # norm ratios 1, 10, 100, 1e3, 1e4
        scales = ratio ** rng.uniform(0, 1, size=n)
        scales[rng.integers(n)] = 1.0
        scales[rng.integers(n)] = ratio
        g = g / np.linalg.norm(g, axis=1, keepdims=True) * scales[:, None]
        cases.append((f"{kind[:3]}-{k} n={n} d={d} ratio={ratio:.0e} {name}", g))
    cases.append(("issue pair cos=-0.97 ratio=30", issue_pair(d_issue, seed)))
    return cases


# ----------------------------------------------------------------- float64 references


def ref_upgrad(j: np.ndarray) -> np.ndarray:
    """UPGrad (Quinton & Rey 2024): the mean of the projections onto the dual cone."""
    n = len(j)
    out = np.zeros(j.shape[1])
    for i in range(n):
        u, _ = scipy.optimize.nnls(j.T, -j[i], maxiter=50 * n)
        out += j[i] + u @ j
    return out / n


def ref_mgda(j: np.ndarray) -> np.ndarray:
    """MGDA: the min-norm point of the convex hull, by least-distance programming."""
    n = len(j)
    a = np.concatenate([j.T, np.ones((1, n))])
    b = np.zeros(len(a))
    b[-1] = 1.0
    u, _ = scipy.optimize.nnls(a, b, maxiter=50 * n)
    return (u / u.sum()) @ j


def _cagrad_kkt(gram: np.ndarray, w: np.ndarray, c: float) -> float:
    """Largest violation of the KKT conditions of CAGrad's dual problem at ``w``."""
    mean = np.full(len(gram), 1 / len(gram))
    cn = c * np.sqrt(mean @ gram @ mean)
    r = gram @ mean + cn * (gram @ w) / np.sqrt(w @ gram @ w)
    lam = w @ r
    return np.max(np.abs(np.minimum(w, r - lam))) / np.max(np.abs(r))


def ref_cagrad_weights(gram: np.ndarray, c: float = 0.5, enumerate_all: bool = False):
    """CAGrad's ``w* = argmin_{w in simplex} b^T w + c ||g0|| ||g_w||`` (Liu et al. 2021).

    The closed-form KKT point on the support that ``scipy.optimize.minimize`` (SLSQP)
    finds, if it satisfies the KKT conditions to 1e-9; else (or with ``enumerate_all``)
    the best closed-form KKT point over every support."""
    n = len(gram)
    mean = np.full(n, 1 / n)
    b = gram @ mean
    cn = c * np.sqrt(mean @ gram @ mean)
    supports = itertools.chain.from_iterable(
        itertools.combinations(range(n), k) for k in range(1, n + 1)
    )
    if not enumerate_all:
        scale = 1 / np.diag(gram).max()
        sol = scipy.optimize.minimize(
            lambda w: scale * (w @ b + cn * np.sqrt(max(w @ gram @ w, 0.0))),
            mean,
            bounds=[(0, 1)] * n,
            constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        found = tuple(np.flatnonzero(sol.x > 1e-6))
        w = ref_cagrad_weights_on(gram, c, [found])
        if w is not None and _cagrad_kkt(gram, w, c) < 1e-9:
            return w
    return ref_cagrad_weights_on(gram, c, supports)


def ref_cagrad_weights_on(gram: np.ndarray, c: float, supports):
    """The best closed-form KKT point of CAGrad's dual problem over ``supports``."""
    n = len(gram)
    mean = np.full(n, 1 / n)
    b = gram @ mean
    cn = c * np.sqrt(mean @ gram @ mean)
    best, best_w = np.inf, None
    for free in supports:
        k = len(free)
        if k:
            f = list(free)
            mat = np.block([[gram[np.ix_(f, f)], -np.ones((k, 1))], [np.ones((1, k)), 0]])
            rhs = np.stack([np.append(np.zeros(k), 1.0), np.append(-b[f], 0.0)], axis=1)
            x = np.linalg.lstsq(mat, rhs, rcond=None)[0][:k]
            q0 = x[:, 0] @ gram[np.ix_(f, f)] @ x[:, 0]
            den = cn**2 - x[:, 1] @ gram[np.ix_(f, f)] @ x[:, 1]
            candidates = [x[:, 0]]  # the g_w = 0 point of this face, if any
            if den > 0 and q0 > 0:
                candidates.append(x[:, 0] + np.sqrt(q0 / den) * x[:, 1])
            for wf in candidates:
                if np.all(wf >= -1e-12):
                    w = np.zeros(n)
                    w[f] = np.maximum(wf, 0) / np.maximum(wf, 0).sum()
                    value = b @ w + cn * np.sqrt(max(w @ gram @ w, 0.0))
                    if value < best:
                        best, best_w = value, w
    return best_w


def ref_cagrad(j: np.ndarray, c: float = 0.5) -> np.ndarray:
    """CAGrad's update ``(g0 + c ||g0|| g_w / ||g_w||) / (1 + c^2)``."""
    gram = j @ j.T
    w = ref_cagrad_weights(gram, c)
    g0, gw = j.mean(0), w @ j
    return (g0 + c * np.linalg.norm(g0) * gw / np.linalg.norm(gw)) / (1 + c**2)


def ref_nash_alpha(gram: np.ndarray) -> np.ndarray:
    """Nash-MTL's ``alpha > 0`` with ``alpha * (G alpha) = 1``, by ``scipy.optimize.root``."""
    n = len(gram)
    norms = np.sqrt(np.diag(gram))
    gn = gram / np.outer(norms, norms)

    def f(a):
        return 0.5 * a @ gn @ a - np.sum(np.log(a)) if np.all(a > 0) else np.inf

    def grad(a):
        return gn @ a - 1 / a

    def hess(a):
        return gn + np.diag(1 / a**2)

    def fun(y):
        a = np.exp(y)
        return a * (gn @ a) - 1.0, (np.diag(gn @ a) + a[:, None] * gn) * a[None, :]

    # The convex potential by a trust region (steps out of a > 0 are rejected), then
    # the equations themselves by a root finder in log variables.
    a0 = np.full(n, np.sqrt(n / gn.sum()))
    opt = scipy.optimize.minimize(
        f, a0, jac=grad, hess=hess, method="trust-exact", options={"gtol": 1e-13}
    )
    sol = scipy.optimize.root(fun, np.log(opt.x), jac=True, method="hybr", options={"xtol": 1e-15})
    a = np.exp(sol.x)
    assert np.max(np.abs(a * (gn @ a) - 1)) < 1e-10, (sol.message, opt.message)
    return a / norms


def ref_nash(j: np.ndarray) -> np.ndarray:
    return ref_nash_alpha(j @ j.T) @ j


REFERENCES = {"upgrad": ref_upgrad, "mgda": ref_mgda, "cagrad": ref_cagrad, "nash_mtl": ref_nash}


# ----------------------------------------------------------------- running the code


def aggregators() -> dict:
    return {
        "upgrad": jr.aggregators.upgrad(),
        "mgda": jr.aggregators.mgda(),
        "cagrad": jr.aggregators.cagrad(0.5),
        "nash_mtl": jr.aggregators.nash_mtl(),
    }


def run_batched(aggregator, js: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The aggregator on a batch ``[B, n, d]`` of Jacobians, mapped in one jit: the
    updates and the residuals in the state (NaN where the state has none)."""
    js = jnp.asarray(js, dtype)
    state = aggregator.init({"p": js[0, 0]})

    def one(j):
        update, new_state = aggregator.update({"p": j}, state)
        residual = getattr(new_state, "residual", jnp.full((), jnp.nan, jnp.float32))
        return update["p"], residual

    update, residual = jax.jit(lambda js: jax.lax.map(one, js))(js)
    return np.asarray(update, np.float64), np.asarray(residual)


def errors(aggregator, name: str, cases, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Relative errors of ``aggregator`` on ``cases`` in ``dtype`` against the reference,
    and the residuals it reported."""
    out, residuals = np.zeros(len(cases)), np.zeros(len(cases))
    groups: dict = {}
    for k, (_, j) in enumerate(cases):
        groups.setdefault(j.shape, []).append(k)
    for ks in groups.values():
        js = np.stack([cases[k][1] for k in ks]).astype(dtype).astype(np.float64)
        got, residual = run_batched(aggregator, js, dtype)
        for row, k in enumerate(ks):
            ref = REFERENCES[name](js[row])
            out[k] = np.linalg.norm(got[row] - ref) / np.linalg.norm(ref)
            residuals[k] = residual[row]
    return out, residuals


def main() -> None:
    cases = hard_cases()
    conds = [np.linalg.cond(j @ j.T) for _, j in cases]
    units = [np.linalg.cond(_unitdiag(j)) for _, j in cases]
    print(
        f"{len(cases)} cases; cond(G) up to {max(conds):.1e}, "
        f"cond(unit-diagonal G) up to {max(units):.1e}"
    )
    rows = []
    start = time.perf_counter()
    for precision, dtype in (("float32", np.float32), ("float64", np.float64)):
        with jax.enable_x64(precision == "float64"):
            for name, method in aggregators().items():
                err, residual = errors(method, name, cases, dtype)
                bad = int(np.sum(err > BOUND[precision]))
                worst = int(np.argmax(err))
                rows.append((name, precision, bad, err.max(), np.max(residual), cases[worst][0]))
    print(
        f"{'aggregator':10s} {'precision':9s} {'> bound':>8s} {'worst':>9s} "
        f"{'residual':>9s}  worst case"
    )
    for name, precision, bad, worst, residual, case in sorted(rows):
        print(
            f"{name:10s} {precision:9s} {bad:5d}/{len(cases)} {worst:9.2e} {residual:9.1e}  {case}"
        )
    # The bias of a Nash-MTL ridge (relative to each G_ii), against the exact solution.
    if hasattr(jr.aggregators, "mgda_weights"):  # the exact solvers
        with jax.enable_x64(True):
            for ridge in (1e-6, 1e-4):
                err, _ = errors(jr.aggregators.nash_mtl(ridge=ridge), "nash_mtl", cases, np.float64)
                print(
                    f"nash_mtl(ridge={ridge:g}), float64: median error {np.median(err):.1e}, "
                    f"worst {err.max():.2e} ({cases[int(np.argmax(err))][0]})"
                )
    print(f"({time.perf_counter() - start:.1f} s)")


def _unitdiag(j):
    gram = j @ j.T
    norms = np.sqrt(np.diag(gram))
    return gram / np.outer(norms, norms)


if __name__ == "__main__":
    main()
