"""Float64 NumPy/SciPy references for the aggregators of ``aggregators_conflict``, written
from the papers' formulas on the Jacobian itself (not on the Gramian, as the JAX code)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls


def hard_jacobians() -> dict[str, np.ndarray]:
    """Deterministic hard inputs, 4 x 6 unless named otherwise."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(4, 6))
    e = np.eye(6)
    s = np.sqrt(1 - 0.999**2)
    opposed = np.stack([e[0], -0.999 * e[0] + s * e[1], e[2] + 0.5 * e[0], -e[3] + e[2]])
    scaled = rng.normal(size=(4, 6)) * np.array([[1e-4], [1e-1], [1e1], [1e4]])
    a, b, c = rng.normal(size=(3, 6))
    low = np.stack([a, b, a + 2 * b, c])  # rank 3, with a non-trivial dual cone
    dup = normal[[0, 1, 1, 2]]
    zero = normal.copy()
    zero[2] = 0.0
    return {
        "normal": normal,
        "cos-0.999": opposed,
        "scales": scaled,
        "rank3": low,
        "duplicated": dup,
        "zero-row": zero,
        "one": normal[:1],
    }


def dual_cone_projection(j: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The projection of ``m`` onto ``{x : J x >= 0}``: ``m + J^T lam``,
    ``lam = argmin_{lam >= 0} |m + J^T lam|`` (SciPy's NNLS on the Jacobian)."""
    lam, _ = nnls(j.T, -m, maxiter=50 * j.shape[0])
    return m + j.T @ lam


def dualproj(j: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    n = j.shape[0]
    p = np.full(n, 1.0 / n) if pref is None else pref
    return dual_cone_projection(j, j.T @ p)


def upgrad(j: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    """Quinton & Rey: the sum of the projections of ``p_i g_i`` (any sign of ``p_i``)."""
    n = j.shape[0]
    p = np.full(n, 1.0 / n) if pref is None else pref
    return sum(dual_cone_projection(j, p[i] * j[i]) for i in range(n))


_EPS64 = float(np.finfo(np.float64).eps)


def aligned_mtl(j: np.ndarray, pref=None, scale_mode="min", eps=_EPS64):
    """Senushkin et al., Alg. 1, from the SVD ``J = U S V^T``: the aligned gradients
    are ``sqrt(sigma) U_r V_r^T``, the update ``sqrt(sigma) V_r U_r^T p``."""
    n = j.shape[0]
    p = np.full(n, 1.0 / n) if pref is None else pref
    u, s, vt = np.linalg.svd(j, full_matrices=False)
    lam = s**2
    r = int(np.sum(lam > lam.max() * n * eps))
    if r == 0:
        return j.T @ p
    kept = np.sort(lam[:r])
    sigma = {"min": kept[0], "median": kept[(r - 1) // 2], "rmse": kept.mean()}[scale_mode]
    return np.sqrt(sigma) * vt[:r].T @ (u[:, :r].T @ p)


def config(j: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    """Liu et al. Eq. 2: ``b = pinv(U) p``, ``d = (sum_i g_i . b/|b|) b/|b|``."""
    n = j.shape[0]
    p = np.ones(n) if pref is None else pref
    norms = np.linalg.norm(j, axis=1, keepdims=True)
    units = np.where(norms > 0, j / np.where(norms > 0, norms, 1.0), 0.0)
    b = np.linalg.pinv(units) @ p
    if not np.linalg.norm(b) > 0:
        return np.zeros(j.shape[1])
    bh = b / np.linalg.norm(b)
    return np.sum(j @ bh) * bh


def graddrop(j: np.ndarray, u: np.ndarray, leak=None, f=lambda p: p) -> np.ndarray:
    """Chen et al., Alg. 1 lines 10-15, column by column."""
    n, cols = j.shape
    leak = np.zeros(n) if leak is None else leak
    out = np.zeros(cols)
    for k in range(cols):
        col = j[:, k]
        mag = np.abs(col).sum()
        p = 0.5 * (1 + col.sum() / mag) if mag > 0 else 0.5
        for i in range(n):
            keep = (f(p) > u[k] and col[i] > 0) or (f(p) < u[k] and col[i] < 0)
            out[k] += (leak[i] + (1 - leak[i]) * keep) * col[i]
    return out


def gradvac(j, targets, orders, beta=0.5):
    """Wang et al., Alg. 1 on the vectors: returns ``(update, new_targets)``.
    ``orders[i]`` lists the other tasks in visiting order."""
    n = j.shape[0]
    new = targets.copy()
    update = np.zeros(j.shape[1])
    for i in range(n):
        gi = j[i].copy()
        for k in orders[i]:
            gj = j[k]
            ni, nj = np.linalg.norm(gi), np.linalg.norm(gj)
            phi = gi @ gj / (ni * nj) if ni * nj > 0 else 0.0
            hat = targets[i, k]
            if phi < hat and nj > 0 and abs(hat) < 1:
                gi = (
                    gi
                    + ni
                    * (hat * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - hat**2))
                    / (nj * np.sqrt(1 - hat**2))
                    * gj
                )
            new[i, k] = (1 - beta) * hat + beta * phi
        update += gi
    return update, new


def krum(j: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Blanchard et al.: scores from squared distances to the n - f - 2 nearest others."""
    n = j.shape[0]
    scores = []
    for i in range(n):
        d2 = sorted(float(np.sum((j[i] - j[k]) ** 2)) for k in range(n) if k != i)
        scores.append(sum(d2[: n - f - 2]))
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return j[chosen].mean(0)


def trimmed_mean(j: np.ndarray, b: int) -> np.ndarray:
    s = np.sort(j, axis=0)
    return s[b : j.shape[0] - b].mean(0)
