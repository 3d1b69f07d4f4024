"""Host terms, telemetry and guards."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_helpers import cpu_bound_l2

import jaxreg as jr

X = jnp.array([1.0, -2.0, 0.5, 3.0])


def nll(x, batch):
    return -jnp.sum(x), {"mean": -jnp.mean(x)}


def l2_host(x, batch, data):
    return float(np.sum(x**2)), {"norm": float(np.linalg.norm(x))}, 2.0 * x


async def l1_async(x, batch, data):
    await asyncio.sleep(0.01)
    return float(np.sum(np.abs(x))), {"n": float(len(data or []))}


def test_mixed_host_and_jax_terms_match_an_all_jax_reference():
    objective = jr.compose(
        jr.Term("nll", nll),
        [
            jr.HostTerm("l2", l2_host, weight=0.5, gradient=True, metrics=("norm",)),
            jr.HostTerm("l1", l1_async, weight=0.1),
            jr.Term("sq", lambda x, b: jnp.sum(x**3), weight=0.01),
        ],
        track_grad_norms=True,
    )
    out = objective(X, None, data=["a", "b"])
    x = np.asarray(X, np.float64)
    loss = -x.sum() + 0.5 * (x**2).sum() + 0.1 * np.abs(x).sum() + 0.01 * (x**3).sum()
    grad = -1.0 + 0.5 * 2 * x + 0.01 * 3 * x**2  # l1 has no gradient: left out of grad
    d = out.to_dict()
    assert d["loss_total"] == pytest.approx(loss, rel=1e-6)
    assert d["regularizer_total"] == pytest.approx(loss + x.sum(), rel=1e-6)
    np.testing.assert_allclose(np.asarray(out.grad), grad, rtol=1e-6)
    assert d["total_grad_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-6)
    assert d["regularizers"]["l1"]["differentiable"] is False
    assert d["regularizers"]["l1"]["custom"] == {"n": 2.0}  # got the raw data
    assert d["regularizers"]["l2"]["grad_norm"] == pytest.approx(2 * np.linalg.norm(x))
    assert d["regularizers"]["l2"]["custom"]["norm"] == pytest.approx(np.linalg.norm(x))
    assert list(d["regularizers"]) == ["l2", "l1", "sq"]  # the order given
    # New weights for host and JAX terms alike, no recompilation of the JAX part.
    out2 = objective(X, None, weights={"l2": 1.0, "sq": 0.0})
    assert out2.to_dict()["regularizers"]["l2"]["contribution"] == pytest.approx((x**2).sum())
    assert objective.trace_count == 1


def test_host_terms_run_concurrently():
    events, lock = [], threading.Lock()

    def make(i):
        def term(x, batch, data):
            with lock:
                events.append(("start", i))
            time.sleep(0.05)
            with lock:
                events.append(("end", i))
            return 0.0

        return jr.HostTerm(f"t{i}", term)

    async def coroutine(x, batch, data):
        with lock:
            events.append(("start", "async"))
        await asyncio.sleep(0.05)
        with lock:
            events.append(("end", "async"))
        return 0.0

    objective = jr.compose(nll, [make(i) for i in range(4)] + [jr.HostTerm("a", coroutine)])
    objective(X, None)
    first_end = next(k for k, (kind, _) in enumerate(events) if kind == "end")
    assert first_end == 5, events  # every term started before any finished


def test_in_jit_callback_runs_once_and_matches():
    calls = []

    def host(x, batch, data):
        calls.append(1)
        return float(np.sum(x**2)), {"norm": float(np.linalg.norm(x))}, 2.0 * x

    for strategy in ("per_term", "vmap"):
        objective = jr.compose(
            jr.Term("nll", nll),
            [jr.HostTerm("l2", host, weight=0.5, gradient=True, metrics=("norm",))],
            track_grad_norms=True,
            grad_strategy=strategy,
        )
        step = jax.jit(lambda x, objective=objective: objective(x, None))
        calls.clear()
        out = step(X)
        jax.block_until_ready(out)
        assert len(calls) == 1, strategy  # value and gradient from one host call
        np.testing.assert_allclose(np.asarray(out.grad), -1.0 + np.asarray(X), rtol=1e-6)
        assert float(out.regularizers["l2"].custom["norm"]) == pytest.approx(
            float(np.linalg.norm(X))
        )

    undeclared = jr.compose(nll, [jr.HostTerm("h", lambda x, b, d: (1.0, {"extra": 1.0}))])
    with pytest.raises(Exception, match="not declared"):
        jax.block_until_ready(jax.jit(lambda x: undeclared(x, None).loss_total)(X))


def _failing(x, batch, data):
    raise ConnectionError("validator unreachable")


def _hanging(x, batch, data):
    time.sleep(1.0)
    return 0.0


def _nan(x, batch, data):
    return float("nan")


@pytest.mark.parametrize(
    ("fn", "message"),
    [(_failing, "validator unreachable"), (_hanging, "timed out"), (_nan, "not finite")],
)
def test_failing_hanging_and_nan_terms(fn, message):
    raising = jr.compose(nll, [jr.HostTerm("bad", fn, timeout=0.2)])
    with pytest.raises(jr.HostTermError, match=f"HostTerm 'bad'.*{message}"):
        raising(X, None)
    skipping = jr.compose(
        nll,
        [
            jr.HostTerm("bad", fn, timeout=0.2, on_error="skip"),
            jr.HostTerm("ok", lambda x, b, d: 2.0, weight=0.5),
        ],
    )
    d = skipping(X, None).to_dict()
    assert d["loss_total"] == pytest.approx(-float(np.sum(X)) + 1.0)  # "bad" left out
    assert d["regularizers"]["bad"]["custom"]["failed"] == 1.0
    assert d["regularizers"]["bad"]["contribution"] == 0.0
    assert d["regularizers"]["ok"]["custom"] == {}  # on_error="raise": no failed metric
    assert message in d["errors"]["bad"]


def test_process_executor():
    objective = jr.compose(
        nll,
        [
            jr.HostTerm(
                "l2", cpu_bound_l2, weight=0.5, gradient=True, executor="process", timeout=120
            )
        ],
    )
    out = objective(X, None)
    np.testing.assert_allclose(np.asarray(out.grad), -1.0 + np.asarray(X), rtol=1e-6)


def test_limits_and_validation():
    with pytest.raises(jr.TermError, match="timeout must be in"):
        jr.HostTerm("h", _nan, timeout=301)
    with pytest.raises(jr.TermError, match="on_error"):
        jr.HostTerm("h", _nan, on_error="ignore")
    with pytest.raises(jr.TermError, match="grad_conflicts"):
        jr.compose(nll, [jr.HostTerm("h", _nan)], grad_conflicts=True)
    with pytest.raises(jr.TermError, match="at most 100"):
        jr.compose(nll, [jr.HostTerm(f"h{i}", _nan) for i in range(101)])
    wrong = jr.compose(nll, [jr.HostTerm("h", lambda x, b, d: (1.0, {}), gradient=True)])
    with pytest.raises(jr.HostTermError, match=r"\(value, metrics, grad\)"):
        wrong(X, None)


def test_check_finite_names_term_and_where():
    bad_value = jr.compose(nll, [jr.Term("log", lambda x, b: jnp.log(x[1]))], check_finite=True)
    with pytest.raises(jr.NonFiniteError, match="term 'log' \\(value\\)") as e:
        bad_value(X, None)
    assert e.value.where == {"log": "value"}
    bad_grad = jr.compose(
        nll,
        [jr.Term("sqrt", lambda x, b: jnp.sqrt(jnp.abs(x[0] - 1.0)))],
        track_grad_norms=True,
        check_finite=True,
    )
    with pytest.raises(jr.NonFiniteError, match="term 'sqrt' \\(gradient\\)"):
        bad_grad(X, None)
    jr.compose(nll, check_finite=True)(X, None)  # finite: no error


def test_telemetry_events_and_a_raising_handler(caplog, tmp_path):
    received = []
    jr.telemetry.attach(
        "collect", jr.telemetry.EVENTS, lambda e, m, md: received.append((e, m, md))
    )
    jr.telemetry.attach("broken", [("jaxreg", "compose", "stop")], lambda e, m, md: 1 / 0)
    objective = jr.compose(
        jr.Term("nll", nll),
        [
            jr.HostTerm("l2", l2_host, 0.5, gradient=True),
            jr.HostTerm("bad", _failing, on_error="skip"),
        ],
        track_grad_norms=True,
    )
    try:
        with (
            caplog.at_level(logging.WARNING, logger="jaxreg.telemetry"),
            jr.telemetry.JSONLinesWriter(tmp_path / "events.jsonl"),
        ):
            out = objective(X, None)  # the broken handler does not break the step
            objective(X, None)
    finally:
        jr.telemetry.detach("collect")
    assert "broken" not in jr.telemetry.handlers()
    assert any("detached" in r.message for r in caplog.records)
    names = [e for e, _, _ in received]
    assert names.count(("jaxreg", "compose", "start")) == 2
    stop = next(m for e, m, _ in received if e == ("jaxreg", "compose", "stop"))
    d = out.to_dict()
    assert stop["loss_total"] == d["loss_total"] and stop["duration"] > 0
    assert stop["total_grad_norm"] == d["total_grad_norm"]
    terms = {md["name"]: m for e, m, md in received if e == ("jaxreg", "term", "stop")}
    assert terms["l2"]["grad_norm"] == d["regularizers"]["l2"]["grad_norm"]
    assert terms["nll"]["value"] == d["base_loss"]["value"]
    failures = [md for e, _, md in received if e == ("jaxreg", "term", "exception")]
    assert failures and failures[0]["name"] == "bad" and "unreachable" in failures[0]["error"]
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["event"] == "jaxreg/compose/start"


def test_remote_request_event(server, client):
    seen = []
    jr.telemetry.attach(
        "remote", [("jaxreg", "remote", "request", "stop")], lambda e, m, md: seen.append((m, md))
    )
    try:
        client.create_model()
    finally:
        jr.telemetry.detach("remote")
    endpoints = [md["endpoint"] for _, md in seen]
    assert endpoints[0] == "create_model" and "retrieve_future" in endpoints
    m = seen[0][0]
    assert m["latency"] > 0 and m["bytes_sent"] > 0 and m["bytes_received"] > 0


def test_timed_out_threads_free_their_slot():
    """40 hung calls (more than the old pool of 32) do not make an instant term time out."""
    release = threading.Event()

    def hung(x, batch, data):
        release.wait(30)
        return 0.0

    try:
        hanging = jr.compose(nll, [jr.HostTerm("hung", hung, timeout=0.05, on_error="skip")])
        for _ in range(40):
            assert "timed out" in hanging(X, None).to_dict()["errors"]["hung"]
        instant = jr.compose(nll, [jr.HostTerm("instant", lambda x, b, d: 1.5, timeout=2.0)])
        d = instant(X, None).to_dict()
        assert d["regularizers"]["instant"]["value"] == 1.5
        assert "errors" not in d or not d["errors"]
    finally:
        release.set()


def test_a_hung_host_term_does_not_delay_exit(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "hang.py"
    script.write_text(
        "import time, jax.numpy as jnp, jaxreg as jr\n"
        "def hung(x, b, d):\n"
        "    time.sleep(120)\n"
        "    return 0.0\n"
        "o = jr.compose(lambda x, b: jnp.sum(x), [jr.HostTerm('h', hung, timeout=0.2,"
        " on_error='skip')])\n"
        "print(o(jnp.ones(3), None).to_dict()['errors'])\n"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert "timed out" in out.stdout
    assert time.monotonic() - started < 60  # not the term's 120 s


def test_every_user_term_error_names_the_term():
    def forgot_return(x, batch):
        jnp.sum(x)

    def raises(x, batch):
        raise ValueError("bad shape somewhere")

    with pytest.raises(jr.TermError, match=r"Term 'forgot'.*returned None"):
        jr.compose(nll, [jr.Term("forgot", forgot_return)])(X, None)
    with pytest.raises(ValueError, match="bad shape") as e:  # keeps its type
        jr.compose(nll, [jr.Term("raiser", raises)])(X, None)
    assert any("'raiser'" in note for note in e.value.__notes__)
    with pytest.raises(jr.HostTermError, match=r"HostTerm 'none'.*returned None"):
        jr.compose(nll, [jr.HostTerm("none", lambda x, b, d: None)])(X, None)
