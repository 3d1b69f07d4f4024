"""The official tinker SDK against the native jaxreg client, per training step.

Both drive the same reference service over loopback HTTP at the demo's sizes (16 new
+ 8 replayed datums per step, every vocabulary token a target: ``[T, 32]``), on
full-parameter models (``rank=0`` for the SDK, so the service does the same compute):

* ``builtin``: ``forward_backward`` (cross-entropy) + ``optim_step``, pipelined;
* ``custom``: the demo's step: ``jr.remote.forward_backward_custom`` with the demo's
  objective (NLL + KL + entropy + confidence, grad norms and conflicts) + ``optim_step``.

Steps alternate between the two clients (round-robin), so that a shared, noisy
machine's drift hits both alike; medians are reported with their ratio.

Run: ``python -m benchmarks.tinker_bench`` (about a minute).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings

import numpy as np

import jaxreg as jr
from benchmarks.common import table
from jaxreg._src.demo import demo
from jaxreg._src.remote.wire import Datum
from jaxreg.service import start, tasks


def _batches(n: int, seed: int = 0) -> list[list[Datum]]:
    new = [demo._multi_target(e, learn=True) for e in tasks.make_examples("I", 256, seed=seed)]
    old = [demo._multi_target(e, learn=False) for e in tasks.make_examples("C", 256, seed=seed)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        batch = [new[i] for i in rng.choice(len(new), 16, replace=False)]
        batch += [old[i] for i in rng.choice(len(old), 8, replace=False)]
        out.append(
            [d.replace_inputs(ref_logprobs=np.zeros(d.loss_fn_inputs["weights"].shape, np.float32))
             for d in batch]
        )  # fmt: skip
    return out


def main(steps: int = 20) -> None:
    import tinker
    from tinker import types

    warnings.simplefilter("ignore", FutureWarning)
    key = "tml-bench"
    obj = demo.objective()
    batches = _batches(steps + 2)
    with start(state_dir="/tmp/jaxreg-tinker-bench", api_key=key) as server:
        native = jr.remote.ServiceClient(server.url, key)
        sdk = tinker.ServiceClient(base_url=server.url, api_key=key)
        try:
            models = {
                "native": (native.create_model(), {"learning_rate": 1e-4}),
                "sdk": (
                    sdk.create_lora_training_client(base_model="jaxreg-base", rank=0).result(),
                    types.AdamParams(learning_rate=1e-4),
                ),
            }
            sdk_batches = [[jr.remote.to_tinker_datum(d) for d in b] for b in batches]
            builtin_sdk = [
                [jr.remote.to_tinker_datum(Datum(d.tokens, {k: d.loss_fn_inputs[k]
                 for k in ("target_tokens", "weights")})) for d in b]
                for b in batches
            ]  # fmt: skip
            builtin_native = [
                [Datum(d.tokens, {k: d.loss_fn_inputs[k] for k in ("target_tokens", "weights")})
                 for d in b]
                for b in batches
            ]  # fmt: skip
            times: dict[str, list[float]] = {}
            for i in range(steps + 2):  # the first two steps compile: not timed
                for name, (training, adam) in models.items():
                    data = builtin_native[i] if name == "native" else builtin_sdk[i]
                    start_t = time.perf_counter()
                    fb = training.forward_backward(data, "cross_entropy")
                    opt = training.optim_step(adam)
                    fb.result()
                    opt.result()
                    if i >= 2:
                        times.setdefault(f"builtin/{name}", []).append(
                            time.perf_counter() - start_t
                        )
                    data = batches[i] if name == "native" else sdk_batches[i]
                    start_t = time.perf_counter()
                    fut = jr.remote.forward_backward_custom(training, data, obj)
                    opt = training.optim_step(adam)
                    fut.result()
                    opt.result()
                    if i >= 2:
                        times.setdefault(f"custom/{name}", []).append(time.perf_counter() - start_t)
        finally:
            native.close()
            sdk.close("success").result()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = []
    for kind in ("builtin", "custom"):
        n, s = med[f"{kind}/native"], med[f"{kind}/sdk"]
        rows.append((kind, f"{n:.1f}", f"{s:.1f}", f"{s / n:.2f}x", f"{s - n:+.1f}"))
    print(f"{steps} steps each, interleaved; {os.cpu_count()} CPUs; medians per step (ms)\n")
    print(table(rows, ["step", "native client", "tinker SDK", "SDK / native", "SDK - native"]))


if __name__ == "__main__":
    main()
