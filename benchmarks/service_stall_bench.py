"""Stalls: ``healthz`` during a large body, and a small model's request behind a large one.

Two services side by side in one run, on the same machine:

* ``now``: the defaults (bodies over 64 KiB parsed on a thread that hands the GIL
  back; 4 worker threads, one model's requests at a time);
* ``before``: every body parsed on the event loop and one worker thread for all
  models, as the service was before issue 14.

Measured on each: the worst ``healthz`` latency while a ~30 MB JSON body is parsed,
and the latency of a tiny ``forward`` on one model sent just after a large
``forward_backward`` on another.

Run: ``python -m benchmarks.service_stall_bench``.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time

import httpx
import numpy as np

import jaxreg as jr
from benchmarks.common import table
from benchmarks.service_limits_bench import data
from jaxreg._src.remote.wire import Datum
from jaxreg.service import Engine, Limits
from jaxreg.service.app import create_app
from jaxreg.service.server import Server, _bind


def _server(state_dir: str, *, workers: int, parse_inline_bytes: int) -> Server:
    engine = Engine(state_dir, limits=Limits(workers=workers))
    app = create_app(engine, parse_inline_bytes=parse_inline_bytes)
    return Server(engine, app, _bind("127.0.0.1", 0)).start_background()


def _bodies() -> dict[str, bytes]:
    """A valid-shaped 7 MB body (256 datums x 1024 tokens, JSON lists) and a 33 MB one
    made of three 3M-token lists (each object spans 11 MB)."""
    rng = np.random.default_rng(0)
    data = [
        Datum(
            rng.integers(3, 20, 1024),
            {"target_tokens": rng.integers(3, 20, 1024), "weights": rng.random(1024, np.float32)},
        ).to_json()
        for _ in range(256)
    ]
    tokens = list(range(1, 31)) * 100_000
    huge = [{"model_input": {"chunks": [{"tokens": tokens}]}, "loss_fn_inputs": {}}] * 3
    return {
        name: json.dumps({"model_id": "none", "forward_input": {"data": d}}).encode()
        for name, d in (("7 MB, 256 datums", data), ("33 MB, 3 long lists", huge))
    }


def healthz_during_big_body(url: str, content: bytes) -> tuple[float, float]:
    """(worst healthz latency, seconds of the big request) in seconds."""
    latencies, done = [], threading.Event()

    def poll():
        with httpx.Client(base_url=url, timeout=60) as http:
            while not done.is_set():
                t0 = time.perf_counter()
                http.get("/api/v1/healthz")
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    httpx.post(f"{url}/api/v1/forward", content=content, timeout=120)
    big = time.perf_counter() - t0
    done.set()
    poller.join()
    return max(latencies), big


def small_behind_large(url: str) -> tuple[float, float]:
    """(latency of a tiny forward on model B, of the large backward on model A)."""
    with jr.remote.ServiceClient(url) as c:
        small, large = c.create_model(), c.create_model()
        tiny, big = data(1, 16), data(4, 512)
        small.forward(tiny).result()
        large.forward_backward(big).result()  # compiled: both timings are of running
        t0 = time.perf_counter()
        slow = large.forward_backward(big)
        t1 = time.perf_counter()
        small.forward(tiny).result()
        fast = time.perf_counter() - t1
        slow.result()
        return fast, time.perf_counter() - t0


def main() -> None:
    rows, stall_rows = [], []
    bodies = _bodies()
    with tempfile.TemporaryDirectory() as tmp:
        for name, workers, inline in (("now", 4, 64 << 10), ("before", 1, 1 << 40)):
            server = _server(tmp, workers=workers, parse_inline_bytes=inline)
            try:
                for body, content in bodies.items():
                    worst, big = healthz_during_big_body(server.url, content)
                    stall_rows.append([name, body, f"{worst * 1e3:.0f}", f"{big:.2f}"])
                    print(stall_rows[-1], flush=True)
                fast, slow = small_behind_large(server.url)
            finally:
                server.stop()
            rows.append([name, f"{fast * 1e3:.0f}", f"{slow:.2f}"])
            print(rows[-1], flush=True)
    print()
    print(
        table(
            stall_rows,
            ["service", "body (refused after parsing)", "worst healthz ms", "request s"],
        )
    )
    print()
    print(
        table(
            rows,
            ["service", "tiny forward on model B ms", "forward_backward [4,512] on model A s"],
        )
    )


if __name__ == "__main__":
    main()
