"""The service under load: 64 concurrent clients training their own models.

Starts ``jaxreg serve`` in a subprocess and runs ``--clients`` threads (64), each with
its own :class:`jaxreg.remote.ServiceClient` and model, for ``--seconds`` (default 10;
``--seconds 60`` for the recorded figures). Each client loops: two pipelined
``forward_backward`` requests of 4 datums (random lengths 8-40) and an ``optim_step``,
then waits for the three results. It checks, per model:

* errors: any exception from a request;
* lost requests: submitted but never answered by the end;
* order violations: ``optim_step`` must report ``step`` one more than the last and
  ``accumulated == 2`` (both backward passes of its round applied before it, once).

Prints throughput (requests per second), request latency p50/p99 (submit to result),
and the server's RSS before and after.

Run: ``python -m benchmarks.service_load_bench [--clients 64] [--seconds 60]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time

import numpy as np

import jaxreg as jr
from benchmarks.service_limits_bench import free_port, serve, status_kib
from jaxreg._src.remote.wire import Datum

MIB = 1 << 20


def _batch(rng: np.random.Generator, length: int | None = None) -> list[Datum]:
    out = []
    for _ in range(4):
        t = length or int(rng.integers(8, 41))
        out.append(
            Datum(
                rng.integers(3, 20, t),
                {"target_tokens": rng.integers(3, 20, t), "weights": rng.random(t, np.float32)},
            )
        )
    return out


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.submitted = self.answered = self.violations = self.lost = 0


def client_loop(url: str, seed: int, stop: threading.Event, stats: Stats) -> None:
    rng = np.random.default_rng(seed)
    retry = jr.remote.RetryPolicy(max_elapsed=60.0)
    with jr.remote.ServiceClient(url, retry=retry, poll_timeout=30.0) as client:
        try:
            training = client.create_model()
        except Exception as e:  # counted, not raised: the benchmark reports it
            with stats.lock:
                stats.errors.append(f"create_model: {e}")
            return
        step = 0
        while not stop.is_set():
            started = time.perf_counter()
            futures = []
            try:
                futures.append(training.forward_backward(_batch(rng)))
                futures.append(training.forward_backward(_batch(rng)))
                futures.append(training.optim_step({"learning_rate": 1e-4}))
                with stats.lock:
                    stats.submitted += 3
                results = [f.result(timeout=120) for f in futures]
            except TimeoutError:  # no answer within 2 minutes: lost
                with stats.lock:
                    stats.lost += sum(f._value is None for f in futures)
                continue
            except Exception as e:
                with stats.lock:
                    stats.errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            elapsed = time.perf_counter() - started
            metrics = results[2]["metrics"]
            with stats.lock:
                stats.answered += 3
                stats.latencies.extend([elapsed] * 3)
                if metrics["step"] != step + 1 or metrics["accumulated"] != 2:
                    stats.violations += 1
            step = metrics["step"]
        with contextlib.suppress(jr.remote.RemoteError):  # (a service without delete_model)
            client.post("delete_model", {"model_id": training.model_id})


class _Existing:
    """A service started elsewhere (``--port``/``--pid``): never stopped here."""

    def __init__(self, pid: int):
        self.pid = pid

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, help="use the service already on this port")
    parser.add_argument("--pid", type=int, help="its process id (for RSS), with --port")
    args = parser.parse_args()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = serve(port, tmp) if args.port is None else _Existing(args.pid)
        try:
            # Warm up (compile the shapes) so that the run measures serving, not XLA.
            with jr.remote.ServiceClient(url) as c:
                t = c.create_model()
                rng = np.random.default_rng(0)
                for length in (16, 32, 40):  # every padded length bucket: 16, 32, 64
                    t.forward_backward(_batch(rng, length)).result()
                t.optim_step({"learning_rate": 1e-4}).result()
                with contextlib.suppress(jr.remote.RemoteError):
                    c.post("delete_model", {"model_id": t.model_id})
            rss_before = status_kib(proc.pid, "VmRSS") * 1024
            stats, stop = Stats(), threading.Event()
            threads = [
                threading.Thread(target=client_loop, args=(url, i, stop, stats))
                for i in range(args.clients)
            ]
            started = time.perf_counter()
            for th in threads:
                th.start()
            time.sleep(args.seconds)
            stop.set()
            for th in threads:
                th.join()
            seconds = time.perf_counter() - started
            rss_after = status_kib(proc.pid, "VmRSS") * 1024
            peak = status_kib(proc.pid, "VmHWM") * 1024
        finally:
            proc.terminate()
            proc.wait(30)
    lat = sorted(stats.latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3
    lost = stats.lost
    print(f"clients: {args.clients}, seconds: {seconds:.1f}")
    print(f"requests answered: {stats.answered} ({stats.answered / seconds:.1f} req/s)")
    print(f"latency (submit of a round to its result): p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms")
    print(
        f"errors: {len(stats.errors)}, lost requests: {lost}, order violations: {stats.violations}"
    )
    print(
        f"server RSS: before {rss_before / MIB:.0f} MiB, after {rss_after / MIB:.0f} MiB, "
        f"peak {peak / MIB:.0f} MiB"
    )
    if stats.errors:
        print("first errors:", *stats.errors[:5], sep="\n  ")
    if lat:
        print(f"mean latency {statistics.mean(lat) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
