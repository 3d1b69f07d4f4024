"""The service's memory bound: peak RSS of the largest accepted requests, and a refusal.

Starts ``jaxreg serve`` in a subprocess (so its RSS is its own) with a memory budget,
then sends, at the full context length ``T = 1024``, the largest ``forward`` and
``forward_backward`` the budget admits, and one twice as large (which must be refused
with 413 before anything is allocated). Prints, per request, the service's estimate
(``jaxreg.service.limits.work_bytes``) next to the measured growth of the server's
peak RSS (``VmHWM``), and the peak against the 2 GB bound.

Run: ``python -m benchmarks.service_limits_bench [--memory-mb 1024]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

import jaxreg as jr
from benchmarks.common import table
from jaxreg._src.remote.wire import Datum
from jaxreg.service.limits import work_bytes
from jaxreg.service.model import ModelConfig

MIB = 1 << 20


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field (``VmRSS``, ``VmHWM``) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Resets ``VmHWM`` to the current RSS (Linux: ``echo 5 > clear_refs``)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int, state_dir: str, *extra: str) -> subprocess.Popen:
    """``jaxreg serve`` in a subprocess; returns once it answers ``healthz``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxreg",
            "serve",
            "--port",
            str(port),
            "--state-dir",
            state_dir,
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the service did not start")


def data(b: int, t: int) -> list[Datum]:
    rng = np.random.default_rng(0)
    return [
        Datum(
            rng.integers(3, 20, t),
            {"target_tokens": rng.integers(3, 20, t), "weights": np.ones(t, np.float32)},
        )
        for _ in range(b)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mb", type=int, default=1024)
    args = parser.parse_args()
    budget = args.memory_mb * MIB
    cfg, t = ModelConfig(), 1024
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc = serve(port, tmp, "--memory-mb", str(args.memory_mb))
        try:
            with jr.remote.ServiceClient(f"http://127.0.0.1:{port}") as client:
                training = client.create_model()
                training.forward(data(1, 16)).result()
                baseline = status_kib(proc.pid, "VmRSS") * 1024
                print(f"baseline RSS {baseline / MIB:.0f} MiB", flush=True)
                for kind, backward in (("forward", False), ("forward_backward", True)):
                    b = 1
                    while work_bytes(cfg, 2 * b, t, 1, backward) <= budget:
                        b *= 2
                    b_fb = b
                    for size in (b, 2 * b):
                        estimate = work_bytes(cfg, size, t, 1, backward)
                        reset_peak(proc.pid)
                        before = status_kib(proc.pid, "VmRSS") * 1024
                        started = time.perf_counter()
                        try:
                            getattr(training, kind)(data(size, t)).result()
                            outcome = "ok"
                        except jr.remote.RemoteError as e:
                            outcome = f"HTTP {e.status}"
                        seconds = time.perf_counter() - started
                        peak = status_kib(proc.pid, "VmHWM") * 1024
                        rows.append(
                            [
                                kind,
                                f"[{size},{t}]",
                                outcome,
                                f"{estimate / MIB:.0f}",
                                f"{(peak - before) / MIB:.0f}",
                                f"{peak / MIB:.0f}",
                                f"{seconds:.1f}",
                            ]
                        )
                        print(rows[-1], flush=True)
                # The largest backward on 4 models at once: the scheduler runs only as
                # many side by side as the budget holds.
                models = [client.create_model() for _ in range(4)]
                reset_peak(proc.pid)
                before = status_kib(proc.pid, "VmRSS") * 1024
                started = time.perf_counter()
                futures = [m.forward_backward(data(b_fb, t)) for m in models]
                outcome = "ok" if all(f.result()["type"] for f in futures) else "failed"
                seconds = time.perf_counter() - started
                peak = status_kib(proc.pid, "VmHWM") * 1024
                rows.append(
                    [
                        "4 x forward_backward, 4 models at once",
                        f"4 x [{b_fb},{t}]",
                        outcome,
                        f"{4 * work_bytes(cfg, b_fb, t, 1, True) / MIB:.0f} asked, "
                        f"{budget // MIB} admitted",
                        f"{(peak - before) / MIB:.0f}",
                        f"{peak / MIB:.0f}",
                        f"{seconds:.1f}",
                    ]
                )
                print(rows[-1], flush=True)
                overall = max(int(r[5]) for r in rows)
        finally:
            proc.terminate()
            proc.wait(30)
    print()
    print(
        table(
            rows,
            [
                "request",
                "shape",
                "outcome",
                "estimate MiB",
                "peak growth MiB",
                "server peak RSS MiB",
                "seconds",
            ],
        )
    )
    print(
        f"\nbudget {args.memory_mb} MiB; baseline RSS {baseline / MIB:.0f} MiB; highest server "
        f"peak {overall} MiB ({overall / 2000:.0%} of the 2 GB bound)"
    )


if __name__ == "__main__":
    main()
