"""The examples run and do what their docstrings say."""

import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _f64(tree):
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def test_flax_nnx_classifier(capsys):
    """The nnx MLP learns; the L2 term read the kernels alone (no biases, no BatchNorm
    parameters or statistics), and the running statistics were threaded through."""
    nnx = pytest.importorskip("flax.nnx")
    module = _load("flax_nnx_classifier.py")
    with jax.numpy_dtype_promotion("standard"):
        result = module.main(steps=60, log_every=20)
    out = capsys.readouterr().out
    assert "objective compiled 1 time(s) for 60 steps" in out
    first, last = result["first"], result["last"]
    assert float(last.terms["ce"].value) < 0.5 * float(first.terms["ce"].value)
    assert result["test_accuracy"] > 0.75  # 4 classes; 10% of the labels are noise
    kernels = [a for a in _f64(result["evaluated_params"]) if a.ndim == 2]
    assert len(kernels) == 2  # fc1 and fc2; no bias, no BatchNorm scale, no statistics
    l2_ref = sum(np.sum(a**2) for a in kernels)
    assert float(last.terms["l2"].value) == pytest.approx(l2_ref, rel=1e-5)
    entropy = float(last.terms["entropy"].custom["mean"])
    assert float(last.terms["entropy"].value) == -entropy and 0 < entropy < np.log(4)
    model = result["model"]
    assert model.bn.use_running_average is False  # nnx.update left the model trainable
    np.testing.assert_array_equal(model.bn.mean[...], result["stats"]["bn"]["mean"][...])
    assert np.max(np.abs(model.bn.mean[...])) > 0.1  # moved from its initial zeros
    assert isinstance(model.bn.mean, nnx.BatchStat)


def test_flax_nnx_batch_stats_follow_the_training_forward():
    """``out.aux``: BatchNorm's momentum update from the batch, float64 reference."""
    nnx = pytest.importorskip("flax.nnx")
    module = _load("flax_nnx_classifier.py")
    model = module.MLP(16, 64, 4, rngs=nnx.Rngs(0))  # the shapes of the example: cached
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x, y = module.make_data(0, 32)
    batch = {"x": x, "y": y, "stats": stats, "key": jax.random.key(1)}
    with jax.numpy_dtype_promotion("standard"):
        new = module.make_objective(graphdef)(params, batch).aux
    w, b = _f64(model.fc1.kernel[...]), _f64(model.fc1.bias[...])
    h = np.asarray(x, np.float64) @ w[0] + b[0]
    np.testing.assert_allclose(new["bn"]["mean"][...], 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["bn"]["var"][...], 0.9 + 0.1 * h.var(0), rtol=1e-4)
    np.testing.assert_array_equal(stats["bn"]["var"][...], np.ones(64))  # inputs untouched


def test_equinox_regression(capsys):
    """L2-SP fine-tuning of an eqx.nn.MLP: the reported penalty and gradient match a
    hand-written float64 reference, and L2-SP keeps the model near its pre-training."""
    eqx = pytest.importorskip("equinox")
    module = _load("equinox_regression.py")
    with jax.numpy_dtype_promotion("standard"):
        result = module.main(200, 150)
    out = capsys.readouterr().out
    assert "fine-tuning objective compiled 1 time(s) for 2 runs" in out
    runs, pretrained = result["runs"], result["pretrained"]
    reg, free = runs["l2-sp"], runs["no-reg"]
    for run in (reg, free):
        assert float(run["last"].terms["mse"].value) < 0.5 * float(run["first"].terms["mse"].value)

    def distance(params):
        pairs = zip(_f64(params), _f64(pretrained), strict=True)
        return sum(np.sum((a - b) ** 2) for a, b in pairs)

    last = reg["last"]
    assert float(last.terms["l2_sp"].value) == pytest.approx(
        distance(reg["evaluated_params"]), rel=1e-5
    )
    assert float(free["last"].terms["l2_sp"].weight) == 0.0
    assert distance(reg["params"]) < 0.1 * distance(free["params"])
    assert reg["test_mse"] < free["test_mse"]

    # The total gradient, against jax.grad of the loss written out by hand.
    static, batch, weight = result["static"], result["batch"], 1e-2

    def loss(p):
        pred = jax.vmap(eqx.combine(p, static))(batch["x"])
        pairs = zip(jax.tree.leaves(p), jax.tree.leaves(pretrained), strict=True)
        sp = sum(jnp.sum((a - b) ** 2) for a, b in pairs)
        return jnp.mean((pred - batch["y"]) ** 2) + weight * sp

    with jax.numpy_dtype_promotion("standard"):
        ref = jax.jit(jax.grad(loss))(reg["evaluated_params"])
    for got, want in zip(jax.tree.leaves(last.grad), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_multitask_aggregators(tmp_path, capsys):
    """The side-by-side example (shortened): the plot is written, the cosines it logs
    match a float64 NumPy computation, UPGrad and MGDA never step against a task while
    the mean does, and every method lowers the losses."""
    module = _load("multitask_aggregators.py")
    png = tmp_path / "plot.png"
    argv = ["--steps", "60", "--out", str(png), "--aggregators", "mean", "MGDA", "UPGrad"]
    with jax.numpy_dtype_promotion("standard"):
        histories = module.main(argv)
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000 and f"wrote {png}" in out
    assert list(histories) == ["mean", "MGDA", "UPGrad"]
    assert all(label in out for label in histories)

    # Step 0 is the same model for every method: its cosines from per-task jax.grad.
    k_data, k_params = jax.random.split(jax.random.key(0))
    batch, params = module.make_data(k_data), module.init_params(k_params)
    grads = []
    for i in range(module.TASKS):
        with jax.numpy_dtype_promotion("standard"):
            g = jax.grad(module.task(i).fn)(params, batch)
        grads.append(np.concatenate([np.ravel(a).astype(np.float64) for a in jax.tree.leaves(g)]))
    j = np.stack(grads)
    unit = j / np.linalg.norm(j, axis=1, keepdims=True)
    cos = unit @ unit.T
    pairwise = np.min(cos[~np.eye(module.TASKS, dtype=bool)])
    mean_dir = j.mean(0)
    worst_mean = np.min(unit @ mean_dir) / np.linalg.norm(mean_dir)
    for losses, pair, _ in histories.values():
        np.testing.assert_allclose(pair[0], pairwise, atol=1e-5)
        assert np.all(losses[-1] < losses[0])  # every task improved in 60 steps
    np.testing.assert_allclose(histories["mean"][2][0], worst_mean, atol=1e-5)
    assert histories["mean"][2].min() < -0.02  # later, the mean steps against a task
    for label in ("MGDA", "UPGrad"):
        assert histories[label][2].min() > -1e-4, label  # non-conflicting, to float32
