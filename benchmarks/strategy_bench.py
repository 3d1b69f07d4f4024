"""grad_strategy: per_term, vmap and auto against the floor, by number of terms and size.

Run: ``make bench`` or ``python -m benchmarks.strategy_bench [--quick]``. Prints one
ratio table measured side by side over term counts and ``[B, T]`` sizes, then a held-out
5-term workload the ``auto`` rule was not fitted on (``benchmarks/RESULTS.md``, section
"grad_strategy=auto").

Every cell compiles four programs: the **floor** (one jitted ``value_and_grad`` of the
weighted sum, no tracking) and ``compose(..., track_grad_norms=True)`` with
``grad_strategy`` ``"per_term"``, ``"vmap"`` and ``"auto"``. They are timed in
interleaved rounds (every round calls each program once, in turn), and each ratio is
the median over rounds of the per-round ratio, so that the drift of a shared machine
cancels. ``auto / best`` is auto over the faster of per_term and vmap.
Where auto picks per_term, the two are the same program compiled twice: how far apart
they measure is the noise of the run, printed under each table.

Bounded cost: a cell's rounds take about ``--budget`` seconds (at least 7 rounds). ``vmap``
grows with the square of the number of terms (seconds a call at ``[64,8192]`` with 50
terms): a program whose call takes over ``--slow`` seconds is timed on two calls, and
one the ``n^2`` law predicts over ``--skip`` seconds a call from the previous term count
is not run (shown as ``> r``, the predicted ratio; it cannot be the best there).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxreg as jr
from benchmarks.common import block, table
from jaxreg._src.core.strategy import VMAP_MAX_WORK, auto_groups, forward_work

L, R = jr.losses, jr.regularizers
TERM_COUNTS = (1, 5, 20, 50, 100)
SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 8192))
STRATEGIES = ("per_term", "vmap", "auto")
# Around auto's threshold (VMAP_MAX_WORK): tiny inputs, where vmap can be chosen.
THRESHOLD_SIZES = ((2, 64), (2, 128), (2, 512))
THRESHOLD_COUNTS = (2, 3, 5)

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
        "sampling_logprobs": logprobs(),
        "advantages": jnp.asarray(rng.normal(size=(b, t)).astype(np.float32)),
    }
    return logprobs(), jr.Batch(jnp.asarray(mask), inputs)


def _forward(terms: list[jr.Term], batch):
    """The terms' stacked values as a function of ``x``: what compose hands auto_groups."""
    return lambda x: jnp.stack([t.evaluate(x, batch)[0] for t in terms])


def auto_choice(terms: list[jr.Term], x, batch) -> str:
    """What auto decides for these terms, in words (the same call as compose makes)."""
    groups = auto_groups(len(terms), x, _forward(terms, batch))
    if len(groups) == len(terms):
        return "per_term"
    return "vmap"


@dataclasses.dataclass
class Cell:
    """One cell's medians: seconds per call, and ratios taken round by round."""

    seconds: dict[str, float]  # median seconds per call; negative: predicted, not run
    ratio: dict[str, float]  # strategy: median over rounds of its time / the floor's
    auto_best: float  # median over rounds of auto's time / the faster strategy's
    auto_per_term: float  # the same for auto / per_term


def _interleaved(fns, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call of each function, ``rounds`` calls each, call by call.

    Every round calls each function once, in turn: a burst of load from the other users
    of a shared machine (milliseconds) then hits neighbouring calls of all of them alike,
    and ratios can be taken round by round. (Timing loops of calls per function instead
    let one such burst land on one function: identical programs then differed by 2x.)
    """
    names = list(fns)
    order = random.Random(0)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        # A new order each round: a program that runs right after a large one finds the
        # caches cold (after vmap with 20 terms and more, 15-20% slower), so each must
        # follow each of the others as often. (A fixed order, or a rotation of it, put
        # auto after vmap every time: identical programs then differed by 20%.)
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            block(fns[name]())
            samples[name].append(time.perf_counter() - start)
    return samples


def measure(
    terms: list[jr.Term],
    x,
    batch,
    *,
    repeats: int,
    budget: float,
    slow: float,
    skip: float,
    predicted: dict[str, float],
) -> Cell:
    """The floor and the three strategies on one workload (see the module doc).

    ``repeats`` rounds at most, fewer where a round is long, so that the timed rounds of
    a cell take about ``budget`` seconds (at least 7 rounds). ``predicted`` maps a
    strategy to its predicted seconds per call; those above ``skip`` are not run.
    """
    weights = [t.weight for t in terms]

    def total(x, batch):
        return sum(w * t.fn(x, batch) for w, t in zip(weights, terms, strict=True))

    floor = jax.jit(jax.value_and_grad(total))
    fns = {"floor": lambda: floor(x, batch)}
    seconds: dict[str, float] = {}
    for s in STRATEGIES:
        if predicted.get(s, 0.0) > skip:
            seconds[s] = -predicted[s]
            continue
        objective = jr.compose(terms[0], terms[1:], track_grad_norms=True, grad_strategy=s)
        fns[s] = lambda o=objective: o(x, batch)
    first, fast = {}, {}
    for name, fn in fns.items():
        block(fn())  # compile
        start = time.perf_counter()
        block(fn())
        first[name] = time.perf_counter() - start
        if first[name] > slow and name != "floor":
            start = time.perf_counter()
            block(fn())
            seconds[name] = statistics.median([first[name], time.perf_counter() - start])
        else:
            fast[name] = fn
    rounds = max(7, min(repeats, int(budget / sum(first[k] for k in fast))))
    samples = _interleaved(fast, rounds)
    seconds.update({k: statistics.median(v) for k, v in samples.items()})

    def paired(a: str, b: str) -> float:
        if a in samples and b in samples:
            return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))
        return seconds[a] / seconds[b]

    ratio = {
        s: paired(s, "floor") if seconds[s] > 0 else seconds[s] / seconds["floor"]
        for s in STRATEGIES
    }
    best = min(("per_term", "vmap"), key=lambda s: seconds[s] if seconds[s] > 0 else math.inf)
    return Cell(seconds, ratio, paired("auto", best), paired("auto", "per_term"))


def _row(label: list[str], cell: Cell, choice: str) -> list[str]:
    def show(r: float) -> str:
        return f"> {-r:.0f}" if r < 0 else f"{r:.2f}"

    return [
        *label,
        f"{cell.seconds['floor'] * 1e3:.3f}",
        *(show(cell.ratio[s]) for s in STRATEGIES),
        choice,
        f"**{cell.auto_best:.2f}**",
    ]


@dataclasses.dataclass(frozen=True)
class Options:
    repeats: int  # rounds per cell, at most
    budget: float  # seconds of timed rounds per cell, about
    slow: float  # seconds: a strategy slower than this a call is timed on two calls
    skip: float  # seconds: a strategy predicted slower than this a call is not run


def bench_grid(opts: Options, term_counts, sizes) -> tuple[list[list[str]], list[Cell]]:
    rows, cells = [], []
    for b, t in sizes:
        x, batch = workload(b, t)
        last: tuple[int, float] | None = None  # (n, vmap seconds) at this size
        for n in term_counts:
            terms = library_terms(n)
            predicted = {}
            if last is not None:
                # vmap runs every term's backward once per term: n^2.
                predicted["vmap"] = last[1] * (n / last[0]) ** 2
            choice = auto_choice(terms, x, batch)
            if choice == "vmap" and "vmap" in predicted:
                predicted["auto"] = predicted["vmap"]
            cell = measure(terms, x, batch, predicted=predicted, **dataclasses.asdict(opts))
            if cell.seconds["vmap"] > 0:
                last = (n, cell.seconds["vmap"])
            rows.append(_row([f"[{b},{t}]", str(n)], cell, choice))
            cells.append(cell)
            print(rows[-1], file=sys.stderr, flush=True)
    return rows, cells


def bench_threshold(opts: Options) -> tuple[list[list[str]], list[Cell]]:
    rows, cells = [], []
    for b, t in THRESHOLD_SIZES:
        x, batch = workload(b, t)
        for n in THRESHOLD_COUNTS:
            terms = library_terms(n)
            work = forward_work(_forward(terms, batch), x)
            cell = measure(terms, x, batch, predicted={}, **dataclasses.asdict(opts))
            rows.append(_row([f"[{b},{t}]", str(n), str(work)], cell, auto_choice(terms, x, batch)))
            cells.append(cell)
            print(rows[-1], file=sys.stderr, flush=True)
    return rows, cells


def bench_held_out(opts: Options, sizes) -> tuple[list[list[str]], list[Cell]]:
    rows, cells = [], []
    for b, t in sizes:
        x, batch = workload(b, t, seed=1)
        terms = held_out_terms()
        cell = measure(terms, x, batch, predicted={}, **dataclasses.asdict(opts))
        rows.append(_row([f"[{b},{t}]"], cell, auto_choice(terms, x, batch)))
        cells.append(cell)
        print(rows[-1], file=sys.stderr, flush=True)
    return rows, cells


def _summary(rows: list[list[str]], cells: list[Cell]) -> str:
    ratios = [c.auto_best for c in cells]
    within = sum(r <= 1.10 for r in ratios)
    # Where auto picked per_term, auto and per_term are one program compiled twice: how
    # far apart they measured is the noise of this run.
    same = [c.auto_per_term for r, c in zip(rows, cells, strict=True) if r[-2] == "per_term"]
    noise = max(abs(v - 1) for v in same) if same else 0.0
    return (
        f"auto within 1.10x of the best in {within}/{len(cells)} cells (worst "
        f"{max(ratios):.2f}); where auto = per_term (the same program compiled twice) "
        f"their medians differed by up to {noise:.0%}: the noise of this run."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, 2 of the 4 sizes")
    parser.add_argument("--budget", type=float, default=None, help="seconds of rounds a cell")
    parser.add_argument("--slow", type=float, default=1.0, help="seconds a call: time 2 calls")
    parser.add_argument("--skip", type=float, default=4.0, help="seconds a call: do not run")
    args = parser.parse_args(argv)
    budget = args.budget if args.budget is not None else (1.5 if args.quick else 4.0)
    opts = Options(200 if args.quick else 500, budget, args.slow, args.skip)
    sizes = (SIZES[0], SIZES[-1]) if args.quick else SIZES
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s)\n"
    )
    header = ["floor ms", "per_term", "vmap", "auto", "auto chose", "auto / best"]
    print("## Library token terms, cycled (the fit workload)\n")
    print(
        "Ratios are time / floor (floor = one jitted value_and_grad of the weighted sum, no "
        "tracking), medians over interleaved rounds of the per-round ratios; auto / best = "
        "auto over the faster of per_term and vmap. '> r': not run, predicted r from a "
        "smaller term count (n^2).\n"
    )
    grid, grid_cells = bench_grid(opts, TERM_COUNTS, sizes)
    print(table(grid, ["[B,T]", "terms", *header]))
    print()
    print(_summary(grid, grid_cells))
    print(f"\n## Around the threshold: auto picks vmap up to {VMAP_MAX_WORK} element ops\n")
    print("W: the terms' forward work (element operations, strategy.forward_work).\n")
    near, near_cells = bench_threshold(opts)
    print(table(near, ["[B,T]", "terms", "W", *header]))
    print()
    print(_summary(near, near_cells))
    print("\n## Held out: DPO + symmetric KL (k2) + KL consistency + Huber + entropy (5)\n")
    held, held_cells = bench_held_out(opts, sizes)
    print(table(held, ["[B,T]", *header]))
    print()
    print(_summary(held, held_cells))


if __name__ == "__main__":
    main()
