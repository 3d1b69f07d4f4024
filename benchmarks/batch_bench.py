"""Batch.from_ragged packing speed: 64 ragged sequences totalling ~500k tokens.

Run: ``python -m benchmarks.batch_bench``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import jaxreg as jr


def main() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(4096, 11_500, size=64)
    logprobs = [-rng.random(n, np.float32) for n in lengths]
    inputs = {
        "target_tokens": [rng.integers(0, 50_000, n) for n in lengths],
        "weights": [np.ones(n, np.float32) for n in lengths],
    }
    jr.Batch.from_ragged(logprobs, inputs)  # warm up
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        x, _ = jr.Batch.from_ragged(logprobs, inputs)
        x.block_until_ready()
        samples.append(time.perf_counter() - start)
    ms = statistics.median(samples) * 1e3
    print(
        f"from_ragged: 64 sequences, {lengths.sum():,} tokens, padded to {x.shape}: "
        f"{ms:.1f} ms median (target < 20 ms)"
    )


if __name__ == "__main__":
    main()
