"""Host terms run concurrently: five I/O-bound terms that each wait 100 ms.

Compares one call of an objective holding a JAX base loss (at ``[64, 8192]``) and five
host terms that each sleep 100 ms (threaded, async, and mixed) against 100 ms, and
against running the same five terms one after another. Target: at most 1.2x 100 ms.

Run: ``python -m benchmarks.host_bench``.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import table

WAIT = 0.1


def _threaded(x, batch, data):
    time.sleep(WAIT)  # stands for an HTTP call to a validator
    return float(np.mean(x))


async def _async(x, batch, data):
    await asyncio.sleep(WAIT)
    return float(np.mean(x))


def measure(objective, x, repeats=7):
    jax.block_until_ready(objective(x, None).grad)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(objective(x, None).grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    x = -jax.random.uniform(jax.random.key(0), (64, 8192))
    base = jr.Term("nll", lambda x, b: -jnp.sum(x))
    cases = {
        "5 threaded": [jr.HostTerm(f"t{i}", _threaded, 0.1) for i in range(5)],
        "5 async": [jr.HostTerm(f"a{i}", _async, 0.1) for i in range(5)],
        "3 threaded + 2 async": [jr.HostTerm(f"t{i}", _threaded, 0.1) for i in range(3)]
        + [jr.HostTerm(f"a{i}", _async, 0.1) for i in range(2)],
    }
    rows = []
    for name, terms in cases.items():
        concurrent = measure(jr.compose(base, terms, track_grad_norms=True), x)
        sequential = measure(
            _Sequential(jr.compose(base, terms[:1], track_grad_norms=True), len(terms)), x
        )
        rows.append(
            [
                name,
                f"{concurrent * 1e3:.1f}",
                f"{concurrent / WAIT:.2f}",
                f"{sequential * 1e3:.1f}",
                f"{sequential / concurrent:.1f}x",
            ]
        )
    print(
        table(
            rows,
            [
                "host terms (100 ms each) + JAX base at [64,8192]",
                "ms",
                "/ 100 ms",
                "one after another ms",
                "speed-up",
            ],
        )
    )


class _Sequential:
    """The same work run one host term at a time (what a naive loop would do)."""

    def __init__(self, objective, n):
        self.objective, self.n = objective, n

    def __call__(self, x, batch):
        out = None
        for _ in range(self.n):
            out = self.objective(x, batch)
        return out


if __name__ == "__main__":
    main()
