"""The exact aggregators in float32 on TorchJD's stationary rank-deficient Jacobians.

``python -m benchmarks.float32_stationary``: for 20 x 100 Jacobians of rank 19 (TorchJD's
samplers, ``benchmarks/jd_samplers.py``; 5 seeds per kind), the float32 update's
distance to the float64 one (``err``), its change under a row permutation and under a
scaling by 1e3 (all divided by the largest gradient norm), its smallest cosine with a
gradient, and the residual reported. UPGrad is run as the aggregator (with its
correction from the gradients) and as ``upgrad_weights`` on the Gramian alone.

For UPGrad, also: ``C = err / (eps ||w||_1)``, the error in units of the rounding floor
of applying the float64 weights ``w`` in float32 (``eps ||w||_1 max|g|``,
``eps = 2^-23``); ``rnd``, the float64 answer on the float32-rounded input against the
float64 answer on the exact one (what the input's rounding alone changes: where it is
far above ``eps``, the problem is ill-posed at this input); and ``errR``, the float32
update against the float64 answer on the rounded input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.jd_samplers import sample

agg = jr.aggregators


def _weights_fn(name):
    return jax.jit(functools.partial(getattr(agg, name + "_weights"), with_residual=True))


def _methods():
    upgrad = agg.upgrad()
    step = jax.jit(lambda j: upgrad.update({"w": j}, upgrad.init(None)))

    def aggregator(j32):
        upd, state = step(j32)
        return upd["w"], state.residual

    out = {"upgrad (aggregator)": aggregator}
    for name in ("upgrad", "mgda", "cagrad", "nash_mtl"):
        fn = _weights_fn(name)

        def run(j32, fn=fn):
            w, r = fn(agg.gramian({"w": j32}))
            return agg.apply_weights(w, {"w": j32})["w"], r

        out[f"{name}_weights"] = run
    return out


def main() -> None:
    methods = _methods()
    eps = float(np.finfo(np.float32).eps)
    print(
        f"{'kind':9s} {'seed':4s} {'method':20s} {'err':>8s} {'perm':>8s} {'scale':>8s} "
        f"{'min cos':>8s} {'residual':>9s} {'C':>6s} {'rnd':>8s} {'errR':>8s}"
    )
    for kind in ("strong", "weak", "non_weak"):
        for seed in range(5):
            rng = np.random.default_rng(seed)
            j = sample(kind, 20, 100, 19, rng)
            p = rng.permutation(20)
            gmax = np.linalg.norm(j, axis=1).max()
            j32 = j.astype(np.float32).astype(np.float64)
            for name, run in methods.items():
                base = name.split("_weights")[0].split(" ")[0]
                with jax.enable_x64(True):
                    w64 = np.asarray(getattr(agg, base + "_weights")(jnp.asarray(j @ j.T)))
                    w64r = np.asarray(agg.upgrad_weights(jnp.asarray(j32 @ j32.T)))
                d64 = w64 @ j
                d, r = run(jnp.asarray(j, jnp.float32))
                d = np.asarray(d, np.float64)
                dp = np.asarray(run(jnp.asarray(j[p], jnp.float32))[0], np.float64)
                ds = np.asarray(run(jnp.asarray(1e3 * j, jnp.float32))[0], np.float64)
                nd = np.linalg.norm(d)
                cos = (j @ d) / np.linalg.norm(j, axis=1) / nd if nd > 0 else np.zeros(1)
                print(
                    f"{kind:9s} {seed:<4d} {name:20s} {np.linalg.norm(d - d64) / gmax:8.1e} "
                    f"{np.linalg.norm(dp - d) / gmax:8.1e} "
                    f"{np.linalg.norm(ds - 1e3 * d) / (1e3 * gmax):8.1e} {cos.min():8.1e} "
                    f"{float(r):9.1e}"
                    + (
                        f" {np.linalg.norm(d - d64) / (eps * np.abs(w64).sum() * gmax):6.1f}"
                        f" {np.linalg.norm(w64r @ j32 - d64) / gmax:8.1e}"
                        f" {np.linalg.norm(d - w64r @ j32) / gmax:8.1e}"
                        if base == "upgrad"
                        else ""
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
