"""Client-side cost of ``forward_backward_custom`` and its compile count over a long run.

1. Overhead: a custom step (forward, pack, compiled objective with grad norms,
   linearisation, forward_backward) against a bare ``forward`` + ``forward_backward``
   pair of the same data on the same service, measured interleaved. The custom step
   sends the same two requests, so the difference is jaxreg's client-side work.
2. Recompiles: 200 custom steps with random batch sizes and sequence lengths; the
   objective's trace count must stay at the number of (length, batch) buckets used.

Run: ``python -m benchmarks.remote_bench``.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

import jaxreg as jr
from benchmarks.common import table
from jaxreg._src.remote.client import TrainingClient
from jaxreg._src.remote.custom import _Step
from jaxreg._src.remote.wire import Datum
from jaxreg.service import start

SIZES = [(8, 128), (64, 1024)]


def _objective():
    return jr.compose(
        jr.Term("nll", jr.losses.cross_entropy),
        [
            jr.Term("kl", jr.regularizers.kl("ref_logprobs"), weight=0.1),
            jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
            jr.Term("smooth", jr.regularizers.smoothness, weight=0.01),
        ],
        track_grad_norms=True,
    )


def _data(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Datum(
            rng.integers(3, 20, t),
            {
                "target_tokens": rng.integers(3, 20, t),
                "weights": np.ones(t, np.float32),
                "ref_logprobs": -rng.gamma(2.0, 1.0, t).astype(np.float32),
            },
        )
        for t in lengths
    ]


def overhead(training, objective, b, t, repeats):
    data = _data([t] * b)
    plain = [
        Datum(d.tokens, {k: d.loss_fn_inputs[k] for k in ("target_tokens", "weights")})
        for d in data
    ]
    targets = [Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in data]

    def bare():
        training.forward(targets).result()
        training.forward_backward(plain).result()

    def custom():
        jr.remote.forward_backward_custom(training, data, objective).result()

    samples = {"bare": [], "custom": []}
    for i in range(repeats + 1):  # round 0 compiles
        for name, fn in (("bare", bare), ("custom", custom))[:: 1 if i % 2 else -1]:
            start = time.perf_counter()
            fn()
            if i:
                samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def client_work(client, objective, b, t, repeats=20):
    """Seconds of client-side work in a custom step (pack, objective with grad norms,
    finiteness check, unpad, linearise, encode), timed alone: no service involved."""
    data = _data([t] * b)
    rng = np.random.default_rng(0)
    forward = {
        "loss_fn_outputs": [
            {"logprobs": -rng.gamma(2.0, 1.0, t).astype(np.float32)} for _ in range(b)
        ]
    }
    state = _Step(TrainingClient(client, "unused"), data, objective, None, None, "pow2", "pow2")
    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        _, out, linear = state.compute(forward)
        json.dumps([d.to_json("base64") for d in linear])
        out.flat()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def recompiles(training, steps=200, seed=1):
    objective = _objective()
    rng = np.random.default_rng(seed)
    shapes = set()
    for i in range(steps):
        lengths = rng.integers(1, 100, size=rng.integers(1, 9))
        result = jr.remote.forward_backward_custom(
            training, _data(lengths, seed=i), objective, weights={"kl": float(rng.random())}
        ).result()
        shapes.add(np.asarray(result.output.grad).shape)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{steps} steps, {objective.trace_count} compiles", flush=True)
    return objective.trace_count, len(shapes)


def main() -> None:
    rows = []
    with (
        start(state_dir="/tmp/jaxreg-bench-states") as server,
        jr.remote.ServiceClient(server.url) as client,
    ):
        training = client.create_model()
        objective = _objective()
        for b, t in SIZES:
            m = overhead(training, objective, b, t, repeats=15 if b * t <= 4096 else 4)
            work = client_work(client, objective, b, t)
            rows.append(
                [
                    f"[{b},{t}]",
                    f"{m['bare'] * 1e3:.1f}",
                    f"{m['custom'] * 1e3:.1f}",
                    f"{m['custom'] / m['bare'] - 1:+.1%}",
                    f"{work * 1e3:.2f}",
                    f"{work / m['bare']:.2%}",
                ]
            )
            print(rows[-1], flush=True)
        print("200 steps with random batch sizes (1-8) and lengths (1-99):")
        compiles, buckets = recompiles(training)
        engine = server.engine.trace_counts()
    print()
    print(
        table(
            rows,
            [
                "tokens",
                "bare pair ms",
                "forward_backward_custom ms",
                "difference",
                "client work ms",
                "client work / bare pair",
            ],
        )
    )
    print(
        f"\nobjective compiled {compiles} times for {buckets} (batch, length) buckets over "
        f"200 steps; service programs traced: {engine}"
    )


if __name__ == "__main__":
    main()
