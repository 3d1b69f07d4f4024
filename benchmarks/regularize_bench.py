"""What the order check of ``jr.transforms.regularize`` costs in a training step.

Run: ``python -m benchmarks.regularize_bench [--quick]``. One jitted
``optax.chain(regularize([l2, l1]), adam)`` update on an MLP's parameters (8 leaves),
with ``check_order`` on and off, interleaved, next to ``add_decayed_weights + adam``
(the same L2 update written with optax alone, no L1 and no measurements).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jaxreg as jr
from benchmarks.common import table, time_interleaved


def mlp_params(width: int, depth: int = 4, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), depth)
    return {
        f"layer{i}": {
            "w": jax.random.normal(k, (width, width)) / width**0.5,
            "b": jnp.zeros((width,)),
        }
        for i, k in enumerate(keys)
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    widths = (256,) if args.quick else (256, 1024)
    terms = [
        jr.Term("l2", jr.regularizers.l2, weight=5e-4),
        jr.Term("l1", jr.regularizers.l1, weight=1e-5),
    ]
    rows = []
    for width in widths:
        params = mlp_params(width)
        grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
        n = sum(p.size for p in jax.tree.leaves(params))
        opts = {
            "check_order": jr.transforms.regularized(optax.adam(1e-3), terms),
            "no check": jr.transforms.regularized(optax.adam(1e-3), terms, check_order=False),
            "optax only": optax.chain(optax.add_decayed_weights(1e-3), optax.adam(1e-3)),
        }
        fns = {}
        for name, opt in opts.items():
            with jax.numpy_dtype_promotion("standard"):
                state = opt.init(params)
                update = jax.jit(opt.update)
                fns[name] = lambda u=update, s=state, g=grads, p=params: u(g, s, p)
        with jax.numpy_dtype_promotion("standard"):
            t = time_interleaved(fns, repeats=5 if args.quick else 15)
        rows.append(
            [
                f"{n / 1e6:.2f}M",
                f"{t['check_order'] * 1e3:.3f}",
                f"{t['no check'] * 1e3:.3f}",
                f"{t['check_order'] / t['no check']:.3f}",
                f"{t['optax only'] * 1e3:.3f}",
            ]
        )
    print(
        table(
            rows,
            ["params", "check_order ms", "no check ms", "ratio", "add_decayed_weights+adam ms"],
        )
    )


if __name__ == "__main__":
    main()
