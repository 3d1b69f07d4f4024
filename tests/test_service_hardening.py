"""The service under bad input, load and faults: every finding of issue 14, reproduced.

Each test sends what broke the service before (over real loopback HTTP) and checks the
clear refusal and that nothing changed.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from service_helpers import assert_trees_equal, datums, params_of

import jaxreg as jr
from jaxreg._src.remote.wire import Datum
from jaxreg.service import Engine, create_server, start
from jaxreg.service import model as model_lib
from jaxreg.service.limits import Limits, work_bytes
from jaxreg.service.scheduler import Scheduler
from jaxreg.service.server import _is_loopback

RemoteError = jr.remote.RemoteError
ADAM = {"learning_rate": 1e-3}
LIMITS = Limits(
    memory_bytes=256 << 20,
    max_tokens=1 << 14,
    max_models=6,
    model_ttl_s=None,
    seq_wait_s=1.0,
    max_seq_ahead=100,
)


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A service with small limits (256 MiB of work, 6 models, 1 s wait for a gap)."""
    srv = start(state_dir=tmp_path_factory.mktemp("limited"), limits=LIMITS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def limited_client(limited):
    with jr.remote.ServiceClient(limited.url) as c:
        yield c


def _raw(url: str, endpoint: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=url, timeout=120) as http:
        return http.post(f"/api/v1/{endpoint}", content=content, **kw)


def _tokens_datum(b: int, t: int, k: int = 0) -> list[Datum]:
    shape = (t, k) if k else (t,)
    return [
        Datum(
            np.full(t, 5, np.int64),
            {"target_tokens": np.full(shape, 6, np.int64), "weights": np.ones(shape, np.float32)},
        )
        for _ in range(b)
    ]


# ------------------------------------------------------------------ 1. memory


def test_oversize_work_gets_413_naming_limit_and_size(limited_client):
    training = limited_client.create_model()
    try:
        with pytest.raises(RemoteError) as e:
            training.forward(_tokens_datum(8, 1024))
        assert e.value.status == 413
        assert "256 MiB" in str(e.value) and "[8, 1024]" in str(e.value)
        # K targets per token count towards the token limit: 100 x 200 > 2^14.
        with pytest.raises(RemoteError, match="token-targets") as e:
            training.forward(_tokens_datum(1, 100, k=200))
        assert e.value.status == 413
        # Within both limits it runs.
        out = training.forward(_tokens_datum(2, 20, k=3)).result()
        assert out["loss_fn_outputs"][0]["logprobs"].shape == (20, 3)
    finally:
        limited_client.post("delete_model", {"model_id": training.model_id})


@pytest.mark.parametrize(("b", "t", "k", "backward"), [(2, 128, 1, False), (2, 128, 1, True)])
def test_work_estimate_bounds_xla_memory_analysis(server, b, t, k, backward):
    """The estimate is at least what XLA itself allocates for the padded program."""
    cfg = server.engine.config
    params = server.engine._base_params

    def loss(p, tokens, targets):
        return jnp.sum(model_lib.token_logprobs(cfg, p, tokens, targets))

    fn = jax.value_and_grad(loss) if backward else loss
    tokens = jnp.zeros((b, t), jnp.int32)
    compiled = jax.jit(fn).lower(params, tokens, tokens).compile()
    analysis = compiled.memory_analysis()
    xla = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    estimate = work_bytes(cfg, b, t, k, backward)
    assert xla <= estimate <= 4 * xla + (4 << 20), (xla, estimate)


def test_scheduler_runs_lanes_side_by_side_within_the_budget():
    sched = Scheduler(workers=3, memory_bytes=100, starve_s=60)
    gate, events, lock = threading.Event(), [], threading.Lock()

    def job(name, wait=False):
        def run():
            if wait:
                gate.wait(10)
            with lock:
                events.append(name)

        return run

    try:
        sched.put("a", job("a1-large", wait=True), cost=60)
        sched.put("a", job("a2"), cost=1)  # same lane: only after a1
        sched.put("b", job("b1-large"), cost=60)  # does not fit beside a1: waits
        sched.put("c", job("c1-small"), cost=10)  # fits: overtakes
        deadline = time.monotonic() + 5
        while "c1-small" not in events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events == ["c1-small"]
        assert sched.peak_used <= 100
        gate.set()
    finally:
        gate.set()
        sched.close()
    assert events.index("a1-large") < events.index("a2")
    assert set(events) == {"a1-large", "a2", "b1-large", "c1-small"}
    assert sched.peak_used <= 100
    with pytest.raises(ValueError, match="exceeds the memory budget"):
        Scheduler(1, 10).put("x", job("x"), cost=11)


def test_one_models_large_request_does_not_block_anothers_small_one(limited_client):
    small = limited_client.create_model()
    large = limited_client.create_model()
    try:
        data = datums("C", 1)
        small.forward(data).result()  # compiled before the race
        # A new shape: compiling and running it takes seconds.
        slow = large.forward_backward(_tokens_datum(1, 512))
        t0 = time.monotonic()
        small.forward(data).result()
        fast_s = time.monotonic() - t0
        pending = limited_client.post(
            "retrieve_future", {"request_id": slow.request_id, "timeout": 0}
        )
        assert pending["type"] == "try_again", fast_s  # the large one is still running
        slow.result(timeout=120)
    finally:
        for t in (small, large):
            limited_client.post("delete_model", {"model_id": t.model_id})


def test_healthz_answers_while_a_large_body_is_parsed(server):
    tokens = list(range(1, 31)) * 40_000  # a 1.2M-token datum: ~4 MB of JSON numbers
    body = {
        "model_id": "model-none",
        "forward_input": {
            "data": [{"model_input": {"chunks": [{"tokens": tokens}]}, "loss_fn_inputs": {}}] * 3
        },
    }
    content = json.dumps(body).encode()
    latencies, done = [], threading.Event()

    def poll():
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not done.is_set():
                t0 = time.perf_counter()
                assert http.get("/api/v1/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(0.2)
        t0 = time.perf_counter()
        r = _raw(server.url, "forward", content)
        big_s = time.perf_counter() - t0
    finally:
        done.set()
        poller.join()
    assert r.status_code == 404  # parsed, then refused: unknown model
    assert big_s > 0.5 and max(latencies) < min(0.5, big_s / 2), (big_s, max(latencies))


# ------------------------------------------------------------------ 2. poisoned state


def test_non_finite_loss_or_update_fails_and_changes_nothing(server, client):
    data = datums("I", 2, seed=30)
    reference = client.create_model()
    reference.forward_backward(data).result()
    reference.optim_step(ADAM).result()

    training = client.create_model()
    training.forward_backward(data).result()
    huge = [d.replace_inputs(weights=np.full(len(d.tokens), 3e38, np.float32)) for d in data]
    for call in (training.forward_backward, training.forward):
        with pytest.raises(RemoteError, match="not finite") as e:
            call(huge).result()
        assert e.value.category == "user" and e.value.seq_id is not None
    training.optim_step(ADAM).result()
    assert_trees_equal(
        params_of(training, server, "inf_after")[0], params_of(reference, server, "inf_ref")[0]
    )
    # An update that overflows float32 is not applied either.
    before, meta = params_of(training, server, "overflow_before")
    training.forward_backward(data).result()
    overflow = {"learning_rate": 3e38, "weight_decay": 1.0, "beta1": 0.0, "beta2": 0.0}
    with pytest.raises(RemoteError, match="update is not finite"):
        training.optim_step(overflow).result()
    after, meta_after = params_of(training, server, "overflow_after")
    assert_trees_equal(after, before)
    assert meta_after["n_accumulated"] == 1 and meta_after["step"] == meta["step"]
    out = training.forward(data).result()  # still serves, with finite numbers
    assert np.isfinite(out["metrics"]["loss:sum"])


# ------------------------------------------------------------------ 3. lifecycle


def test_model_limit_delete_and_idle_ttl(limited, limited_client):
    engine = limited.engine
    made = [limited_client.create_model() for _ in range(LIMITS.max_models - engine.n_models())]
    with pytest.raises(RemoteError, match="maximum of 6 models") as e:
        limited_client.create_model()
    assert e.value.status == 409
    assert limited_client.post("delete_model", {"model_id": made[0].model_id})["type"] == (
        "delete_model"
    )
    with pytest.raises(RemoteError, match="unknown model") as e:
        made[0].forward(datums("C", 1))
    assert e.value.status == 404
    made[0] = limited_client.create_model()  # the freed place is usable
    made[0].delete()  # the client's own method
    made[0] = limited_client.create_model()
    # Idle models are deleted once their TTL has passed (a housekeeping pass "later").
    engine.limits = dataclasses.replace(engine.limits, model_ttl_s=60.0)
    try:
        engine.reap(now=time.monotonic() + 30)
        assert engine.n_models() == LIMITS.max_models
        engine.reap(now=time.monotonic() + 61)
        assert engine.n_models() == 0
    finally:
        engine.limits = LIMITS
    with pytest.raises(RemoteError, match="unknown model"):
        made[1].get_info()


# ------------------------------------------------------------------ 4. ordering


def test_seq_id_range_and_reuse_for_another_kind(server, client):
    training = client.create_model()
    data = datums("C", 1)
    for seq in (10**18, 2**80, 100_000):
        r = _raw(
            server.url,
            "forward",
            {
                "model_id": training.model_id,
                "seq_id": seq,
                "forward_input": {"data": [d.to_json() for d in data]},
            },
        )
        assert r.status_code == 400 and "seq_id" in r.json()["error"], (seq, r.text)
    training.forward_backward(data, seq_id=0).result()
    with pytest.raises(RemoteError, match="already used by a forward_backward") as e:
        training.optim_step(ADAM, seq_id=0)
    assert e.value.status == 409
    info = training.get_info()
    assert info["step"] == 0 and info["type"] == "get_info"
    # The same kind is a retry: it answers with the first request's id.
    first = training.forward(data, seq_id=1)
    assert training.forward(data, seq_id=1).request_id == first.request_id


def test_waiting_for_a_missing_predecessor_times_out(limited_client):
    training = limited_client.create_model()
    try:
        data = datums("C", 1)
        late = training.forward(data, seq_id=2)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"predecessor\(s\) seq_id 0, 1") as e:
            late.result(timeout=30)
        assert LIMITS.seq_wait_s <= time.monotonic() - t0 < 10
        assert e.value.seq_id == 2
        # A request without a seq_id goes after the gap: it fails too, not forever.
        body = {"model_id": training.model_id, "forward_input": {"data": [data[0].to_json()]}}
        rid = limited_client.post("forward", body)["request_id"]
        with pytest.raises(RemoteError, match="never arrived"):
            limited_client.wait("forward", body, rid, timeout=30)
        # Releasing the gap lets the model go on (seq_ids 2 and 3 count as used).
        training.skip_seq(0).result(timeout=10)
        training.skip_seq(1).result(timeout=10)
        assert training.forward(data, seq_id=4).result(timeout=10)["type"] == "forward"
    finally:
        limited_client.post("delete_model", {"model_id": training.model_id})


# ------------------------------------------------------------------ 5. malformed bodies


def _bad_bodies(model_id: str, request_id: str):
    good = datums("I", 1)[0]
    t = len(good.tokens)
    datum = good.to_json()

    def fb(**fields):
        return {
            "model_id": model_id,
            "seq_id": 1,
            "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy", **fields},
        }

    def with_datum(**changes):
        d = json.loads(json.dumps(datum))
        for path, value in changes.items():
            node = d
            *parents, last = path.split(".")
            for p in parents:
                node = node[p]
            node[last] = value
        return {**fb(), "forward_backward_input": {"data": [d]}}

    tokens = good.tokens.tolist()
    deep = b'{"model_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return [
        ("forward_backward", fb(loss_fn=["cross_entropy"]), 400, "loss_fn"),
        ("forward_backward", fb(loss_fn={"a": 1}), 400, "loss_fn"),
        ("forward_backward", fb(loss_fn_config="abc"), 400, "loss_fn_config"),
        ("forward_backward", fb(loss_fn_config=[1]), 400, "loss_fn_config"),
        ("forward_backward", fb(loss_fn_config=5), 400, "loss_fn_config"),
        (
            "forward_backward",
            with_datum(**{"loss_fn_inputs.weights.dtype": ["float32"]}),
            400,
            "weights.dtype",
        ),
        (
            "forward_backward",
            with_datum(**{"loss_fn_inputs.weights.dtype": {"f": 32}}),
            400,
            "weights.dtype",
        ),
        (
            "forward_backward",
            with_datum(**{"model_input.chunks": [{"tokens": [*tokens[:-1], 2**63]}]}),
            400,
            "model_input",
        ),
        (
            "forward_backward",
            with_datum(**{"model_input.chunks": [{"tokens": [-(2**63) - 1] * t}]}),
            400,
            "model_input",
        ),
        (
            "forward_backward",
            with_datum(**{"loss_fn_inputs.target_tokens": {"data": [2**64] * t, "dtype": "int64"}}),
            400,
            "target_tokens",
        ),
        ("forward_backward", deep, 400, "nested too deeply"),
        ("forward_backward", {**fb(), "forward_only": "no"}, 400, "forward_only"),
        ("forward_backward", {**fb(), "tensor_encoding": ["json"]}, 400, "tensor_encoding"),
        ("forward_backward", {**fb(), "seq_id": 10**400}, 400, "seq_id"),
        ("forward_backward", {**fb(), "seq_id": 1.5}, 400, "seq_id"),
        (
            "optim_step",
            {"model_id": model_id, "adam_params": {"learning_rate": 10**400}},
            400,
            "learning_rate",
        ),
        ("optim_step", {"model_id": model_id, "adam_params": {"eps": 1e39}}, 400, "eps"),
        ("optim_step", {"model_id": model_id, "adam_params": [1]}, 400, "adam_params"),
        ("save_state", {"model_id": model_id, "path": "ckpt\n"}, 400, "path"),
        ("save_state", {"model_id": model_id, "path": {"a": 1}}, 400, "path"),
        ("create_model", b'{"base_model": ' + b"9" * 5000 + b"}", 400, "JSON"),
        ("create_model", {"base_model": [1] * 3}, 400, "base_model"),
        ("get_info", {"model_id": [model_id]}, 404, "model_id"),
        ("retrieve_future", {"request_id": request_id, "timeout": float("nan")}, 400, "timeout"),
        ("retrieve_future", {"request_id": request_id, "timeout": -1}, 400, "timeout"),
        ("retrieve_future", {"request_id": {"x": 1}}, 404, "request_id"),
    ]


def test_malformed_bodies_get_4xx_naming_the_field_and_change_nothing(server, client):
    data = datums("I", 2, seed=31)
    reference = client.create_model()
    reference.forward_backward(data, seq_id=0).result()
    reference.optim_step(ADAM, seq_id=1).result()
    training = client.create_model()
    request_id = training.forward_backward(data, seq_id=0).request_id
    failures = []
    for endpoint, body, status, field in _bad_bodies(training.model_id, request_id):
        r = _raw(server.url, endpoint, body)
        error = (
            r.json().get("error", "")
            if r.headers.get("content-type", "").startswith("application/json")
            else r.text
        )
        if r.status_code != status or field not in error:
            failures.append((endpoint, str(body)[:80], r.status_code, error[:200]))
    assert not failures, failures
    assert training.get_info()["step"] == 0
    training.optim_step(ADAM, seq_id=1).result()
    assert_trees_equal(
        params_of(training, server, "bad2_after")[0], params_of(reference, server, "bad2_ref")[0]
    )


# ------------------------------------------------------------------ 7. restarts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_outlasts_a_service_restart(tmp_path):
    port = _free_port()
    first = start(port=port, state_dir=tmp_path)
    first.stop()
    restarted: list = []

    def restart():
        time.sleep(5.0)  # longer than the old client's whole retry budget (~3.2 s)
        restarted.append(start(port=port, state_dir=tmp_path))

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        with jr.remote.ServiceClient(f"http://127.0.0.1:{port}") as c:
            t0 = time.monotonic()
            training = c.create_model()  # sent while the service is down
            assert time.monotonic() - t0 > 4.0
            assert training.get_info()["step"] == 0
    finally:
        thread.join()
        for srv in restarted:
            srv.stop()


def test_errors_name_the_call_model_and_seq_id(tmp_path):
    srv = start(state_dir=tmp_path)
    retry = jr.remote.RetryPolicy(max_elapsed=0.5, base=0.01, cap=0.1)
    with jr.remote.ServiceClient(srv.url, retry=retry) as c:
        training = c.create_model()
        training.forward(datums("C", 1)).result()
        future = training.forward(datums("C", 1))
        srv.stop()
        with pytest.raises(RemoteError) as e:
            future.result()
    message = str(e.value)
    assert f"forward (model {training.model_id}, seq_id 1)" in message
    assert "retrieve_future" in message and "ConnectError" in message
    assert e.value.endpoint == "forward" and e.value.seq_id == 1
    assert jr.remote.RetryPolicy().max_elapsed >= 15


# ------------------------------------------------------------------ 8. smaller findings


def test_stale_temporaries_are_removed_at_start(tmp_path):
    (tmp_path / ".ckpt.npz.k2j3h4.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "keep.npz").write_bytes(b"a finished checkpoint")
    (tmp_path / ".notes.tmp").write_text("not ours")
    engine = Engine(tmp_path)
    try:
        assert [p.name for p in engine.removed_temporaries] == [".ckpt.npz.k2j3h4.tmp"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "keep.npz"]
    finally:
        engine.close()


def test_non_loopback_bind_needs_an_api_key():
    with pytest.raises(PermissionError, match="without an API key"):
        create_server("0.0.0.0")
    with pytest.raises(PermissionError, match="allow_unauthenticated"):
        create_server("::")
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.4")


def test_serve_refuses_a_public_host_without_a_key(monkeypatch, capsys):
    from jaxreg.cli import main

    monkeypatch.delenv("JAXREG_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err


def test_non_ascii_api_key(tmp_path):
    secret = "clé-ünïcødé-🔑"
    srv = start(api_key=secret, state_dir=tmp_path)
    try:
        with jr.remote.ServiceClient(srv.url, api_key=secret) as c:
            assert c.create_model().model_id.startswith("model-")
        r = _raw(srv.url, "create_model", {}, headers={"X-API-Key": "cle"})
        assert r.status_code == 401
        with jr.remote.ServiceClient(srv.url, api_key="clé-ünïcødé") as wrong:
            with pytest.raises(RemoteError) as e:
                wrong.create_model()
            assert e.value.status == 401
    finally:
        srv.stop()
