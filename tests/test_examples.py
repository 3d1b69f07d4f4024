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
