"""The cookbook's rl.train, unmodified, over loopback HTTP: the reward rises (e2e).

Runs ``examples/cookbook_rl.py`` at reduced size (one seed, 50 steps instead of 80; about
1.5 minutes on 2 CPU cores) and asserts that the mean batch reward of the last 10 steps
is above that of the first 5 by a margin (0.05) well inside what every measured run
showed (0.077 to 0.198 over 7 seeds; benchmarks/RESULTS.md, "RL that learns"), with
no 404/409 from the service.
"""

import json
import math
import subprocess
import sys

import pytest
from cookbook_helpers import ROOT, example_env

pytest.importorskip("tinker_cookbook")
pytestmark = pytest.mark.e2e

STEPS, FIRST, LAST = 50, 5, 10  # steps run; steps averaged at the start and the end
MARGIN = 0.05  # reward is a fraction of positions right, in [0, 1]


def test_cookbook_rl_reward_rises(tmp_path):
    env = example_env(tmp_path, TQDM_DISABLE="1")
    out_json = tmp_path / "curve.json"
    cmd = [sys.executable, str(ROOT / "examples" / "cookbook_rl.py"), "--seeds", "0"]
    cmd += ["--steps", str(STEPS), "--json", str(out_json), "--log-dir", str(tmp_path / "log")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for code in ("404", "409"):
        assert f" {code} " not in text and f"status {code}" not in text.lower()
    rows = json.loads(out_json.read_text())["0"]
    reward = [r["env/all/reward/total"] for r in rows]
    assert len(reward) == STEPS and all(math.isfinite(x) and 0 <= x <= 1 for x in reward)
    assert [r["progress/batch"] for r in rows] == list(range(STEPS))
    first, last = sum(reward[:FIRST]) / FIRST, sum(reward[-LAST:]) / LAST
    assert last > first + MARGIN, (first, last, reward)
    # one progress line per step
    assert sum(f"seed 0 step {i:3d}" in out.stdout for i in range(STEPS)) == STEPS
