"""The command line: ``jaxreg demo`` end to end (small) and ``jaxreg serve``."""

import json
import os
import re
import signal
import subprocess
import sys

import httpx

from jaxreg.cli import main


def test_demo_runs_end_to_end_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "demo",
        "--steps",
        "4",
        "--kl-weights",
        "0",
        "1",
        "--batch",
        "4",
        "--replay",
        "2",
        "--eval-every",
        "2",
        "--eval-size",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "|grad| (logits)" in text and "|grad| (params)" in text and "KL weight sweep" in text
    compiles = int(re.search(r"objective compiled (\d+) time\(s\) for 8 steps", text).group(1))
    assert 1 <= compiles <= 2  # once per length bucket the small batches fall into
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8
    first = records[0]
    assert {
        "loss:sum",
        "surrogate_loss:sum",
        "regularizers/kl/grad_norm",
        "total_grad_norm",
        "param/kl/grad_norm",
        "param/total_grad_norm",
        "param/cos/nll/kl",
    } <= set(first)
    assert set(first["grad_cosines"]) == {"nll", "kl", "entropy", "confidence"}
    assert records[1]["eval"]["step"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [r["kl_weight"] for r in summary["runs"]] == [0.0, 1.0]
    assert summary["runs"][0]["final"]["grad_space"] == "logits"
    assert summary["runs"][0]["final_params"]["space"] == "parameters"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_starts_answers_and_stops_gracefully(tmp_path):
    env = {**os.environ, "JAXREG_API_KEY": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxreg",
            "serve",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "jaxreg service on http://127.0.0.1:" in line, line
        url = line.split()[3]
        assert httpx.get(f"{url}/api/v1/healthz", timeout=30).json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "jaxreg service stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_demo_through_the_tinker_sdk_matches_the_native_client(tmp_path, capsys):
    """``jaxreg demo --sdk tinker``: the same figures through the unmodified official SDK."""
    import pytest

    pytest.importorskip("tinker.proto.tinker_public_pb2")
    args = ["--steps", "2", "--kl-weights", "0.3", "--batch", "2", "--replay", "1"]
    args += ["--eval-every", "2", "--eval-size", "8", "--no-progress"]
    runs = {}
    # Parameter-space diagnostics (a jaxreg-service extension the SDK cannot send) off on
    # both sides: the native run would otherwise compute its update in another program.
    args += ["--diagnose-every", "0"]
    for sdk in ("jaxreg", "tinker"):
        assert main(["demo", *args, "--out", str(tmp_path / sdk), "--sdk", sdk]) == 0
        runs[sdk] = [
            json.loads(line) for line in (tmp_path / sdk / "metrics.jsonl").read_text().splitlines()
        ]
    capsys.readouterr()
    assert len(runs["tinker"]) == len(runs["jaxreg"]) == 2
    for native, sdk in zip(runs["jaxreg"], runs["tinker"], strict=True):
        assert native.keys() == sdk.keys()
        for key, value in native.items():
            if isinstance(value, float):
                assert sdk[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        assert sdk.get("eval") == native.get("eval")
