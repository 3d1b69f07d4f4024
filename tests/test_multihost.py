"""jaxreg under multi-controller JAX: 2 processes on loopback equal one process.

tests/multihost_worker.py runs the same steps (compose with norms, term_grads and
cosines; check_finite with injected NaN/inf; a host term; Batch helpers; the model stage
with replicated parameters; an optax step with an aggregator and ``regularize``) as a
single process on the whole batch and as 2 ``jax.distributed`` processes of 2 CPU devices
each (gloo collectives), each feeding its own rows. The results, gathered whole, must
agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp: Path, nproc: int, ndev: int) -> list[dict]:
    """Runs ``nproc`` workers (``ndev`` devices each); kills all of them on any failure."""
    out = tmp / f"run{nproc}"
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent), "JAX_PLATFORMS": "cpu"}
    port = _free_port() if nproc > 1 else 0
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(nproc), str(port), str(ndev), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(nproc)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"multihost workers did not finish in {TIMEOUT}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} of {nproc} failed:\n{logs[i][-4000:]}"
    return [json.loads(Path(f"{out}.{i}.json").read_text()) for i in range(nproc)]


def _numbers(tree) -> np.ndarray:
    if isinstance(tree, dict):
        return np.concatenate([_numbers(tree[k]) for k in sorted(tree)] or [np.zeros(0)])
    if isinstance(tree, list):
        return np.concatenate([_numbers(v) for v in tree] or [np.zeros(0)])
    if isinstance(tree, str):
        return np.zeros(0)
    return np.asarray([float(tree)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    return _run(tmp, 1, 1)[0], _run(tmp, 2, 2)


COMPARED = [
    "compose", "compose_flat", "compose_grad", "compose_term_grads", "compose_2",
    "untraced", "check_finite_ok", "host", "host_grad", "lengths", "unpad",
    "model", "model_grad", "model_term_grads", "optax_losses", "optax_params",
    "optax_metrics",
]  # fmt: skip


@pytest.mark.e2e
def test_two_processes_equal_one(runs):
    ref, (p0, p1) = runs
    assert (ref["process_count"], ref["devices"]) == (1, 1)
    assert (p0["process_count"], p0["devices"]) == (2, 4)
    for key in COMPARED:
        a, b, c = _numbers(ref[key]), _numbers(p0[key]), _numbers(p1[key])
        assert a.shape == b.shape, key
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=key)
        np.testing.assert_array_equal(b, c, err_msg=key)  # every process reads the same
    # the same keys and schema, not just the same numbers
    assert p0["compose"].keys() == ref["compose"].keys()
    for field in ("value", "contribution", "grad_norm"):
        assert p0["host"]["regularizers"]["cube"][field] == pytest.approx(
            ref["host"]["regularizers"]["cube"][field], rel=1e-5
        )
    assert p0["host"]["regularizers"]["cube"]["custom"]["rows"] == 8.0  # the whole batch
    assert p0["model_grad_replicated"]
    assert p0["compose_repr"].splitlines()[1:] == ref["compose_repr"].splitlines()[1:]


@pytest.mark.e2e
def test_check_finite_across_processes(runs):
    ref, (p0, p1) = runs
    for r in (ref, p0, p1):
        for key in ("nan_norms", "nan_plain"):
            assert r[key]["where"]["kl"] == "value", (key, r[key])
            assert r[key]["where"] == ref[key]["where"]
        assert r["inf_grad"] is not None and "the gradient of loss_total" in r["inf_grad"]


@pytest.mark.e2e
def test_one_trace_per_program(runs):
    ref, (p0, _) = runs
    for r in (ref, p0):
        assert r["compose_traces"] == r["compose_traces_first"]  # 2nd call: none
        assert r["optax_traces"] == 1  # opt.init's state does not retrace the first step
        # Not asserted: the step still compiles twice (traces once) across processes, the
        # second time for other input shardings; recorded in r["optax_compiles"].


@pytest.mark.e2e
def test_concatenated_output_refused(runs):
    _, (p0, p1) = runs
    for r in (p0, p1):
        message = r["shard_map_refused"]
        assert message is not None and "64 entries" in message and "has 16" in message
        assert "out_specs=P()" in message
