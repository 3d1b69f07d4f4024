"""The cost of reporting gradients in logit space (``grad_space="logits"``).

Run: ``python -m benchmarks.grad_space_bench [--quick]``. The workload is the demo's
objective (cross-entropy, KL to a reference with a mask, entropy, confidence penalty) on
full-vocabulary ``[B, T, K]`` logprobs with a padding mask, with grad norms and
conflicts tracked (and without tracking: the projection of ``grad`` alone). Both spaces
run side by side in one process; the ratio is logits / x.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import table, time_interleaved

SIZES = [(24, 16, 32), (32, 256, 32), (16, 128, 1024), (8, 512, 4096)]


def workload(b, t, k, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, k)).astype(np.float32)
    x = jax.nn.log_softmax(jnp.asarray(logits))
    ref = jax.nn.log_softmax(jnp.asarray(logits + rng.normal(size=logits.shape).astype(np.float32)))
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    onehot = np.eye(k, dtype=np.float32)[rng.integers(0, k, size=(b, t))] * mask[..., None]
    targets = jnp.broadcast_to(jnp.arange(k), (b, t, k))
    inputs = {
        "target_tokens": targets,
        "weights": jnp.asarray(onehot),
        "ref_logprobs": ref,
        "kl_mask": jnp.asarray(mask),
    }
    return x, jr.Batch(jnp.asarray(mask), inputs)


def objective(space, track):
    return jr.compose(
        jr.Term("nll", jr.losses.cross_entropy(reduction="token_mean")),
        [
            jr.Term("kl", jr.regularizers.kl("ref_logprobs", where="kl_mask"), weight=0.3),
            jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
            jr.Term("confidence", jr.regularizers.confidence_penalty(max_prob=0.999), 0.01),
        ],
        track_grad_norms=track,
        grad_conflicts=track,
        grad_space=space,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    repeats = 7 if args.quick else 15
    rows = []
    for b, t, k in SIZES:
        x, batch = workload(b, t, k)
        fns = {}
        for track in (False, True):
            for space in ("x", "logits"):
                f = objective(space, track)
                fns[space, track] = lambda f=f, x=x, batch=batch: f(x, batch)
        times = time_interleaved(fns, repeats=repeats)
        for track in (False, True):
            base, proj = times["x", track], times["logits", track]
            rows.append(
                [
                    f"[{b},{t},{k}]",
                    "norms + cosines" if track else "plain",
                    f"{base * 1e3:.3f}",
                    f"{proj * 1e3:.3f}",
                    f"{proj / base:.2f}",
                ]
            )
        print(rows[-2], rows[-1], flush=True)
    print()
    print(
        table(
            rows,
            ["[B,T,K]", "mode", "x-space ms", "logit-space ms", "logits / x"],
        )
    )
    print(f"\nbackend: {jax.default_backend()}, devices: {jax.devices()}")


if __name__ == "__main__":
    main()
