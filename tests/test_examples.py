"""The examples run and do what their docstrings say."""

import runpy
import sys
from pathlib import Path

import jax

EXAMPLES = Path(__file__).parents[1] / "examples"


def _run(name, capsys, monkeypatch, argv=()):
    """Runs an example as a user would: with JAX's standard dtype promotion."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with jax.numpy_dtype_promotion("standard"):
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_optax_regularize(capsys, monkeypatch):
    out = _run("optax_regularize.py", capsys, monkeypatch)
    first, last = out.splitlines()[0], out.splitlines()[-1]
    assert "weight 0.0e+00" in first and "weight 1.0e-03" in last  # the schedule ran
    assert float(last.split("mse ")[1].split()[0]) < 0.2


def test_multitask_upgrad(capsys, monkeypatch):
    out = _run("multitask_upgrad.py", capsys, monkeypatch)
    assert "compose compiled 1 time(s)" in out
    last = next(line for line in out.splitlines() if line.startswith("step 300"))
    losses = [float(v) for v in last.split()[3:8:2]]
    assert max(losses) < 0.05


def test_local_training(capsys, monkeypatch):
    out = _run("local_training.py", capsys, monkeypatch)
    assert "compiled 1 time(s) for 301 steps" in out


def test_remote_balance(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("remote_balance", EXAMPLES / "remote_balance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with jax.numpy_dtype_promotion("standard"):
        module.main(steps=6)
    out = capsys.readouterr().out
    assert "objective compiled 1 time(s) for 6 steps" in out
    last = out.splitlines()[-2]
    assert "kl: weight" in last and "share" in last


def test_tinker_sdk_loop(capsys):
    """The plain tinker SDK loop trains against the embedded service (a few steps)."""
    import importlib.util

    import pytest

    pytest.importorskip("tinker.proto.tinker_public_pb2")
    spec = importlib.util.spec_from_file_location(
        "tinker_sdk_loop", EXAMPLES / "tinker_sdk_loop.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with jax.numpy_dtype_promotion("standard"):
        module.main(sl_steps=3, rl_steps=1)
    out = capsys.readouterr().out
    nll = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("sl step")]
    assert len(nll) == 3 and nll[-1] < nll[0]
    assert "custom step" in out and "rl step   0" in out and "saved tinker://" in out
