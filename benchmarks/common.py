"""Timing helpers: interleaved repetitions, medians, and a ratio table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def block(tree: Any) -> Any:
    """Waits for every array in ``tree``."""
    return jax.block_until_ready(tree)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 15,
    min_time: float = 0.05,
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin.

    Each round times every function over enough calls to last ``min_time`` seconds, in
    turn, so that drift of a shared, noisy machine hits all of them alike.
    """
    for fn in fns.values():  # warm up (compile) and find a loop count per function
        block(fn())
    loops = {}
    for name, fn in fns.items():
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            block(fn())
            n += 1
        loops[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text (Markdown) table."""
    text = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in text
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
