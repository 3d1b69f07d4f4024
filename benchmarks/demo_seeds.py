"""Is the demo's story stable? The KL-weight sweep over several seeds, side by side.

Run: ``python -m benchmarks.demo_seeds [--seeds 0 1 2] [--steps N]``. Runs ``jaxreg demo``
(its default configuration unless told otherwise) once per seed, each with its own
embedded service, and prints held-out greedy accuracy after training for every KL
weight and seed, the spread across seeds, and the parameter-space gradient cosine of the
NLL and KL terms over the run. The README's sentences about the sweep are written from
this table: an effect is claimed only where it is larger than the spread across seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import table
from jaxreg._src.demo import demo


def run_seed(seed: int, args, root: Path) -> dict:
    cfg = demo.DemoConfig(seed=seed, out=root / f"seed{seed}", progress=False)
    if args.steps:
        cfg.steps = args.steps
        cfg.eval_every = args.steps
    if args.kl_weights:
        cfg.kl_weights = tuple(args.kl_weights)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = demo.run(cfg)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="steps per KL weight (default: the demo's)")
    parser.add_argument("--kl-weights", type=float, nargs="+")
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="demo-seeds-"))
    results = {}
    for seed in args.seeds:
        started = time.perf_counter()
        results[seed] = run_seed(seed, args, root)
        print(f"seed {seed}: {time.perf_counter() - started:.0f}s", flush=True)
    weights = [r["kl_weight"] for r in results[args.seeds[0]]["runs"]]
    rows = []
    for i, w in enumerate(weights):
        finals = np.array(
            [
                [results[s]["runs"][i]["evals"][-1][k] for k in ("new", "copy", "reverse")]
                for s in args.seeds
            ]
        )
        cells = [f"{w:g}"]
        for k in range(3):
            per_seed = "/".join(f"{v:.0%}" for v in finals[:, k])
            cells.append(f"{finals[:, k].mean():.0%} ({per_seed})")
        cells.append(f"{(finals.max(0) - finals.min(0)).max():.0%}")
        cos = np.array([results[s]["runs"][i]["param_cos_nll_kl"] for s in args.seeds])
        cells.append(f"{cos[:, 0].mean():+.2f} [{cos[:, 1].min():+.2f}, {cos[:, 2].max():+.2f}]")
        rows.append(cells)
    print()
    print(
        table(
            rows,
            [
                "kl weight",
                "increment (learned), mean (per seed)",
                "copy (kept)",
                "reverse (kept)",
                "largest spread",
                "param cos(nll, kl): mean [min, max]",
            ],
        )
    )
    print(f"\nruns in {root}")


if __name__ == "__main__":
    main()
