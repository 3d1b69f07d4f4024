"""XLA:CPU's vmap miscompile: jaxreg's remedy (row-by-row pullbacks) against alternatives.

Side by side in one run, on the reference service's transformer (d_model 32, [32, 32]
tokens, 4 terms on the logprobs, term_grads=True): the remedy (grad_strategy="vmap",
pulled back row by row on CPU), the raw jax.vmap pullback (wrong on jaxlib 0.10.2),
per_term, and the plain step; and the relative error of each against a loop of
per-term jax.grad.

    PYTHONPATH=. python -m benchmarks.vmap_miscompile_bench
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from jaxreg._src.core import program
from jaxreg.service import model as M

CFG = M.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, context_length=32)
B = T = 32
FNS = [
    lambda lp, b: -jnp.mean(lp),
    lambda lp, b: jnp.mean(lp**2),
    lambda lp, b: -jnp.mean(lp[:, : T // 2]),
    lambda lp, b: -jnp.mean(lp[:, T // 2 :]),
]


def forward(p, b):
    return M.token_logprobs(CFG, p, b[0], b[1])


def make(strategy, **flags):
    return jr.compose(
        jr.Term("a", FNS[0]),
        [jr.Term(n, f) for n, f in zip("bcd", FNS[1:], strict=True)],
        forward=forward,
        grad_strategy=strategy,
        **flags,
    )


def main(rounds: int = 30) -> None:
    params = M.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = tuple(jnp.asarray(rng.integers(0, 32, (B, T)), jnp.int32) for _ in range(2))
    ref = [jax.jit(jax.grad(lambda p, f=f: f(forward(p, batch), None)))(params) for f in FNS]
    remedy = program._batched_pullback
    raw = lambda pb, rows, size: jax.vmap(pb)(rows)[0]
    cases = {}
    for name, strategy, impl, flags in [
        ("plain step", "auto", remedy, {}),
        ("vmap (jaxreg, row by row)", "vmap", remedy, {"term_grads": True}),
        ("vmap (raw jax.vmap)", "vmap", raw, {"term_grads": True}),
        ("per_term", "per_term", remedy, {"term_grads": True}),
    ]:
        program._batched_pullback = impl
        obj = make(strategy, **flags)
        jax.block_until_ready(obj(params, batch))  # compile with this implementation
        cases[name] = obj
    program._batched_pullback = remedy
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, obj in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(obj(params, batch))
            times[k].append(time.perf_counter() - t0)
    base = np.median(times["per_term"])
    print(f"{'case':28s} {'median ms':>10s} {'/ per_term':>10s} {'max rel err':>12s}")
    for k, obj in cases.items():
        err = "-"
        if k != "plain step":
            jac = obj(params, batch).term_grads
            errs = []
            for i, r in enumerate(ref):
                pairs = zip(jax.tree.leaves(jac), jax.tree.leaves(r), strict=True)
                num = sum(float(jnp.sum((j[i] - g) ** 2)) for j, g in pairs)
                den = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(r))
                errs.append((num / den) ** 0.5)
            err = f"{max(errs):.1e}"
        med = np.median(times[k])
        print(f"{k:28s} {med * 1e3:10.2f} {med / base:10.2f} {err:>12s}")


if __name__ == "__main__":
    main()
