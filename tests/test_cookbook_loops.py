"""The cookbook's supervised.train, unmodified, over loopback HTTP (e2e)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("tinker_cookbook")
pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cookbook_supervised_train(tmp_path):
    env = dict(
        os.environ,
        TINKER_API_KEY="tml-local",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "hub"),
        PYTHONPATH=str(ROOT),
    )
    log = tmp_path / "log"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cookbook_sl.py"), str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Training completed successfully" in text
    for code in ("404", "409"):
        assert f" {code} " not in text and f"status {code}" not in text.lower()
    rows = [json.loads(x) for x in (log / "metrics.jsonl").read_text().splitlines()]
    nll = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]
    assert len(nll) == 4 and all(math.isfinite(x) for x in nll)
    assert len(set(nll)) > 1  # metrics move
    assert (log / "checkpoints.jsonl").read_text().count("tinker://") >= 2
