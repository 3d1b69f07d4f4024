"""Shared helpers of the service and remote tests: data, parameters read back over HTTP."""

from __future__ import annotations

import jax
import numpy as np

from jaxreg._src.remote.wire import Datum
from jaxreg.service import checkpoint, tasks


def examples(task: str, n: int, seed: int = 0):
    return tasks.make_examples(task, n, seed=seed, min_digits=2, max_digits=5)


def datums(task: str = "I", n: int = 3, seed: int = 0, weights: str = "answer") -> list[Datum]:
    """Datums with ``target_tokens`` and ``weights`` (the answer mask, or random)."""
    rng = np.random.default_rng(seed)
    out = []
    for e in examples(task, n, seed):
        w = e.answer_mask if weights == "answer" else rng.normal(size=len(e.tokens))
        out.append(
            Datum(
                e.tokens,
                {"target_tokens": e.targets.astype(np.int64), "weights": np.asarray(w, np.float32)},
            )
        )
    return out


def params_of(training, server, name: str):
    """The model's parameters, saved by the service and read back from its state dir."""
    training.save_state(name).result()
    tree, meta = checkpoint.load_tree(server.engine.state_dir / f"{name}.npz")
    return tree["params"], meta


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
