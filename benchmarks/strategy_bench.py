"""grad_strategy: per_term, vmap and auto against the floor, by number of terms and size.

Run: ``make bench`` or ``python -m benchmarks.strategy_bench [--quick]``. Prints one
ratio table measured side by side (interleaved rounds, medians) over term counts and
``[B, T]`` sizes, then a held-out 5-term workload the ``auto`` rule was not fitted on
(see ``benchmarks/RESULTS.md``, section "grad_strategy=auto").

Every cell compiles four programs: the **floor** (one jitted ``value_and_grad`` of the
weighted sum, no tracking) and ``compose(..., track_grad_norms=True)`` with
``grad_strategy`` ``"per_term"``, ``"vmap"`` and ``"auto"``. Ratios are time / floor;
``auto / best`` is auto's time over the faster of per_term and vmap. Where auto picks the
same groups as per_term, the two are the same program compiled twice, so their ratio
shows the timing noise of the run.

``vmap`` grows with the square of the number of terms (several seconds a call at
``[64,8192]`` with 50 terms): a strategy whose first call takes over ``--slow`` seconds is
timed on one more call instead of interleaved rounds, and one whose call the ``n^2``
law predicts above ``--skip`` seconds from a smaller term count is not run (shown as
``>`` the prediction; it cannot be the best there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import block, table, time_interleaved
from jaxreg._src.core.strategy import auto_groups

L, R = jr.losses, jr.regularizers
TERM_COUNTS = (1, 5, 20, 50, 100)
SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 8192))
STRATEGIES = ("per_term", "vmap", "auto")

# The library's [B, T] token terms, cycled: the mix the auto rule was fitted on.
LIBRARY = (
    L.cross_entropy,
    R.l1,
    R.entropy,
    R.kl,
    R.smoothness,
    R.confidence_penalty,
    R.length_penalty,
    R.l2,
    R.elastic_net,
    L.importance_sampling,
    L.ppo,
    R.consistency,
)


def _huber(x, batch):
    """A user-written term: Huber distance to the reference logprobs over real tokens."""
    d = jnp.abs(x - batch["ref_logprobs"]) * batch.mask
    return jnp.sum(jnp.where(d < 1, 0.5 * d * d, d - 0.5)) / jnp.maximum(jnp.sum(batch.mask), 1)


# Held out: none of these functions or settings is in the fit (LIBRARY, cycled).
HELD_OUT = (
    ("dpo", L.dpo),
    ("kl_sym_k2", R.kl(direction="symmetric", estimator="k2")),
    ("consistency_kl", R.consistency(other="ref_logprobs", kind="kl")),
    ("huber", _huber),
    ("entropy_min", R.entropy(mode="minimize", reduction="seq_mean")),
)


def _loss_only(fn, scale=1.0):
    # The loss only, as in compose_bench: the floor computes no metrics either. The
    # distinct scale keeps XLA from merging two copies of one library term into one (a
    # real objective has no two identical terms).
    def term(x, batch):
        out = fn(x, batch)
        return scale * (out[0] if isinstance(out, tuple) else out)

    return term


def library_terms(n: int) -> list[jr.Term]:
    """``n`` terms cycling through ``LIBRARY``: the first weighted 1, the others 0.01."""
    return [
        jr.Term(f"t{i}", _loss_only(LIBRARY[i % len(LIBRARY)], 1 + i / 1000), 0.01 if i else 1.0)
        for i in range(n)
    ]


def held_out_terms() -> list[jr.Term]:
    return [
        jr.Term(name, _loss_only(fn), 0.05 if i else 1.0) for i, (name, fn) in enumerate(HELD_OUT)
    ]


def workload(b: int, t: int, seed: int = 0):
    """Random logprobs ``[B, T]`` with ragged lengths and every input the terms read."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)

    def logprobs():
        return jnp.asarray(-rng.random((b, t), np.float32) * 3)

    inputs = {
        "weights": jnp.asarray(mask),
        "ref_logprobs": logprobs(),
        "logprobs": logprobs(),
        "advantages": jnp.asarray(rng.normal(size=(b, t)).astype(np.float32)),
    }
    return logprobs(), jr.Batch(jnp.asarray(mask), inputs)


def auto_choice(terms: list[jr.Term], x, batch) -> str:
    """What auto decides for these terms, in words."""
    groups = auto_groups(len(terms), x, lambda x: [t.fn(x, batch) for t in terms])
    if len(groups) == len(terms):
        return "per_term"
    return "vmap"


def measure(
    terms: list[jr.Term],
    x,
    batch,
    *,
    repeats: int,
    slow: float,
    skip: float,
    predicted: dict[str, float],
) -> dict[str, float]:
    """Median seconds per call of the floor and the three strategies (see the module doc).

    ``predicted`` maps a strategy to its predicted seconds per call; those above ``skip``
    are not run and come back negative (minus the prediction).
    """
    weights = [t.weight for t in terms]

    def total(x, batch):
        return sum(w * t.fn(x, batch) for w, t in zip(weights, terms, strict=True))

    floor = jax.jit(jax.value_and_grad(total))
    fns = {"floor": lambda: floor(x, batch)}
    out: dict[str, float] = {}
    for s in STRATEGIES:
        if predicted.get(s, 0.0) > skip:
            out[s] = -predicted[s]
            continue
        objective = jr.compose(terms[0], terms[1:], track_grad_norms=True, grad_strategy=s)
        fns[s] = lambda o=objective: o(x, batch)
    fast = {}
    for name, fn in fns.items():
        block(fn())  # compile
        start = time.perf_counter()
        block(fn())
        first = time.perf_counter() - start
        if first > slow:
            calls = [first]
            start = time.perf_counter()
            block(fn())
            calls.append(time.perf_counter() - start)
            out[name] = statistics.median(calls)
        else:
            fast[name] = fn
    out.update(time_interleaved(fast, repeats=repeats, min_time=0.02))
    return out


def _ratio(times: dict[str, float], name: str) -> str:
    t = times[name]
    return f"> {-t / times['floor']:.0f}" if t < 0 else f"{t / times['floor']:.2f}"


def _row(label: list[str], times: dict[str, float], choice: str) -> list[str]:
    best = min(t for s, t in times.items() if s in ("per_term", "vmap") and t > 0)
    return [
        *label,
        f"{times['floor'] * 1e3:.3f}",
        *(_ratio(times, s) for s in STRATEGIES),
        choice,
        f"**{times['auto'] / best:.2f}**",
    ]


def bench_grid(repeats: int, slow: float, skip: float, term_counts, sizes) -> list[list[str]]:
    rows = []
    for b, t in sizes:
        x, batch = workload(b, t)
        last: tuple[int, float] | None = None  # (n, vmap seconds) at this size
        for n in term_counts:
            terms = library_terms(n)
            predicted = {}
            if last is not None and last[1] > 0:
                predicted["vmap"] = last[1] * (n / last[0]) ** 2
            choice = auto_choice(terms, x, batch)
            if choice == "vmap" and "vmap" in predicted:
                predicted["auto"] = predicted["vmap"]
            times = measure(
                terms, x, batch, repeats=repeats, slow=slow, skip=skip, predicted=predicted
            )
            if times["vmap"] > 0:
                last = (n, times["vmap"])
            rows.append(_row([f"[{b},{t}]", str(n)], times, choice))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def bench_held_out(repeats: int, slow: float, skip: float, sizes) -> list[list[str]]:
    rows = []
    for b, t in sizes:
        x, batch = workload(b, t, seed=1)
        terms = held_out_terms()
        times = measure(terms, x, batch, repeats=repeats, slow=slow, skip=skip, predicted={})
        rows.append(_row([f"[{b},{t}]"], times, auto_choice(terms, x, batch)))
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _summary(rows: list[list[str]]) -> str:
    worst = max(float(r[-1].strip("*")) for r in rows)
    within = sum(float(r[-1].strip("*")) <= 1.10 for r in rows)
    # Where auto picked per_term, auto and per_term are one program compiled twice.
    same = [float(r[-3]) / float(r[-5]) for r in rows if r[-2] == "per_term"]
    noise = max(abs(v - 1) for v in same) if same else 0.0
    return (
        f"auto within 1.10x of the best in {within}/{len(rows)} cells (worst {worst:.2f}); "
        f"identical programs (auto = per_term) differed by up to {noise:.0%} in this run."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    parser.add_argument("--slow", type=float, default=0.2, help="seconds: time one call")
    parser.add_argument("--skip", type=float, default=4.0, help="seconds: do not run")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 11
    sizes = (SIZES[0], SIZES[-1]) if args.quick else SIZES
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s)\n"
    )
    header = ["floor ms", "per_term", "vmap", "auto", "auto chose", "auto / best"]
    print("## Library token terms, cycled (the fit workload)\n")
    print(
        "Ratios are time / floor (floor = one jitted value_and_grad of the weighted sum); "
        "auto / best = auto over the faster of per_term and vmap.\n"
    )
    grid = bench_grid(repeats, args.slow, args.skip, TERM_COUNTS, sizes)
    print(table(grid, ["[B,T]", "terms", *header]))
    print()
    print(_summary(grid))
    print("\n## Held out: DPO + symmetric KL (k2) + KL consistency + Huber + entropy (5)\n")
    held = bench_held_out(repeats, args.slow, args.skip, sizes)
    print(table(held, ["[B,T]", *header]))
    print()
    print(_summary(held))


if __name__ == "__main__":
    main()
