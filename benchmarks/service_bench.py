"""The reference service: requests per second and where a request's time goes.

For ``forward`` and ``forward_backward`` at ``[8, 128]`` and ``[64, 1024]`` tokens, with
JSON lists and with the compact base64 encoding, over loopback HTTP:

* ``total``: wall time of one request (submit + retrieve_future), sequential;
* ``compute``: the model's time on the service (reported by the service);
* ``serialisation``: client encoding, JSON parsing on both sides, tensor decoding and
  packing on the service (``decode_s``, conservatively counted whole), tensor encoding on
  the service, and client decoding of the logprobs.

Run: ``python -m benchmarks.service_bench`` (prints a Markdown table).
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

import jaxreg as jr
from benchmarks.common import table
from jaxreg._src.remote.client import _decode_outputs
from jaxreg._src.remote.wire import Datum
from jaxreg.service import Limits, start

SIZES = [(8, 128), (64, 1024)]


def _data(b: int, t: int, seed: int = 0) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [
        Datum(
            rng.integers(3, 20, t),
            {"target_tokens": rng.integers(3, 20, t), "weights": np.ones(t, np.float32)},
        )
        for _ in range(b)
    ]


def measure(training, kind: str, data, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    client = training.service
    for _ in range(repeats + 1):  # the first round compiles
        t0 = time.perf_counter()
        body = training._data_body(kind, data, "cross_entropy", None, None)
        content = json.dumps(body, separators=(",", ":"))
        t1 = time.perf_counter()
        json.loads(content)  # what the service spends parsing the body
        t2 = time.perf_counter()
        start = time.perf_counter()
        rid = client.post(kind, body)["request_id"]
        raw = client.wait(kind, body, rid)
        total = time.perf_counter() - start
        t3 = time.perf_counter()
        text = json.dumps(raw, separators=(",", ":"))  # the service's response encoding
        json.loads(text)  # the client's response parsing
        _decode_outputs(raw)
        t4 = time.perf_counter()
        timing = raw["timing"]
        serial = (t1 - t0) + (t2 - t1) + timing["decode_s"] + timing["encode_s"] + (t4 - t3)
        for k, v in {
            "total": total + (t1 - t0) + (t4 - t3),
            "compute": timing["compute_s"],
            "serialisation": serial,
        }.items():
            samples.setdefault(k, []).append(v)
    return {k: statistics.median(v[1:]) for k, v in samples.items()}


def main() -> None:
    rows = []
    # [64, 1024] needs ~11 GB for a backward, far over the default 1 GiB budget: lift it
    # to keep measuring the serialisation share at that size (see service_limits_bench).
    limits = Limits(memory_bytes=16 << 30)
    with start(state_dir="/tmp/jaxreg-bench-states", limits=limits) as server:
        for b, t in SIZES:
            data = _data(b, t)
            repeats = 5 if b * t <= 4096 else 3
            for encoding in ("json", "base64"):
                with jr.remote.ServiceClient(server.url, tensor_encoding=encoding) as c:
                    training = c.create_model()
                    for kind in ("forward", "forward_backward"):
                        m = measure(training, kind, data, repeats)
                        rows.append(
                            [
                                f"[{b},{t}]",
                                kind,
                                encoding,
                                f"{1 / m['total']:.1f}",
                                f"{m['total'] * 1e3:.1f}",
                                f"{m['compute'] * 1e3:.1f}",
                                f"{m['serialisation'] * 1e3:.2f}",
                                f"{m['serialisation'] / m['total']:.1%}",
                            ]
                        )
                        print(rows[-1], flush=True)
    print()
    print(
        table(
            rows,
            [
                "tokens",
                "request",
                "encoding",
                "req/s",
                "total ms",
                "compute ms",
                "serialisation ms",
                "serialisation share",
            ],
        )
    )


if __name__ == "__main__":
    main()
