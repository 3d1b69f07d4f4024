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


# ----------------------------------------------------------------- the methods


@dataclasses.dataclass
class Method:
    """One aggregator both libraries have.

    ``jaxreg``: the name in ``jaxreg.aggregators`` (skipped when absent) and its
    options; ``torchjd(m)``: a fresh TorchJD aggregator for ``m`` rows; ``tuned(m)``:
    a TorchJD configuration that removes the main cause of a difference (optional);
    ``certificate(j, d, ctx) -> float`` (0 is right); ``noise``: ``"normal"`` or
    ``"orders"`` when TorchJD's random draws must be jaxreg's; ``applies(j)``: which
    Jacobians the method takes; ``why``: the cause of the differences, as measured.
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
    # The aggregators other branches add (skipped while jaxreg lacks the name).
    Method("AlignedMTL", "aligned_mtl", lambda m: _tj()[0].AlignedMTL()),
    Method("ConFIG", "config", lambda m: _tj()[0].ConFIG()),
    Method(
        "DualProj",
        "dualproj",
        lambda m: _tj()[0].DualProj(),
        tuned=lambda m: _tj()[0].DualProj(projector=_tj()[1](norm_eps=0.0, reg_eps=1e-12)),
        tuned_label="reg_eps=1e-12, norm_eps=0",
    ),
    Method("GradDrop", "graddrop", lambda m: _tj()[0].GradDrop()),
    Method("GradVac", "gradvac", lambda m: _tj()[0].GradVac()),
    Method(
        "Krum",
        "krum",
        lambda m: _tj()[0].Krum(n_byzantine=1),
        options={"n_byzantine": 1},
        applies=lambda j: len(j) >= 4,
    ),
    Method(
        "TrimmedMean",
        "trimmed_mean",
        lambda m: _tj()[0].TrimmedMean(trim_number=1),
        options={"trim_number": 1},
        applies=lambda j: len(j) >= 3,
    ),
    Method("ExcessMTL", "excess_mtl", lambda m: _tj()[0].ExcessMTL(n_tasks=m)),
    Method("FairGrad", "fairgrad", lambda m: _tj()[0].FairGrad()),
]


# ----------------------------------------------------------------- running jaxreg


def _jaxreg_aggregator(method: Method, m: int):
    options = dict(method.options)
    if options.get("weights") == "mean":
        options["weights"] = [1.0 / m] * m
    return getattr(jr.aggregators, method.jaxreg)(**options)


def run_jaxreg(method: Method, js: list[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
    """The aggregator's update and state residual on each Jacobian, float64: one jit per
    number of rows, ``lax.map`` over the Jacobians padded with zero columns (which change
    neither the Gramian nor the other columns of the update)."""
    out: list[Any] = [None] * len(js)
    res: list[Any] = [None] * len(js)
    groups: dict = {}
    for k, j in enumerate(js):
        groups.setdefault(j.shape[0], []).append(k)
    for m, ks in groups.items():
        agg = _jaxreg_aggregator(method, m)
        width = max(js[k].shape[1] for k in ks)
        padded = [np.pad(js[k], ((0, 0), (0, width - js[k].shape[1]))) for k in ks]
        batch = jnp.asarray(np.stack(padded), jnp.float64)
        state = agg.init({"p": batch[0, 0]})

        def one(j, agg=agg, state=state):
            update, new = agg.update({"p": j}, state)
            return update["p"], getattr(new, "residual", jnp.full((), jnp.nan, jnp.float32))

        upd, r = jax.jit(lambda b, one=one: jax.lax.map(one, b))(batch)
        for row, k in enumerate(ks):
            n = js[k].shape[1]
            out[k], res[k] = np.asarray(upd[row, :n], np.float64), float(r[row])
    return out, res


def jaxreg_noise(m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian vector and the visiting orders jaxreg's first update draws
    (``from_gramian_weights`` splits the state's key and hands the second half over)."""
    _, sub = jax.random.split(jax.random.key(seed))
    normal = np.asarray(jax.random.normal(sub, (m,), jnp.float64))
    keys = jax.random.split(sub, m)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, m))(keys))
    return normal, orders


# ----------------------------------------------------------------- running TorchJD


@contextlib.contextmanager
def _torch_draws(normal: np.ndarray | None, orders: np.ndarray | None):
    """Replaces ``torch.randn`` / ``torch.randperm`` by jaxreg's draws."""
    import torch

    randn, randperm = torch.randn, torch.randperm
    rows = iter(orders) if orders is not None else None
    if normal is not None:
        torch.randn = lambda *a, **k: torch.as_tensor(normal, dtype=torch.float64)
    if rows is not None:
        torch.randperm = lambda *a, **k: torch.as_tensor(next(rows))
    try:
        yield
    finally:
        torch.randn, torch.randperm = randn, randperm


def run_torchjd(
    make, j: np.ndarray, noise=(None, None)
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """TorchJD's update (``weights @ J`` where it is a weighted aggregator), its
    weights, and an error message ('' when it ran)."""
    import torch

    jt = torch.as_tensor(j, dtype=torch.float64)
    try:
        agg = make(len(j))
        with _torch_draws(*noise), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(agg, "weighting"):
                w = agg.weighting(jt).detach().numpy().astype(np.float64)
                return w @ j, w, ""
            return agg(jt).detach().numpy().astype(np.float64), None, ""
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


def compare(method: Method, all_cases: list[Case], pre: dict) -> dict:
    """One method on every case it applies to: per-case differences and verdicts."""
    chosen = [c for c in all_cases if method.applies(c.j)]
    d_jr, res_jr = run_jaxreg(method, [c.j for c in chosen])
    rows = []
    for c, dj, rj in zip(chosen, d_jr, res_jr, strict=True):
        m = len(c.j)
        normal, orders = jaxreg_noise(m)
        noise = (
            normal if method.noise == "normal" else None,
            orders if method.noise == "orders" else None,
        )
        dt, wt, err = run_torchjd(method.torchjd, c.j, noise)
        tuned = run_torchjd(method.tuned, c.j, noise) if method.tuned else (None, None, "")
        ctx = dict(pre[c.name], normal=normal, orders=orders)
        row = {
            "case": c.name,
            "diff": _rel(dj, dt, c.j),
            "tuned_diff": _rel(dj, tuned[0], c.j),
            "error": err,
            "jr_residual": rj,
        }
        if method.certificate is not None:
            weights_jr = None  # jaxreg's alpha, for Nash-MTL's certificate
            if method.jaxreg == "nash_mtl":
                weights_jr = np.asarray(_jitted("nash_mtl_weights")(jnp.asarray(c.j @ c.j.T)))
            if method.jaxreg == "cagrad":
                coef_jr = np.asarray(
                    _jitted("cagrad_weights", c=0.5, rescale=0)(jnp.asarray(c.j @ c.j.T))
                )
                ctx["cagrad_duals"] = _cagrad_duals(c.j, coef_jr, wt, tuned[1])
            row["cert_jr"] = method.certificate(c.j, dj, dict(ctx, weights=weights_jr))
            row["cert_tj"] = (
                method.certificate(c.j, dt, dict(ctx, weights=wt))
                if dt is not None
                else float("nan")
            )
            if tuned[0] is not None:
                row["cert_tuned"] = method.certificate(c.j, tuned[0], dict(ctx, weights=tuned[1]))
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
    print()
    print(table([summarise(r) for r in results], header))
    print()
    for r in results:
        if r["method"].why:
            print(f"* {r['method'].name}: {r['method'].why}.")
    if skipped:
        print(f"\nnot in jaxreg yet (skipped): {', '.join(skipped)}")
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
