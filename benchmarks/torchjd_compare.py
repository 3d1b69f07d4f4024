r"""jaxreg's aggregators against TorchJD 0.18 on the same float64 Jacobians.

Every aggregator both libraries have is one entry of ``METHODS``: a jaxreg
constructor (by name in ``jaxreg.aggregators``, with its options), a TorchJD
constructor, and a solver-free *certificate*, a number computed in float64 NumPy from
the Jacobian and an aggregator's output alone (0 at the right answer, larger the
further away). An entry whose jaxreg name does not exist yet is skipped, so adding a
method is adding one entry.

The Jacobians (``cases()``, 90 of them) are TorchJD's own test inputs
(``tests/unit/aggregation/_inputs.py``: normal matrices at scales 0 to 1e15, zero
matrices, strongly and strictly weakly stationary and non-weakly stationary 20 x 10 and
20 x 100 matrices; ``benchmarks/jd_samplers.py``) plus harder ones: pairs at cosine
-0.999, row norms spread over 1e-4..1e4, rank-deficient sets, duplicated and zero rows,
and one task.

For each method and case: the relative difference :math:`\|d_{jr} - d_{tj}\| /
\max(\|d_{jr}\|, \|d_{tj}\|)` of the two updates and, where they differ by more than
1e-6, which one the certificate says is right. The certificates:

* sum, mean: the closed form; Random, PCGrad: TorchJD's random draws are replaced by
  jaxreg's (the same Gaussian vector, the same visiting orders), and the certificate is
  a NumPy replay of the published rule with those draws (PCGrad: undecided where
  rounding decides a conflict test, on collinear rows).
* MGDA: the Frank-Wolfe gap :math:`\|d\|^2 - \min_i \langle g_i, d\rangle` over
  :math:`\max_i \|g_i\|^2` (an upper bound on how far :math:`\|d\|^2` is above the
  minimum; 0 exactly at the min-norm point).
* UPGrad: the worst conflict :math:`\max(0, -\min_i \cos(g_i, d))` (UPGrad promises
  none) and the distance to the projections computed by ``scipy.optimize.nnls`` on the
  Jacobian, whose KKT residual is checked.
* CAGrad (``c = 0.5``, no rescaling, as TorchJD): :math:`(F - \min_i \langle g_i, d
  \rangle) / \|g_0\|^2`, where :math:`F` is the smallest dual value :math:`b^\top w + c
  \|g_0\| \|g_w\|` at any simplex point either library produced (an upper bound on the
  optimum), ``inf`` outside the ball :math:`\|d - g_0\| \le c\|g_0\|`.
* Nash-MTL: :math:`\max_i |\alpha_i (G\alpha)_i - 1|`; where no solution exists (0 in
  the convex hull of the gradients, certified by a simplex point ``v`` with
  :math:`\|v^\top J\| \approx 0`) the right output is 0.
* IMTL-G: the spread of the projections :math:`\langle d, g_i\rangle / \|g_i\|` over
  their largest magnitude (IMTL-G equalises them), where a direction with equal
  projections exists (``U x = 1`` solvable for the unit gradients ``U``, checked by
  least squares); 1 for a zero output there. Elsewhere (``nan``) the two
  generalisations differ by definition.
* DualProj: as UPGrad, for the projection of the mean onto the dual cone (non-conflict
  and the distance to the ``nnls`` projection).
* AlignedMTL: the closed form from the SVD of ``J`` (not the eigendecomposition of
  ``G``); ConFIG: the spread of the projections on the unit gradients and the length
  :math:`\sum_i \langle g_i, \hat d\rangle`, where the unit gradients are
  independent; Krum: the paper's rule (squared distances); TrimmedMean: the sorted
  closed form; GradDrop: Algorithm 1 with jaxreg's uniform draw (TorchJD's
  ``torch.rand`` replaced).
* Stateful methods run 3 updates on the same Jacobian and the largest difference over
  the steps is reported; GradVac (TorchJD's ``randperm`` of the other rows replaced by
  jaxreg's orders): a NumPy replay of the 3 steps (undecided where rounding decides a
  test: collinear rows); ExcessMTL: a float64 replay of Eqs. 6-9.
* FairGrad (``alpha = 2``): :math:`\max_i |w_i^{1/\alpha} (G w)_i - 1|` (0 is right;
  where no solution exists, :math:`|d|`). PCD (one step, scales
  :math:`1/\sqrt{|g_i|^2 + \epsilon}`): the QP solved as an NNLS by ``scipy`` where the
  secondaries are independent.
* The weightings MoDo, SDMGrad and CR-MOGM (around MoDo), a second table: the last of 3
  steps' weights on Gramians whose rows are rescaled at each step, against a float64
  NumPy replay of the published update.

For the main cause of each difference, a second TorchJD configuration (``tuned``:
UPGrad without its ``reg_eps`` ridge, MGDA with a tight Frank-Wolfe tolerance, CAGrad
without ``norm_eps``) is compared too.

Run: ``python -m benchmarks.torchjd_compare`` (a few minutes; needs
``pip install 'torchjd[full]==0.18.0'``, the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import jaxreg as jr
from benchmarks import jd_samplers
from benchmarks.common import table

DIFFER = 1e-6  # relative difference above which the two updates "differ"
ZERO = 1e-10  # outputs shorter than ZERO * max_i |g_i| count as 0 (rounding)


# ----------------------------------------------------------------- the Jacobians


@dataclasses.dataclass
class Case:
    name: str
    j: np.ndarray  # [m, n] float64


def _unit(v):
    return v / np.linalg.norm(v)


def _pair(cos: float, d: int, ratio: float, rng) -> np.ndarray:
    g = rng.normal(size=(2, d))
    u = _unit(g[0])
    v = _unit(g[1] - (g[1] @ u) * u)
    return np.stack([u, ratio * (cos * u + np.sqrt(1 - cos**2) * v)])


def cases(seed: int = 0) -> list[Case]:
    """TorchJD's test Jacobians (60) and 30 harder ones, float64, deterministic."""
    rng = np.random.default_rng(seed)
    out = []
    normal_dims = [(1, 1, 1), (4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9)]
    stationarity_dims = [(20, 10, 10), (20, 10, 5), (20, 10, 1), (20, 100, 1), (20, 100, 19)]
    normal = [
        (f"normal {m}x{n} r{r}", jd_samplers.sample("normal", m, n, r, rng))
        for m, n, r in normal_dims
    ]
    out += [Case(name, j) for name, j in normal]
    out += [
        Case(f"zero {m}x{n}", np.zeros((m, n))) for m, n, _ in [(1, 1, 0), (4, 3, 0), (9, 11, 0)]
    ]
    for kind in ("strong", "weak", "non_weak"):
        for m, n, r in stationarity_dims:
            out.append(Case(f"{kind} {m}x{n} r{r}", jd_samplers.sample(kind, m, n, r, rng)))
    for scale in (0.0, 1e-10, 1e3, 1e5, 1e10, 1e15):
        out += [Case(f"{name} x{scale:g}", scale * j) for name, j in normal]
    # cos -0.999 pairs: two tasks at norm ratios 1, 1e2, 1e4; three tasks with such a pair.
    for d, ratio in ((10, 1.0), (100, 1e2), (1000, 1e4)):
        out.append(Case(f"cos -0.999 pair d={d} ratio={ratio:g}", _pair(-0.999, d, ratio, rng)))
    for d in (10, 100):
        j = np.vstack([_pair(-0.999, d, 1.0, rng), rng.normal(size=(1, d)) / np.sqrt(d)])
        out.append(Case(f"cos -0.999 pair + 1 d={d}", j))
    # Row norms 1e-4 .. 1e4.
    for m, d in ((4, 50), (6, 50), (8, 200)):
        j = rng.normal(size=(m, d))
        j = j / np.linalg.norm(j, axis=1, keepdims=True) * np.logspace(-4, 4, m)[:, None]
        out.append(Case(f"row scales 1e-4..1e4 {m}x{d}", j))
    for m, d in ((3, 20), (5, 100)):
        j = np.vstack([_pair(-0.99, d, 1.0, rng), rng.normal(size=(m - 2, d))])
        j = j * np.logspace(-4, 4, m)[rng.permutation(m), None]
        out.append(Case(f"row scales 1e-4..1e4 + cos -0.99 {m}x{d}", j))
    # Rank-deficient (not built to be stationary).
    for m, d, r in ((6, 20, 3), (8, 50, 2), (5, 5, 4)):
        out.append(
            Case(f"rank-deficient {m}x{d} r{r}", rng.normal(size=(m, r)) @ rng.normal(size=(r, d)))
        )
    g = rng.normal(size=(2, 30))
    out.append(Case("rank-deficient g3 = g1 + g2", np.vstack([g, g.sum(0)])))
    out.append(Case("rank-deficient g3 = g1 - 2 g2", np.vstack([g, g[0] - 2 * g[1]])))
    # Duplicated rows.
    g = rng.normal(size=(3, 20))
    out.append(Case("duplicated [g1, g1, g2]", g[[0, 0, 1]]))
    out.append(Case("duplicated [g1, g2, g1, g2]", g[[0, 1, 0, 1]]))
    p = _pair(-0.9, 20, 1.0, rng)
    out.append(Case("duplicated conflicting [g1, g1, g2] cos -0.9", p[[0, 0, 1]]))
    out.append(Case("duplicated [g1, g2, g3, g3, g3]", g[[0, 1, 2, 2, 2]]))
    out.append(Case("duplicated [g1, g1] ", g[[0, 0]]))
    # Zero rows.
    z = np.zeros((1, 20))
    out.append(Case("zero row [g1, 0, g2]", np.vstack([g[:1], z, g[1:2]])))
    out.append(Case("zero rows [0, g1, 0, g2]", np.vstack([z, g[:1], z, g[1:2]])))
    out.append(Case("zero row + cos -0.9 pair", np.vstack([p, z])))
    out.append(Case("zero row [g1, 0]", np.vstack([g[:1], z])))
    out.append(Case("zero row [g1, g2, g3, 0] x1e4", 1e4 * np.vstack([g, z])))
    # One task.
    for d, scale in ((1, 1.0), (10, 1.0), (100, 1e-4), (100, 1e4), (1000, 1.0)):
        out.append(Case(f"one task 1x{d} x{scale:g}", scale * rng.normal(size=(1, d))))
    return out


# ----------------------------------------------------------------- certificates


def _unit_rows(j):
    norms = np.linalg.norm(j, axis=1)
    return j[norms > 0] / norms[norms > 0, None]


def stationary(j: np.ndarray) -> bool:
    """Whether 0 is in the convex hull of the rows (a zero row counts), certified by a
    simplex point ``v`` with ``|v^T J_unit|^2 < 1e-20`` from ``scipy.optimize.nnls``."""
    if np.any(np.linalg.norm(j, axis=1) == 0):
        return True
    u = _unit_rows(j)
    a = np.vstack([u.T, np.ones((1, len(u)))])
    b = np.zeros(len(a))
    b[-1] = 1.0
    v, _ = scipy.optimize.nnls(a, b, maxiter=50 * len(u))
    v = v / v.sum()
    return float(np.sum((v @ u) ** 2)) < 1e-20


def cert_closed(reference: Callable) -> Callable:
    def cert(j, d, ctx):
        ref = reference(j, ctx)
        scale = max(np.linalg.norm(ref), np.finfo(float).tiny)
        return (
            float(np.linalg.norm(d - ref) / scale)
            if np.linalg.norm(ref) > 0
            else float(np.linalg.norm(d))
        )

    return cert


def pcgrad_replay(j: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, float]:
    """PCGrad (Yu et al. 2020) in NumPy on the Jacobian, with given visiting orders,
    and the smallest |cos| of a conflict test it made (0 when rounding decided one: a
    cosine below 1e-10, or a projected gradient below 1e-8 of its original norm)."""
    out, closest = np.zeros(j.shape[1]), np.inf
    for i in range(len(j)):
        g = j[i].copy()
        for k in orders[i]:
            if k != i and j[k] @ j[k] > 0 and np.any(g):
                cos = (g @ j[k]) / (np.linalg.norm(g) * np.linalg.norm(j[k]))
                # a test on a residual of rounding size (collinear rows) counts as |cos| = 0
                size = np.linalg.norm(g) / np.linalg.norm(j[i])
                closest = min(closest, abs(cos) if size > 1e-8 else 0.0)
                if cos < 0:
                    g = g - (g @ j[k]) / (j[k] @ j[k]) * j[k]
        out += g
    return out, closest


def cert_pcgrad(j, d, ctx):
    """The distance to the NumPy replay; nan (undecided) when a conflict test of the
    replay was decided by rounding (|cos| < 1e-10: collinear rows)."""
    ref, closest = pcgrad_replay(j, ctx["orders"])
    if closest < 1e-10:
        return float("nan")
    nref = np.linalg.norm(ref)
    return float(np.linalg.norm(d - ref) / nref) if nref > 0 else float(np.linalg.norm(d))


def cert_mgda(j, d, ctx):
    """The Frank-Wolfe gap over max |g_i|^2 (0 only at the min-norm point)."""
    scale = np.max(np.sum(j**2, axis=1))
    if scale == 0:
        return float(np.linalg.norm(d))
    return float(max(d @ d - np.min(j @ d), 0.0) / scale)


def ref_upgrad(j: np.ndarray) -> tuple[np.ndarray, float]:
    """UPGrad's update by ``scipy.optimize.nnls`` on the Jacobian, and the largest KKT
    residual of its projections (in units of the unit gradients)."""
    m = len(j)
    out, kkt = np.zeros(j.shape[1]), 0.0
    for i in range(m):
        if not np.any(j[i]):
            continue
        u, _ = scipy.optimize.nnls(j.T, -j[i], maxiter=50 * m)
        p = j[i] + u @ j  # the projection of g_i onto the dual cone
        norms = np.linalg.norm(j, axis=1)
        nz = norms > 0
        r = np.minimum(u[nz] * norms[nz], (j[nz] @ p) / norms[nz]) / norms[i]
        kkt = max(kkt, float(np.max(np.abs(r))))
        out += p
    return out / m, kkt


def cert_upgrad(j, d, ctx):
    """The worst conflict max(0, -min cos(g_i, d)), or the distance to the nnls
    projections (relative, outputs below ZERO max_i |g_i| counting as 0), whichever is
    larger; where the nnls solution's KKT residual is above 1e-9 (not certified), the
    conflict alone, and nan if there is none."""
    ref = ctx["upgrad_ref"]
    nd = np.linalg.norm(d)
    norms = np.linalg.norm(j, axis=1)
    floor = ZERO * np.max(norms)
    conflict = 0.0
    if nd > floor:
        cos = (j[norms > 0] @ d) / (norms[norms > 0] * nd)
        conflict = max(0.0, -float(np.min(cos)))
    if ctx["upgrad_ref_kkt"] > 1e-9:
        return conflict if conflict > 1e-12 else float("nan")
    scale = max(np.linalg.norm(ref), floor)
    dist = float(np.linalg.norm(d - ref) / scale) if scale > 0 else float(nd)
    return max(conflict, dist)


def cagrad_dual(j: np.ndarray, w: np.ndarray, c: float) -> float:
    g0 = j.mean(0)
    return float(g0 @ (w @ j) + c * np.linalg.norm(g0) * np.linalg.norm(w @ j))


def cert_cagrad(j, d, ctx, c: float = 0.5):
    """(best dual bound - min_i <g_i, d>) / |g0|^2; inf outside the ball."""
    g0 = j.mean(0)
    g0sq = g0 @ g0
    if g0sq == 0:
        return float(np.linalg.norm(d))
    if np.linalg.norm(d - g0) > c * np.sqrt(g0sq) * (1 + 1e-9):
        return float("inf")
    bound = min(cagrad_dual(j, w, c) for w in ctx["cagrad_duals"])
    return max(float(bound - np.min(j @ d)) / g0sq, 0.0)


def cert_nash(j, d, ctx):
    """max |alpha_i (G alpha)_i - 1|; where no solution exists, |d| (0 is right)."""
    if ctx["stationary"]:
        return float(np.linalg.norm(d))
    alpha = ctx["weights"]
    if alpha is None:
        return float("nan")
    return float(np.max(np.abs(alpha * (j @ (alpha @ j)) - 1.0)))


def cert_imtl_g(j, d, ctx):
    """The spread of <d, g_i>/|g_i| over its largest magnitude (equal projections), where
    a direction with equal projections exists (1 for a zero output there); nan elsewhere
    (no such promise: the two generalisations then differ by definition)."""
    norms = np.linalg.norm(j, axis=1)
    nz = norms > 0
    if not nz.any():
        return float(np.linalg.norm(d))
    u = j[nz] / norms[nz, None]
    x = np.linalg.lstsq(u, np.ones(len(u)), rcond=None)[0]
    if np.max(np.abs(u @ x - 1.0)) > 1e-8:
        return float("nan")
    proj = u @ d
    top = np.max(np.abs(proj))
    return float(np.ptp(proj) / top) if top > 0 else 1.0


def _dual_cone_projection(j: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """The projection of ``x`` onto the dual cone ``{y : J y >= 0}`` by
    ``scipy.optimize.nnls`` (``y = x + J^T u``, ``u = argmin_{u >= 0} |J^T u + x|``), and
    the KKT residual of ``u`` relative to ``|x|``."""
    norms = np.linalg.norm(j, axis=1)
    nz = norms > 0
    if not np.any(nz) or not np.any(x):
        return x.copy(), 0.0
    u, _ = scipy.optimize.nnls(j[nz].T, -x, maxiter=50 * len(j))
    y = x + u @ j[nz]
    r = np.minimum(u * norms[nz], (j[nz] @ y) / norms[nz]) / np.linalg.norm(x)
    return y, float(np.max(np.abs(r)))


def _conflict(j: np.ndarray, d: np.ndarray) -> float:
    """max(0, -min_i cos(g_i, d)) over the nonzero rows (0 for d ~ 0)."""
    norms = np.linalg.norm(j, axis=1)
    nd = np.linalg.norm(d)
    if nd <= ZERO * np.max(norms) or not np.any(norms > 0):
        return 0.0
    cos = (j[norms > 0] @ d) / (norms[norms > 0] * nd)
    return max(0.0, -float(np.min(cos)))


def cert_dualproj(j, d, ctx):
    """The worst conflict, or the distance to the nnls projection of the mean
    (relative), whichever is larger; the conflict alone where the nnls KKT residual is
    above 1e-9 (nan if there is none)."""
    ref, kkt = _dual_cone_projection(j, j.mean(0))
    conflict = _conflict(j, d)
    if kkt > 1e-9:
        return conflict if conflict > 1e-12 else float("nan")
    top = np.max(np.linalg.norm(j, axis=1))
    if np.linalg.norm(ref) <= ZERO * top:  # the answer is 0: |d| relative to the gradients
        return max(conflict, float(np.linalg.norm(d) / top) if top > 0 else 0.0)
    return max(conflict, float(np.linalg.norm(d - ref) / np.linalg.norm(ref)))


def _aligned_mtl_ref(j, ctx):
    """Aligned-MTL (scale "min") from the SVD of J itself: the aligned gradients
    sigma_min V_r U_r^T-style balance, d = J^T B p with B = s_min U_r S_r^-1 U_r^T."""
    m = len(j)
    if not np.any(j):
        return j.mean(0)
    u, s, _ = np.linalg.svd(j, full_matrices=False)
    keep = s**2 > s[0] ** 2 * m * np.finfo(float).eps
    u, s = u[:, keep], s[keep]
    b = s.min() * (u / s) @ u.T
    return (b @ np.full(m, 1.0 / m)) @ j


def cert_config(j, d, ctx):
    """Where the unit gradients are linearly independent: the spread of the
    projections <u_i, d> over their largest magnitude (ConFIG equalises them), and the
    relative error of |d| against sum_i <g_i, d/|d|>; nan elsewhere."""
    norms = np.linalg.norm(j, axis=1)
    if np.any(norms == 0) or np.linalg.matrix_rank(j / norms[:, None]) < len(j):
        return float("nan")
    s = np.linalg.svd(j / norms[:, None], compute_uv=False)
    if s[-1] < 1e-6 * s[0]:
        return float("nan")  # nearly dependent: the pseudo-inverse's cut-off decides
    nd = np.linalg.norm(d)
    if nd == 0:
        return float("inf")
    proj = (j @ d) / norms
    spread = (proj.max() - proj.min()) / np.max(np.abs(proj))
    size = abs(nd - np.sum(j @ d) / nd) / nd
    return float(max(spread, size))


def _krum_ref(j, ctx, f: int = 1):
    """Krum (Blanchard et al. 2017): the row with the smallest sum of squared distances
    to its n - f - 2 nearest others (ties to the lower index)."""
    m = len(j)
    dist = np.sum((j[:, None, :] - j[None, :, :]) ** 2, axis=2)
    np.fill_diagonal(dist, np.inf)
    scores = np.sort(dist, axis=1)[:, : m - f - 2].sum(1)
    return j[int(np.argmin(scores))]


def _trimmed_mean_ref(j, ctx, b: int = 1):
    s = np.sort(j, axis=0)
    return s[b : len(j) - b].mean(0)


def _graddrop_ref(j, ctx):
    """GradDrop's Algorithm 1 (no leak, f the identity) with the draw ``ctx["uniform"]``."""
    mag = np.abs(j).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = 0.5 * (1 + np.where(mag > 0, j.sum(0) / np.where(mag > 0, mag, 1), 0.0))
    u = ctx["uniform"]
    mask = ((p > u) & (j > 0)) | ((p < u) & (j < 0))
    return (mask * j).sum(0)


def gradvac_replay(j: np.ndarray, orders: list, beta: float = 0.5, eps: float = 0.0):
    """GradVac (Wang et al. 2021, Algorithm 1) in NumPy on the Jacobian over the steps
    of ``orders`` (one ``[m, m]`` array of visiting orders per step, the same J each
    step); the last step's update, and the smallest |phi - target| or 1 - |phi| of a
    test made (rounding decides a test closer than 1e-10)."""
    m = len(j)
    targets = np.zeros((m, m))
    closest, out = np.inf, np.zeros(j.shape[1])
    for step_orders in orders:
        out = np.zeros(j.shape[1])
        for i in range(m):
            g = j[i].copy()
            for k in step_orders[i]:
                if k == i:
                    continue
                ni, nk = np.linalg.norm(g), np.linalg.norm(j[k])
                phi = (g @ j[k]) / (ni * nk + eps) if ni * nk + eps > 0 else 0.0
                hat = targets[i, k]
                if ni * nk > 0:  # |phi| = 1 (collinear): sqrt(1 - phi^2) is all rounding
                    closest = min(closest, abs(phi - hat), 1 - abs(phi))
                if phi < hat:
                    den = nk * np.sqrt(max(1 - hat**2, 0.0)) + eps
                    if den > 0:
                        w = ni * (hat * np.sqrt(max(1 - phi**2, 0.0)) - phi * np.sqrt(1 - hat**2))
                        g = g + w / den * j[k]
                targets[i, k] = (1 - beta) * hat + beta * phi
            out += g
    return out, closest


def cert_gradvac(j, d, ctx):
    """The distance to the NumPy replay (last step); nan (undecided) where rounding
    decides a test (|phi - target| or 1 - |phi| below 1e-10: collinear rows)."""
    ref, closest = gradvac_replay(j, ctx["orders_steps"])
    if closest < 1e-10:
        return float("nan")
    nref = np.linalg.norm(ref)
    return float(np.linalg.norm(d - ref) / nref) if nref > 0 else float(np.linalg.norm(d))


def excess_mtl_replay(j: np.ndarray, steps: int, eta: float = 1.0) -> np.ndarray:
    """ExcessMTL (He et al. 2024, Eqs. 6-9; no warmup) in float64 NumPy, the same J
    each step; the last step's update."""
    m = len(j)
    alpha, total, initial = np.full(m, 1.0 / m), np.zeros_like(j), None
    for _ in range(steps):
        total = total + j**2
        risks = (j**2 / np.sqrt(total + 1e-7)).sum(1)
        if initial is None:
            initial, scaled = risks, risks
        else:
            scaled = risks / (initial + 1e-7)
        with np.errstate(divide="ignore"):  # a weight that underflowed to 0 stays 0
            z = np.log(alpha) + eta * scaled
        alpha = np.exp(z - z.max())
        alpha = alpha / alpha.sum()
    return alpha @ j


def cert_pcd(j, d, ctx, tau: float = 0.02, eps: float = 1e-8):
    """The distance to PCD's QP solved by ``scipy.optimize.nnls`` (the first step: scales
    1/sqrt(|g_i|^2 + eps)). The dual min_{mu >= 0} 1/2 |S^T mu + g~1|^2 - c^T mu, c_j =
    tau |g~j|^2, is an NNLS once c = S z (secondaries linearly independent; nan
    elsewhere); d~ = g~1 + S^T mu is checked feasible and rescaled to |g_1|."""
    m = len(j)
    n1 = np.linalg.norm(j[0])
    if m == 1 or n1 == 0:
        return cert_closed(lambda j, ctx: j[0] if n1 > 0 else 0 * j[0])(j, d, ctx)
    s = 1 / np.sqrt(np.sum(j**2, axis=1) + eps)
    js = j * s[:, None]
    sec = js[1:]
    if np.linalg.matrix_rank(sec) < m - 1:
        return float("nan")
    c = tau * np.sum(sec**2, axis=1)
    z = np.linalg.lstsq(sec, c, rcond=None)[0]
    mu, _ = scipy.optimize.nnls(sec.T, z - js[0], maxiter=50 * m)
    dt = js[0] + mu @ sec
    if np.min(sec @ dt - c) < -1e-9 * np.max(np.sum(sec**2, 1)):
        return float("nan")
    ref = dt * n1 / np.linalg.norm(dt)
    return float(np.linalg.norm(d - ref) / n1)


def cert_fairgrad(j, d, ctx, alpha: float = 2.0):
    """max_i |w_i^(1/alpha) (G w)_i - 1|; where no solution exists, |d| (0 is right)."""
    if ctx["stationary"]:
        return float(np.linalg.norm(d))
    w = ctx["weights"]
    if w is None:
        return float("nan")
    w = np.asarray(w, np.float64)
    if np.any(w <= 0):
        return float("inf")
    return float(np.max(np.abs(w ** (1 / alpha) * (j @ (w @ j)) - 1.0)))


# ----------------------------------------------------------------- the methods


@dataclasses.dataclass
class Method:
    """One aggregator both libraries have.

    ``jaxreg``: the name in ``jaxreg.aggregators`` (skipped when absent) and its
    options; ``torchjd(m)``: a fresh TorchJD aggregator for ``m`` rows; ``tuned(m)``:
    a TorchJD configuration that removes the main cause of a difference (optional);
    ``certificate(j, d, ctx) -> float`` (0 is right); ``noise``: ``"normal"`` or
    ``"orders"`` (PCGrad's), ``"orders_others"`` (GradVac's: a permutation of the other
    rows) or ``"uniform"`` (GradDrop's) when TorchJD's random draws must be jaxreg's;
    ``applies(j)``: which Jacobians the method takes; ``why``: the cause of the
    differences, as measured; ``steps``: how many updates a stateful method makes on
    the same Jacobian (the last is compared); ``weights_fn``: jaxreg's weight function
    and options, whose weights the certificate reads (``ctx["weights"]``).
    """

    name: str
    jaxreg: str
    torchjd: Callable[[int], Any]
    options: dict = dataclasses.field(default_factory=dict)
    certificate: Callable | None = None
    tuned: Callable[[int], Any] | None = None
    tuned_label: str = ""
    noise: str | None = None
    applies: Callable[[np.ndarray], bool] = lambda j: True
    why: str = ""
    steps: int = 1
    weights_fn: tuple[str, dict] | None = None


def _tj():
    from torchjd import aggregation as tja
    from torchjd._linalg import QuadprogProjector

    return tja, QuadprogProjector


def _mean_ref(j, ctx):
    return j.mean(0)


def _sum_ref(j, ctx):
    return j.sum(0)


def _random_ref(j, ctx):
    z = ctx["normal"]
    w = np.exp(z - z.max())
    return (w / w.sum()) @ j


METHODS: list[Method] = [
    Method("sum", "weighted_sum", lambda m: _tj()[0].Sum(), certificate=cert_closed(_sum_ref)),
    Method(
        "mean",
        "weighted_sum",
        lambda m: _tj()[0].Mean(),
        options={"weights": "mean"},
        certificate=cert_closed(_mean_ref),
    ),
    Method(
        "Random (RLW)",
        "random",
        lambda m: _tj()[0].Random(),
        certificate=cert_closed(_random_ref),
        noise="normal",
    ),
    Method(
        "PCGrad",
        "pcgrad",
        lambda m: _tj()[0].PCGrad(),
        certificate=cert_pcgrad,
        why="PCGrad's conflict tests on collinear rows (rank 1) compare inner products of "
        "about 1e-16 with 0: rounding decides them in both libraries, and no answer is right",
        noise="orders",
    ),
    Method(
        "IMTL-G",
        "imtl_g",
        lambda m: _tj()[0].IMTLG(),
        certificate=cert_imtl_g,
        why="TorchJD takes the pseudo-inverse of the unscaled G, jaxreg of the unit-diagonal "
        "D^-1 G D^-1: at row norms 1e-4..1e4 (cond(G) ~1e16) TorchJD loses the equal "
        "projections (spread ~1), and its |sum v| < 1e-12 test zeroes outputs at scale 1e15; "
        "on rank-deficient inputs the two generalisations differ by definition (least "
        "squares on the unit gradients vs weighted by |g_i|^2)",
    ),
    Method(
        "MGDA",
        "mgda",
        lambda m: _tj()[0].MGDA(),
        certificate=cert_mgda,
        tuned=lambda m: _tj()[0].MGDA(epsilon=1e-12, max_iters=1000),
        tuned_label="epsilon=1e-12, max_iters=1000",
        why="TorchJD's Frank-Wolfe stops when its step is below epsilon=1e-3 (100 "
        "iterations at most) and converges sublinearly (1000 iterations still leave a gap); "
        "jaxreg's active-set solve is exact; where the minimum is 0 (stationary inputs) "
        "both are 0 to rounding",
    ),
    Method(
        "UPGrad",
        "upgrad",
        lambda m: _tj()[0].UPGrad(),
        certificate=cert_upgrad,
        tuned=lambda m: _tj()[0].UPGrad(projector=_tj()[1](norm_eps=0.0, reg_eps=1e-12)),
        tuned_label="reg_eps=1e-12, norm_eps=0",
        why="TorchJD adds reg_eps=1e-4 to the diagonal of G/tr(G) (a ridge: a relative "
        "change of 1e-4 m on the Gramian), so its projections conflict with the tasks",
    ),
    Method(
        "CAGrad",
        "cagrad",
        lambda m: _tj()[0].CAGrad(c=0.5),
        options={"c": 0.5, "rescale": 0},
        certificate=cert_cagrad,
        tuned=lambda m: _tj()[0].CAGrad(c=0.5, norm_eps=0.0),
        tuned_label="norm_eps=0",
        why="TorchJD zeroes the Gramian when tr(G) < norm_eps=1e-4 and returns 0 when "
        "|g_w| < 1e-4 (a weakly stationary input, whose optimum is the projection of "
        "g_0); CLARABEL's tolerance elsewhere",
    ),
    Method(
        "Nash-MTL",
        "nash_mtl",
        lambda m: _tj()[0].NashMTL(n_tasks=m, max_norm=0.0),
        certificate=cert_nash,
        applies=lambda j: len(j) >= 2,
        why="TorchJD runs up to 20 sequential convex programs (ECOS) from alpha = 1, "
        "stops at |G a - 1/a| < 1e-3 on G/|G|_F, and its result changes with the scale of "
        "J (residual 2e-3 at x1e3, 1e2 at x1e10 on the same matrices); it returns a finite "
        "alpha where no solution exists and fails on zero matrices",
    ),
    Method(
        "AlignedMTL",
        "aligned_mtl",
        lambda m: _tj()[0].AlignedMTL(),
        certificate=cert_closed(_aligned_mtl_ref),
    ),
    Method("ConFIG", "config", lambda m: _tj()[0].ConFIG(), certificate=cert_config),
    Method(
        "DualProj",
        "dualproj",
        lambda m: _tj()[0].DualProj(),
        certificate=cert_dualproj,
        tuned=lambda m: _tj()[0].DualProj(projector=_tj()[1](norm_eps=0.0, reg_eps=1e-12)),
        tuned_label="reg_eps=1e-12, norm_eps=0",
        why="as UPGrad: TorchJD's reg_eps=1e-4 ridge on G/tr(G) leaves outputs 2e-4..5e-2 "
        "off on ordinary inputs, vectors that conflict with a task where the projection is 0 "
        "(strongly stationary, rank-1 inputs), and 11-22x off at cos -0.999 with norm "
        "ratios 1e2..1e4; without it TorchJD agrees to 6e-10 on ordinary inputs, but not "
        "where G is singular (quadprog), at norm ratios 1e2..1e4 or row norms 1e-4..1e4",
    ),
    Method(
        "GradDrop",
        "graddrop",
        lambda m: _tj()[0].GradDrop(),
        certificate=cert_closed(_graddrop_ref),
        noise="uniform",
    ),
    Method(
        "GradVac (3 steps)",
        "gradvac",
        lambda m: _tj()[0].GradVac(),
        options={"n_tasks": "m"},
        certificate=cert_gradvac,
        why="TorchJD adds eps=1e-8 to the denominators: at row norms near 1e-10 (and 1e-4) "
        "it changes the result (by up to 0.9); with eps=0 it agrees to 3e-14 there; the "
        "rest are rank-1 inputs (|cos| = 1), where rounding decides every test",
        tuned=lambda m: _tj()[0].GradVac(eps=0.0),
        tuned_label="eps=0",
        noise="orders_others",
        steps=3,
    ),
    Method(
        "Krum",
        "krum",
        lambda m: _tj()[0].Krum(n_byzantine=1),
        options={"n_byzantine": 1},
        certificate=cert_closed(_krum_ref),
        why="TorchJD 0.18 sums plain distances, the paper (and jaxreg) squared ones: they "
        "pick different gradients on rank-1 inputs and at row norms 1e-4..1e4",
        applies=lambda j: len(j) >= 4,
    ),
    Method(
        "TrimmedMean",
        "trimmed_mean",
        lambda m: _tj()[0].TrimmedMean(trim_number=1),
        options={"trim_number": 1},
        certificate=cert_closed(_trimmed_mean_ref),
        applies=lambda j: len(j) >= 3,
    ),
    Method(
        "ExcessMTL (3 steps)",
        "excess_mtl",
        lambda m: _tj()[0].ExcessMTL(),
        options={"num_tasks": "m"},
        certificate=cert_closed(lambda j, ctx: excess_mtl_replay(j, 3)),
        why="jaxreg keeps ExcessMTL's state (weights, squared-gradient sums, baseline) in "
        "float32: up to 2.6e-6 off the float64 replay, which TorchJD matches to 5e-15",
        steps=3,
    ),
    Method(
        "FairGrad (alpha=2)",
        "fairgrad",
        lambda m: _tj()[0].FairGrad(alpha=2.0),
        options={"alpha": 2.0},
        certificate=cert_fairgrad,
        weights_fn=("fairgrad_weights", {"alpha": 2.0}),
        why="TorchJD runs scipy's least_squares from the uniform weights: where no solution "
        "exists (0 in the convex hull) it returns finite weights, at scale 1e-10 its start "
        "(residual 1), elsewhere residuals up to 28 at row norms 1e-4..1e4; jaxreg's Newton "
        "solve is <= 3.9e-11",
    ),
    Method(
        "PCD",
        "pcd",
        lambda m: _tj()[0].PCD(),
        options={"num_tasks": "m"},
        certificate=cert_pcd,
        why="one input (4x3 rank 2 at scale 1e-10: dependent secondaries, not certified) "
        "where jaxreg's output changes by 1.5 with the rounding of the Gramian (padded with "
        "zero columns, as batched here; unpadded it equals TorchJD's): a borderline "
        "feasibility decision",
    ),
]


# ----------------------------------------------------------------- running jaxreg


def _jaxreg_aggregator(method: Method, m: int):
    options = dict(method.options)
    if options.get("weights") == "mean":
        options["weights"] = [1.0 / m] * m
    for k, v in options.items():
        if v == "m":  # the number of rows (n_tasks, num_tasks)
            options[k] = m
    return getattr(jr.aggregators, method.jaxreg)(**options)


def run_jaxreg(method: Method, js: list[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
    """The aggregator's updates (``[steps, n]``, each step on the same Jacobian) and the
    last state's residual on each Jacobian, float64: one jit per number of rows,
    ``lax.map`` over the Jacobians padded with zero columns (which change neither the
    Gramian nor the other columns of the update). GradDrop draws one uniform number per
    column, so it is jitted per shape, unpadded."""
    out: list[Any] = [None] * len(js)
    res: list[Any] = [None] * len(js)
    groups: dict = {}
    for k, j in enumerate(js):
        key = j.shape if method.noise == "uniform" else j.shape[0]
        groups.setdefault(key, []).append(k)
    for ks in groups.values():
        m = js[ks[0]].shape[0]
        agg = _jaxreg_aggregator(method, m)
        width = max(js[k].shape[1] for k in ks)
        padded = [np.pad(js[k], ((0, 0), (0, width - js[k].shape[1]))) for k in ks]
        batch = jnp.asarray(np.stack(padded), jnp.float64)
        state = agg.init({"p": batch[0, 0]})

        def one(j, agg=agg, state=state):
            def step(state, _):
                update, new = agg.update({"p": j}, state)
                return new, update["p"]

            last, updates = jax.lax.scan(step, state, None, length=method.steps)
            return updates, getattr(last, "residual", jnp.full((), jnp.nan, jnp.float32))

        upd, r = jax.jit(lambda b, one=one: jax.lax.map(one, b))(batch)
        for row, k in enumerate(ks):
            n = js[k].shape[1]
            out[k], res[k] = np.asarray(upd[row, :, :n], np.float64), float(r[row])
    return out, res


def jaxreg_noise(m: int, n: int, steps: int = 1, seed: int = 0) -> dict:
    """The draws of jaxreg's updates, step by step (each update splits the state's key
    and hands the second half over): the Gaussian vector (``random``), the visiting
    orders (``pcgrad``, ``gradvac``) and GradDrop's uniform draw for one ``n``-column
    leaf, each a list over the steps."""
    key = jax.random.key(seed)
    draws: dict = {"normal": [], "orders": [], "uniform": []}
    for _ in range(steps):
        key, sub = jax.random.split(key)
        draws["normal"].append(np.asarray(jax.random.normal(sub, (m,), jnp.float64)))
        keys = jax.random.split(sub, m)
        draws["orders"].append(np.asarray(jax.vmap(lambda k: jax.random.permutation(k, m))(keys)))
        u = jax.random.uniform(jax.random.fold_in(sub, 0), (n,), jnp.float64)
        draws["uniform"].append(np.asarray(u))
    return draws


# ----------------------------------------------------------------- running TorchJD


def _torch_noise(kind: str | None, draws: dict) -> dict:
    """jaxreg's draws in the form TorchJD asks for them: ``randn``, ``randperm`` (rows
    in call order) and ``rand`` replacements, over all the steps."""
    if kind == "normal":
        return {"randn": list(draws["normal"])}
    if kind == "orders":
        return {"randperm": [row for step in draws["orders"] for row in step]}
    if kind == "orders_others":  # GradVac: a permutation of the indices into the others
        rows = []
        for step in draws["orders"]:
            for i, order in enumerate(step):
                rows.append(np.array([k if k < i else k - 1 for k in order if k != i]))
        return {"randperm": rows}
    if kind == "uniform":
        return {"rand": list(draws["uniform"])}
    return {}


@contextlib.contextmanager
def _torch_draws(noise: dict):
    """Replaces ``torch.randn`` / ``torch.randperm`` / ``torch.rand`` by jaxreg's draws."""
    import torch

    saved = {name: getattr(torch, name) for name in noise}
    for name, values in noise.items():
        it = iter(values)
        setattr(
            torch,
            name,
            lambda *a, it=it, **k: torch.as_tensor(next(it), dtype=k.get("dtype")),
        )
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(torch, name, f)


def run_torchjd(
    make, j: np.ndarray, noise: dict | None = None, steps: int = 1
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """TorchJD's updates (``[steps, n]``, one instance called ``steps`` times on the
    same Jacobian; ``weights @ J`` where it is a weighted aggregator), its last
    weights, and an error message ('' when it ran)."""
    import torch
    from torchjd.aggregation import WeightedAggregator as weighted

    jt = torch.as_tensor(j, dtype=torch.float64)
    try:
        agg = make(len(j))
        outs, w = [], None
        with _torch_draws(noise or {}), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(steps):
                if isinstance(agg, weighted):  # ConFIG has a .weighting but is not weighted
                    w = agg.weighting(jt).detach().numpy().astype(np.float64)
                    outs.append(w @ j)
                else:
                    outs.append(agg(jt).detach().numpy().astype(np.float64))
        return np.stack(outs), w, ""
    except Exception as e:
        return None, None, f"{type(e).__name__}: {str(e)[:60]}"


# ----------------------------------------------------------------- comparing


def _rel(a, b, j) -> float:
    """|a - b| / max(|a|, |b|, ZERO max_i |g_i|): two outputs that are both zero to
    rounding (a Pareto-stationary input) count as equal."""
    if a is None or b is None:
        return float("nan")
    floor = ZERO * np.max(np.linalg.norm(j, axis=1))
    scale = max(np.linalg.norm(a), np.linalg.norm(b), floor)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


_JITTED: dict = {}


def _jitted(name: str, **options):
    """``jr.aggregators.<name>`` with ``options``, jitted once (compiled per shape)."""
    key = (name, tuple(sorted(options.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(functools.partial(getattr(jr.aggregators, name), **options))
    return _JITTED[key]


def _rel_steps(a, b, j) -> float:
    """The largest ``_rel`` over the steps (``[steps, n]`` updates)."""
    if a is None or b is None:
        return float("nan")
    return max(_rel(x, y, j) for x, y in zip(a, b, strict=True))


def compare(method: Method, all_cases: list[Case], pre: dict) -> dict:
    """One method on every case it applies to: per-case differences and verdicts
    (certificates on the last step)."""
    chosen = [c for c in all_cases if method.applies(c.j)]
    d_jr, res_jr = run_jaxreg(method, [c.j for c in chosen])
    rows = []
    for c, dj, rj in zip(chosen, d_jr, res_jr, strict=True):
        m, n = c.j.shape
        draws = jaxreg_noise(m, n, method.steps)
        noise = _torch_noise(method.noise, draws)
        dt, wt, err = run_torchjd(method.torchjd, c.j, noise, method.steps)
        tuned = (
            run_torchjd(method.tuned, c.j, _torch_noise(method.noise, draws), method.steps)
            if method.tuned
            else (None, None, "")
        )
        ctx = dict(
            pre[c.name],
            normal=draws["normal"][-1],
            orders=draws["orders"][-1],
            orders_steps=draws["orders"],
            uniform=draws["uniform"][-1],
        )
        row = {
            "case": c.name,
            "diff": _rel_steps(dj, dt, c.j),
            "tuned_diff": _rel_steps(dj, tuned[0], c.j),
            "error": err,
            "jr_residual": rj,
        }
        if method.certificate is not None:
            weights_jr = None  # jaxreg's weights, for Nash-MTL's and FairGrad's certificates
            if method.jaxreg == "nash_mtl":
                weights_jr = np.asarray(_jitted("nash_mtl_weights")(jnp.asarray(c.j @ c.j.T)))
            if method.weights_fn is not None:
                fn, options = method.weights_fn
                weights_jr = np.asarray(_jitted(fn, **options)(jnp.asarray(c.j @ c.j.T)))
            if method.jaxreg == "cagrad":
                coef_jr = np.asarray(
                    _jitted("cagrad_weights", c=0.5, rescale=0)(jnp.asarray(c.j @ c.j.T))
                )
                ctx["cagrad_duals"] = _cagrad_duals(c.j, coef_jr, wt, tuned[1])
            row["cert_jr"] = method.certificate(c.j, dj[-1], dict(ctx, weights=weights_jr))
            row["cert_tj"] = (
                method.certificate(c.j, dt[-1], dict(ctx, weights=wt))
                if dt is not None
                else float("nan")
            )
            if tuned[0] is not None:
                row["cert_tuned"] = method.certificate(
                    c.j, tuned[0][-1], dict(ctx, weights=tuned[1])
                )
        rows.append(row)
    return {"method": method, "rows": rows}


def _cagrad_duals(j, *coefs) -> list[np.ndarray]:
    """Simplex points for CAGrad's dual bound (any one gives a valid bound): from each
    library's weights ``coef = 1/m + w/s`` (or ``1/m + u``), ``coef - 1/m`` normalised;
    the mean; the vertices; the min-norm point of the rows."""
    m = len(j)
    points = [np.full(m, 1.0 / m), *np.eye(m)]
    for coef in coefs:
        if coef is None:
            continue
        w = np.maximum(np.asarray(coef, np.float64) - 1.0 / m, 0.0)
        if w.sum() > 0:
            points.append(w / w.sum())
    a = np.vstack([j.T / max(np.max(np.abs(j)), np.finfo(float).tiny), np.ones((1, m))])
    b = np.zeros(len(a))
    b[-1] = 1.0
    v, _ = scipy.optimize.nnls(a, b, maxiter=50 * m)
    if v.sum() > 0:
        points.append(v / v.sum())
    return points


def _fmt(x: float) -> str:
    if x != x:
        return "-"
    if x == float("inf"):
        return "inf"
    return "0" if x == 0 else f"{x:.1e}"


def verdict(cj: float, ct: float) -> str:
    """Which output the certificate favours ('tie' within 10% or 1e-9)."""
    if not (cj == cj and ct == ct):
        return "undecided"
    if abs(cj - ct) <= 1e-9 + 0.1 * min(cj, ct):
        return "tie"
    return "jaxreg" if cj < ct else "TorchJD"


def summarise(result: dict) -> list[str]:
    method, rows = result["method"], result["rows"]
    diffs = np.array([r["diff"] for r in rows])
    ok = diffs[np.isfinite(diffs)]
    worst = rows[int(np.nanargmax(diffs))] if np.any(np.isfinite(diffs)) else None
    differ = [r for r in rows if r["diff"] > DIFFER]
    errors = [r for r in rows if r["error"]]
    votes = {"jaxreg": 0, "TorchJD": 0, "tie": 0, "undecided": 0}
    for r in differ:
        votes[verdict(r.get("cert_jr", float("nan")), r.get("cert_tj", float("nan")))] += 1
    cert_jr = [r["cert_jr"] for r in rows if "cert_jr" in r and np.isfinite(r["cert_jr"])]
    cert_tj = [
        r["cert_tj"] for r in rows if "cert_tj" in r and np.isfinite(r.get("cert_tj", np.nan))
    ]
    inf_tj = sum(1 for r in rows if r.get("cert_tj") == float("inf"))
    tuned = np.array([r["tuned_diff"] for r in rows])
    tuned_s = (
        f"{_fmt(np.nanmax(tuned))} ({method.tuned_label})"
        if method.tuned and np.any(np.isfinite(tuned))
        else "-"
    )
    right = ", ".join(f"{k} {v}" for k, v in votes.items() if v) or "-"
    return [
        method.name,
        f"{len(rows)}" + (f" ({len(errors)} TorchJD errors)" if errors else ""),
        f"{_fmt(ok.max()) if len(ok) else '-'}"
        + (f" ({worst['case']})" if worst and worst["diff"] > DIFFER else ""),
        f"{len(differ)}",
        right,
        f"{_fmt(max(cert_jr)) if cert_jr else '-'} / {_fmt(max(cert_tj)) if cert_tj else '-'}"
        + (f" (+{inf_tj} inf)" if inf_tj else ""),
        tuned_s,
    ]


# ----------------------------------------------------------------- the weightings


def _simplex(y: np.ndarray) -> np.ndarray:
    """The Euclidean projection onto the simplex (Held et al. 1974: sort, threshold)."""
    if not np.all(np.isfinite(y)):
        return np.full_like(y, np.nan)
    y = y - np.max(y)  # the projection is invariant to a shift along (1, ..., 1)
    u = np.sort(y)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.nonzero(u - css / np.arange(1, len(y) + 1) > 0)[0][-1]  # k = 0 qualifies
    return np.maximum(y - css[k] / (k + 1), 0.0)


def modo_replay(gs: list[np.ndarray], gamma: float = 0.1, rho: float = 0.1) -> np.ndarray:
    """MoDo (Chen et al. 2024, Eq. 2.9a) over the matrices ``gs``: the last weights."""
    lam = np.full(len(gs[0]), 1.0 / len(gs[0]))
    for a in gs:
        lam = _simplex(lam - gamma * (a @ lam + rho * lam))
    return lam


def sdmgrad_replay(gs: list[np.ndarray], lr=10.0, momentum=0.5, iters=20, lam=0.3) -> np.ndarray:
    """SDMGrad (Xiao et al. 2023; the official code's projected SGD with momentum on
    A / (mean sqrt(diag A))^2) over the matrices ``gs``: the last weights."""
    m = len(gs[0])
    w, wt = np.full(m, 1.0 / m), np.full(m, 1.0 / m)
    for a in gs:
        a = a / (np.mean(np.sqrt(np.maximum(np.diag(a), 0.0))) ** 2 + 1e-8)
        v = None
        for _ in range(iters):
            grad = a @ (w + lam * wt)
            v = grad if v is None else momentum * v + grad
            w = _simplex(w - lr * v)
    return (w + lam * wt) / (1 + lam)


def cr_mogm_modo_replay(gs: list[np.ndarray], alpha: float = 0.9) -> np.ndarray:
    """CR-MOGM (Zhou et al. 2022): lambda_k = alpha lambda_(k-1) + (1 - alpha) hat_k,
    lambda_0 = hat_1, around MoDo's weights hat_k (a weighting both libraries agree on,
    so the table measures the moving average)."""
    lam = None
    for k in range(1, len(gs) + 1):
        hat = modo_replay(gs[:k])
        lam = hat if lam is None else alpha * lam + (1 - alpha) * hat
    return lam


@dataclasses.dataclass
class WeightingMethod:
    """One weighting both libraries have (``jr.weighting.<name>``, on the Gramian)."""

    name: str
    jaxreg: Callable[[], Any]
    torchjd: Callable[[], Any]
    replay: Callable[[list[np.ndarray]], np.ndarray] | None = None
    why: str = ""


def _tjw():
    from torchjd import aggregation as tja

    return tja


WEIGHTINGS: list[WeightingMethod] = [
    WeightingMethod(
        "MoDo",
        lambda: jr.weighting.modo(),
        lambda: _tjw().MoDoWeighting(),
        replay=modo_replay,
        why="TorchJD's simplex projection rounds u_1 - (u_1 - 1) to 0 at entries near 1e16 "
        "(gradient scale 1e10 and above) and returns zero weights; jaxreg shifts by the "
        "maximum first",
    ),
    WeightingMethod(
        "SDMGrad",
        lambda: jr.weighting.sdmgrad(),
        lambda: _tjw().SDMGradWeighting(),
        replay=sdmgrad_replay,
    ),
    WeightingMethod(
        "CR-MOGM (MoDo, alpha=0.9)",
        lambda: jr.weighting.cr_mogm(jr.weighting.modo(), alpha=0.9),
        lambda: _tjw().CRMOGMWeighting(_tjw().MoDoWeighting(), alpha=0.9),
        replay=cr_mogm_modo_replay,
    ),
]

WEIGHTING_STEPS = 3


def weighting_matrices(j: np.ndarray) -> list[np.ndarray]:
    """The Gramians the stateful weightings see, one per step: ``J`` with its rows
    rescaled by ``1 + s k / m`` at step ``s`` (so the weights move between steps)."""
    m = len(j)
    out = []
    for s in range(WEIGHTING_STEPS):
        js = j * (1.0 + s * np.arange(m) / m)[:, None]
        out.append(js @ js.T)
    return out


def compare_weighting(method: WeightingMethod, all_cases: list[Case]) -> list[str]:
    """The largest |w_jaxreg - w_TorchJD|_1 of the last step's weights over the cases,
    and the largest distance of each library's weights to the float64 NumPy replay."""
    import torch

    diffs, cert_jr, cert_tj = [], [], []
    worst = ("", 0.0)
    fns: dict = {}
    for c in all_cases:
        gs = weighting_matrices(c.j)
        m = len(c.j)
        if m not in fns:
            wm = method.jaxreg()

            def run(stack, wm=wm, m=m):
                def step(state, g):
                    w, state = wm.update(g, state)
                    return state, w

                return jax.lax.scan(step, wm.init(m), stack)[1][-1]

            fns[m] = jax.jit(run)
        w_jr = np.asarray(fns[m](jnp.asarray(np.stack(gs))), np.float64)
        tw = method.torchjd()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for gram in gs:
                w_tj = tw(torch.as_tensor(gram, dtype=torch.float64)).numpy().astype(np.float64)
        diff = float(np.abs(w_jr - w_tj).sum())
        diffs.append(diff)
        if diff > worst[1]:
            worst = (c.name, diff)
        if method.replay is not None:
            ref = method.replay(gs)
            cert_jr.append(float(np.abs(w_jr - ref).sum()))
            cert_tj.append(float(np.abs(w_tj - ref).sum()))
    differ = sum(d > DIFFER for d in diffs)
    return [
        method.name,
        f"{len(diffs)}",
        _fmt(max(diffs)) + (f" ({worst[0]})" if worst[1] > DIFFER else ""),
        f"{differ}",
        f"{_fmt(np.nanmax(cert_jr))} / {_fmt(np.nanmax(cert_tj))}"
        + (f" ({sum(np.isnan(cert_jr))} replays not finite)" if np.any(np.isnan(cert_jr)) else "")
        if cert_jr
        else "-",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="names from METHODS (default: all)")
    parser.add_argument("--details", action="store_true", help="print every differing case")
    args = parser.parse_args(argv)
    import importlib.metadata

    import torch

    torch.manual_seed(0)
    all_cases = cases()
    start = time.perf_counter()
    pre = {}
    for c in all_cases:
        ref, kkt = ref_upgrad(c.j)
        pre[c.name] = {"upgrad_ref": ref, "upgrad_ref_kkt": kkt, "stationary": stationary(c.j)}
    ref_kkt = max(p["upgrad_ref_kkt"] for p in pre.values())
    certified = sum(p["upgrad_ref_kkt"] <= 1e-9 for p in pre.values())
    version = importlib.metadata.version("torchjd")
    print(
        f"{len(all_cases)} Jacobians, float64; torchjd {version}, jax {jax.__version__}; "
        f"{sum(p['stationary'] for p in pre.values())} weakly stationary; UPGrad reference "
        f"(scipy nnls) certified by KKT residual <= 1e-9 on {certified}/{len(all_cases)} "
        f"(worst {ref_kkt:.1e})"
    )
    selected = [m for m in METHODS if not args.methods or m.name in args.methods]
    results, skipped = [], []
    with jax.enable_x64(True):
        for method in selected:
            if not hasattr(jr.aggregators, method.jaxreg):
                skipped.append(method.name)
                continue
            t = time.perf_counter()
            try:
                results.append(compare(method, all_cases, pre))
            except TypeError as e:  # a jaxreg signature this table does not know yet
                skipped.append(f"{method.name} ({e})")
                continue
            print(f"  {method.name}: {time.perf_counter() - t:.1f} s")
    header = [
        "method",
        "cases",
        "max rel. diff (case)",
        f"differ > {DIFFER:g}",
        "right by certificate",
        "worst certificate jaxreg / TorchJD",
        "max rel. diff, TorchJD tuned",
    ]
    if results:
        print()
        print(table([summarise(r) for r in results], header))
        print()
    for r in results:
        if r["method"].why:
            print(f"* {r['method'].name}: {r['method'].why}.")
    if skipped:
        print(f"\nnot in jaxreg yet (skipped): {', '.join(skipped)}")
    wselected = [w for w in WEIGHTINGS if not args.methods or w.name in args.methods]
    if wselected:
        with jax.enable_x64(True):
            wrows = []
            for w in wselected:
                t = time.perf_counter()
                wrows.append(compare_weighting(w, all_cases))
                print(f"  {w.name}: {time.perf_counter() - t:.1f} s")
        print(
            f"\nWeightings on the Gramians, {WEIGHTING_STEPS} steps (rows rescaled by "
            "1 + s k/m at step s), the last step's weights:"
        )
        print(
            table(
                wrows,
                [
                    "weighting",
                    "cases",
                    "max L1(w_jaxreg - w_TorchJD) (case)",
                    f"differ > {DIFFER:g}",
                    "max L1(w - w_replay) jaxreg / TorchJD",
                ],
            )
        )
        for w in wselected:
            if w.why:
                print(f"* {w.name}: {w.why}.")
    if args.details:
        for r in results:
            for row in r["rows"]:
                if row["diff"] > DIFFER or row["error"]:
                    cert = [_fmt(row.get(k, np.nan)) for k in ("cert_jr", "cert_tj", "cert_tuned")]
                    print(
                        f"{r['method'].name:10s} {row['case']:45s} diff {_fmt(row['diff'])} "
                        f"certificate jaxreg {cert[0]} TorchJD {cert[1]} tuned {cert[2]} "
                        f"(diff {_fmt(row['tuned_diff'])}) jaxreg residual "
                        f"{_fmt(row['jr_residual'])} {row['error']}"
                    )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
