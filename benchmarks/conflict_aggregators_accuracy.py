"""Accuracy of AlignedMTL, ConFIG, DualProj and UPGrad's ``pref_vector`` against float64
NumPy/SciPy references, and their distance to TorchJD 0.18 (when installed).

The inputs are ``conflict_refs.hard_jacobians()`` (4 x 6: random, a cos -0.999 pair,
row norms 1e-4..1e4, rank 3, a duplicated row, a zero row; and one task). The
references are written from the papers on the Jacobian itself (``conflict_refs``):
SVD for AlignedMTL, ``numpy.linalg.pinv`` for ConFIG, ``scipy.optimize.nnls`` for the
dual-cone projections. Errors are ``max |d - d*| / ||d*||`` (divided by the largest
gradient norm instead where ``d* = 0``, a zero projection). TorchJD
runs in float64 with its defaults (DualProj and UPGrad: quadprog with ``reg_eps =
norm_eps = 1e-4``). Krum, TrimmedMean, GradDrop and GradVac are exact selections or
closed forms; ``tests/test_aggregators_conflict.py`` checks them against the references
and TorchJD to 1e-10 or better.

Run: ``python -m benchmarks.conflict_aggregators_accuracy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks import conflict_refs as ref


def _methods():
    pref = np.array([0.5, -0.25, 2.0, 0.0])
    return {
        "aligned_mtl": (jr.aggregators.aligned_mtl_weights, {}, ref.aligned_mtl, "AlignedMTL"),
        "config": (jr.aggregators.config_weights, {}, ref.config, "ConFIG"),
        "dualproj": (jr.aggregators.dualproj_weights, {}, ref.dualproj, "DualProj"),
        "upgrad(pref_vector)": (
            jr.aggregators.upgrad_weights,
            {"pref_vector": pref},
            lambda j: ref.upgrad(j, pref[: len(j)] if len(j) > 1 else np.array([3.0])),
            "UPGrad",
        ),
    }


def _error(d, expected, j):
    scale = np.linalg.norm(expected)
    if scale < 1e-9 * np.linalg.norm(j, axis=1).max():  # a zero projection: absolute
        scale = np.linalg.norm(j, axis=1).max()
    return float(np.max(np.abs(d - expected)) / scale)


def _torchjd(cls_name, j, options):
    try:
        import torch
        import torchjd.aggregation as agg
    except ImportError:
        return None
    kwargs = {}
    if "pref_vector" in options:
        p = options["pref_vector"][: len(j)] if len(j) > 1 else np.array([3.0])
        kwargs["pref_vector"] = torch.tensor(p)
    return getattr(agg, cls_name)(**kwargs)(torch.tensor(j)).numpy()


def main() -> None:
    cases = ref.hard_jacobians()
    print("| method | case | float64 error | float32 error | TorchJD vs reference |")
    print("|---|---|---|---|---|")
    for name, (fn, options, reference, cls_name) in _methods().items():
        for case, j in cases.items():
            opts = dict(options)
            if "pref_vector" in opts:
                opts["pref_vector"] = opts["pref_vector"][: len(j)] if len(j) > 1 else [3.0]
            expected = reference(j)
            errors = []
            for dtype in (jnp.float64, jnp.float32):
                with jax.enable_x64(dtype == jnp.float64):
                    g = jr.aggregators.gramian(jnp.asarray(j, dtype))
                    w = np.asarray(fn(g, **opts), np.float64)
                    # AlignedMTL's rank threshold follows the dtype; so does its reference.
                    exp = expected
                    if name == "aligned_mtl" and dtype == jnp.float32:
                        exp = ref.aligned_mtl(j, eps=float(jnp.finfo(jnp.float32).eps))
                    errors.append(_error(w @ j, exp, j))
            theirs = _torchjd(cls_name, j, options)
            tj = "-" if theirs is None else f"{_error(theirs, expected, j):.1e}"
            print(f"| `{name}` | {case} | {errors[0]:.1e} | {errors[1]:.1e} | {tj} |")


if __name__ == "__main__":
    main()
