"""Does the cookbook's RL loop learn on jaxreg serve? The reward curve over seeds.

Run: ``python -m benchmarks.cookbook_rl_curve [--seeds 0 1 2 3] [--steps 80] [--block 10]``
(any other flag goes to ``examples/cookbook_rl.py``). Runs the example (the cookbook's
``rl.train``, unmodified, against an in-process service) once per seed and prints, per
block of steps, the mean batch reward over seeds with its min and max across seeds,
and the exact-match rate. A rise is claimed only where the last block's min over seeds
is above the first block's max.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import table

ROOT = Path(__file__).resolve().parents[1]
REWARD, EXACT = "env/all/reward/total", "env/all/exact"


def curve_table(runs: dict[str, list[dict]], block: int) -> tuple[str, np.ndarray]:
    """The per-block table; also returns the per-seed block means ``[seeds, blocks]``."""
    reward = np.array([[r[REWARD] for r in rows] for rows in runs.values()])
    exact = np.array([[r.get(EXACT, 0.0) for r in rows] for rows in runs.values()])
    n = reward.shape[1]
    starts = range(0, n, block)
    rb = np.stack([reward[:, i : i + block].mean(1) for i in starts], 1)
    eb = np.stack([exact[:, i : i + block].mean(1) for i in starts], 1)
    rows = [
        [
            f"{i}-{min(i + block, n) - 1}",
            f"{rb[:, j].mean():.3f}",
            f"{rb[:, j].min():.3f}",
            f"{rb[:, j].max():.3f}",
            f"{eb[:, j].mean():.3f}",
        ]
        for j, i in enumerate(starts)
    ]
    header = ["steps", "reward (mean)", "min over seeds", "max over seeds", "exact (mean)"]
    return table(rows, header), rb


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--block", type=int, default=10, help="steps per row")
    args, rest = p.parse_known_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TINKER_API_KEY="tml-local", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "curve.json"
        cmd = [sys.executable, str(ROOT / "examples" / "cookbook_rl.py"), "--json", str(out)]
        cmd += ["--seeds", *map(str, args.seeds), "--steps", str(args.steps), *rest]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        wall = time.perf_counter() - t0
        runs = json.loads(out.read_text())
    text, rb = curve_table(runs, args.block)
    print(f"\ncookbook rl.train on jaxreg serve: {' '.join(sys.argv[1:]) or 'defaults'}")
    print(f"{len(runs)} seeds x {args.steps} steps in {wall:.0f} s ({wall / len(runs):.0f} s/seed)")
    print(text)
    rise = rb[:, -1] - rb[:, 0]
    print(
        f"last block - first block, per seed: {np.round(rise, 3).tolist()}; "
        f"last block's min over seeds {rb[:, -1].min():.3f} vs first block's max "
        f"{rb[:, 0].max():.3f}"
    )


if __name__ == "__main__":
    main()
