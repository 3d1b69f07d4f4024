r"""Jacobians built as TorchJD's test samplers build them, in float64 NumPy.

The four kinds of ``m x n`` matrices of rank ``r`` (TorchJD's
``tests/unit/aggregation/_matrix_samplers.py``, re-implemented on ``numpy.random``):

* ``normal``: :math:`U_{:, :r} S V^\top_{:r}`, random orthonormal ``U``, ``V``, ``S > 0``;
* ``strong`` (strongly stationary): the rows of ``U`` orthogonal to a positive ``v``,
  so :math:`v^\top A = 0` with :math:`v > 0`;
* ``weak`` (strictly weakly stationary): two disjointly supported non-negative unit
  vectors ``v, v'`` with a positive sum; ``A`` is orthogonal to ``v`` (so :math:`v^\top
  A = 0`, :math:`v \ge 0`) and has ``v'`` as a left-singular vector (so no positive
  vector is orthogonal to it);
* ``non_weak``: a positive left-singular vector, so no :math:`v \ge 0, v \ne 0` has
  :math:`v^\top A = 0`: the convex hull of the rows does not contain 0.

Used by ``benchmarks/torchjd_compare.py`` and the aggregator tests.
"""

from __future__ import annotations

import numpy as np


def _complement(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random ``[m, m - k]`` semi-orthonormal matrix orthogonal to ``q`` ``[m, k]``."""
    m, k = q.shape
    a = rng.normal(size=(m, m - k))
    a = a - q @ (q.T @ a)
    return np.linalg.qr(a)[0]


def _orthonormal(dim: int, rng: np.random.Generator) -> np.ndarray:
    return _complement(np.zeros((dim, 0)), rng)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def sample(kind: str, m: int, n: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """One ``m x n`` matrix of rank ``rank`` of the given kind (see the module docstring)."""
    vt = _orthonormal(n, rng)
    s = np.diag(np.abs(rng.normal(size=rank)))
    if kind == "normal":
        u = _orthonormal(m, rng)
        return u[:, :rank] @ s @ vt[:rank]
    if kind == "strong":
        u1 = _unit(np.abs(rng.normal(size=m)))[:, None]
        u2 = _complement(u1, rng)
        return u2[:, :rank] @ s @ vt[:rank]
    if kind == "weak":
        u = np.abs(rng.normal(size=m))
        split = int(rng.integers(1, m))
        perm = rng.permutation(m)
        v, vp = np.zeros(m), np.zeros(m)
        v[perm[:split]] = _unit(u[perm[:split]])
        vp[perm[split:]] = _unit(u[perm[split:]])
        u1 = np.stack([v, vp], axis=1)
        full = np.hstack([u1, _complement(u1, rng)])
        return full[:, 1 : rank + 1] @ s @ vt[:rank]
    if kind == "non_weak":
        u1 = _unit(np.abs(rng.normal(size=m)))[:, None]
        full = np.hstack([u1, _complement(u1, rng)])
        return full[:, :rank] @ s @ vt[:rank]
    raise ValueError(f"sample: kind must be normal, strong, weak or non_weak, found {kind!r}")


def weakly_stationary(kind: str) -> bool:
    """Whether 0 is in the convex hull of the rows of a matrix of this kind."""
    return kind in ("strong", "weak")
