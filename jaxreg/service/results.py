"""Request results: futures kept by request id, ``request_failed`` results, compact JSON.

Every accepted request gets a ``concurrent.futures.Future`` whose result is the JSON
object ``retrieve_future`` answers: the step's output, or ``{"type": "request_failed",
"error", "category"}`` (``fail``). The newest futures are kept by request id
(``remember``); older finished ones are forgotten.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections import OrderedDict
from typing import Any

_KEEP_RESULTS = 4096


def remember(
    results: OrderedDict[str, concurrent.futures.Future],
    rid: str,
    fut: concurrent.futures.Future,
    keep: int = _KEEP_RESULTS,
) -> None:
    """Records a request's future, forgetting the oldest finished ones beyond ``keep``."""
    results[rid] = fut
    while len(results) > keep:
        old, f = next(iter(results.items()))
        if not f.done():
            break
        del results[old]


def fail(fut: concurrent.futures.Future, message: str, category: str) -> None:
    """Ends ``fut`` with a ``request_failed`` result (unless it already has one)."""
    if not fut.done():
        fut.set_result({"type": "request_failed", "error": message, "category": category})


def dumps(obj: Any) -> bytes:
    """Compact JSON (no spaces; NaN is refused rather than sent as invalid JSON)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


__all__ = ["dumps", "fail", "remember"]
