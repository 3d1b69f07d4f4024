"""Every built-in term next to the NLL base at [64, 8192]: compose+norms vs the floor.

Run: ``python -m benchmarks.terms_bench [--quick]``. Terms return their loss only on both
sides (as in compose_bench), so the ratio measures compose's own cost.

The ``hand-written`` column is the least any implementation does to report per-term
gradient norms: each term's ``value_and_grad`` written out by hand in one jit, the
weighted sum, and the three squared norms, with no output structure around it. It shows
what the backend charges for the per-term gradients themselves, apart from compose.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import table, time_interleaved

L, R = jr.losses, jr.regularizers
BUILT_INS = {
    "importance_sampling": L.importance_sampling,
    "ppo": L.ppo,
    "dpo": L.dpo,
    "l1": R.l1,
    "l2": R.l2,
    "elastic_net": R.elastic_net,
    "entropy": R.entropy,
    "kl": R.kl,
    "consistency": R.consistency,
    "smoothness": R.smoothness,
    "confidence_penalty": R.confidence_penalty,
    "length_penalty": R.length_penalty,
}


def workload(b=64, t=8192, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)

    def lp():
        return jnp.asarray(-rng.random((b, t), np.float32) * 3)

    inputs = {
        "weights": jnp.asarray(mask),
        "ref_logprobs": lp(),
        "sampling_logprobs": lp(),
        "advantages": jnp.asarray(rng.normal(size=(b, t)).astype(np.float32)),
    }
    return lp(), jr.Batch(jnp.asarray(mask), inputs)


def loss_only(fn):
    return lambda x, batch: fn(x, batch)[0]


def hand_written(nll, term):
    """Per-term gradients and norms written out by hand (the per-term lower bound)."""

    @jax.jit
    def step(x, batch):
        v0, g0 = jax.value_and_grad(nll)(x, batch)
        v1, g1 = jax.value_and_grad(term)(x, batch)
        total = g0 + 0.1 * g1
        return v0, v1, total, jnp.sum(g0 * g0), jnp.sum(g1 * g1), jnp.sum(total * total)

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    x, batch = workload()
    nll = loss_only(L.cross_entropy)
    rows = []
    for name, fn in BUILT_INS.items():
        term = loss_only(fn)
        floor = jax.jit(jax.value_and_grad(lambda x, b, term=term: nll(x, b) + 0.1 * term(x, b)))
        objective = jr.compose(
            jr.Term("nll", nll), [jr.Term(name, term, 0.1)], track_grad_norms=True
        )
        by_hand = hand_written(nll, term)
        times = time_interleaved(
            {
                "floor": lambda f=floor: f(x, batch),
                "norms": lambda o=objective: o(x, batch),
                "hand": lambda f=by_hand: f(x, batch),
            },
            repeats=5 if args.quick else 11,
        )
        rows.append(
            [name, f"{times['floor'] * 1e3:.3f}"]
            + [f"{times[k] / times['floor']:.2f}" for k in ("norms", "hand")]
        )
        print(rows[-1], flush=True)
    header = ["term (+ NLL base)", "floor ms", "compose+norms / floor", "hand-written / floor"]
    print(table(rows, header))


if __name__ == "__main__":
    main()
