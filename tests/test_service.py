"""The reference service over real loopback HTTP: numbers, ordering, persistence, errors."""

from __future__ import annotations

import base64
import concurrent.futures
import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from service_helpers import assert_trees_equal, datums, examples, params_of

import jaxreg as jr
from jaxreg._src.remote.wire import Datum, encode_tensor
from jaxreg.service import model as model_lib
from jaxreg.service import start

RemoteError = jr.remote.RemoteError


def _lp_reference(cfg, params, data):
    """Per-datum logprobs computed directly by the model (no padding, no service)."""
    out = []
    for d in data:
        tok = jnp.asarray(d.tokens[None].astype(np.int32))
        tgt = jnp.asarray(d.loss_fn_inputs["target_tokens"][None].astype(np.int32))
        out.append(np.asarray(model_lib.token_logprobs(cfg, params, tok, tgt))[0])
    return out


def test_healthz_info_and_forward_matches_the_model(server, client):
    assert client.healthz() == {"status": "ok"}
    training = client.create_model()
    info = training.get_info()
    assert info["model_data"]["num_params"] > 300_000 and info["step"] == 0
    data = datums("C", 4, seed=1)
    result = training.forward(data).result()
    params, _ = params_of(training, server, "fwd")
    expected = _lp_reference(server.engine.config, params, data)
    for got, want, d in zip(result["loss_fn_outputs"], expected, data, strict=True):
        assert got["logprobs"].shape == d.tokens.shape
        np.testing.assert_allclose(got["logprobs"], want, rtol=1e-5, atol=1e-5)
    want_loss = -sum(
        float((w * d.loss_fn_inputs["weights"]).sum()) for w, d in zip(expected, data, strict=True)
    )
    np.testing.assert_allclose(result["metrics"]["loss:sum"], want_loss, rtol=1e-5)


def test_multi_target_forward(server, client):
    training = client.create_model()
    rng = np.random.default_rng(0)
    data = []
    for e in examples("R", 3, seed=2):
        targets = rng.integers(0, 32, size=(len(e.tokens), 4))
        data.append(
            Datum(
                e.tokens, {"target_tokens": targets, "weights": np.ones(targets.shape, np.float32)}
            )
        )
    result = training.forward(data).result()
    params, _ = params_of(training, server, "fwd_k")
    for got, want in zip(
        result["loss_fn_outputs"], _lp_reference(server.engine.config, params, data), strict=True
    ):
        assert got["logprobs"].shape == want.shape and want.ndim == 2
        np.testing.assert_allclose(got["logprobs"], want, rtol=1e-5, atol=1e-5)


def test_forward_backward_gradient_equals_jax_grad(server, client):
    """With beta1 = beta2 = 0, Adam's step is lr * g / (|g| + eps): invert it for g."""
    training = client.create_model()
    data = datums("I", 3, seed=3, weights="random")
    before, _ = params_of(training, server, "grad_before")
    training.forward_backward(data, "cross_entropy").result()
    lr = eps = 1e3
    training.optim_step({"learning_rate": lr, "beta1": 0.0, "beta2": 0.0, "eps": eps}).result()
    after, _ = params_of(training, server, "grad_after")
    cfg = server.engine.config

    def loss(p):
        total = 0.0
        for d in data:
            tok = jnp.asarray(d.tokens[None].astype(np.int32))
            tgt = jnp.asarray(d.loss_fn_inputs["target_tokens"][None].astype(np.int32))
            lp = model_lib.token_logprobs(cfg, p, tok, tgt)
            total = total - jnp.sum(jnp.asarray(d.loss_fn_inputs["weights"]) * lp)
        return total

    expected = jax.grad(loss)(jax.tree.map(jnp.asarray, before))
    for b, a, g in zip(
        jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(expected), strict=True
    ):
        d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
        recovered = d * eps / (lr - np.abs(d))
        g = np.asarray(g, np.float64)
        np.testing.assert_allclose(recovered, g, rtol=2e-3, atol=2e-4 * np.abs(g).max() + 1e-7)


def test_optim_steps_lower_the_loss(client):
    training = client.create_model()
    data = datums("I", 4, seed=4)
    losses = []
    for _ in range(4):
        losses.append(training.forward_backward(data).result()["metrics"]["loss:sum"])
        training.optim_step({"learning_rate": 1e-3}).result()
    assert losses[-1] < 0.7 * losses[0], losses


def _ops(training, data, seq0=0):
    """A fixed sequence of requests (as (seq_id, submit) pairs)."""
    adam = {"learning_rate": 1e-3}
    return [
        (seq0 + 0, lambda s: training.forward_backward(data[:2], seq_id=s)),
        (seq0 + 1, lambda s: training.optim_step(adam, seq_id=s)),
        (seq0 + 2, lambda s: training.forward_backward(data[2:], seq_id=s)),
        (seq0 + 3, lambda s: training.optim_step(adam, seq_id=s)),
        (seq0 + 4, lambda s: training.forward(data, seq_id=s)),
    ]


def test_seq_order_and_retry_dedup_under_concurrency(client):
    data = datums("I", 4, seed=5)
    sequential = client.create_model()
    expected = [submit(s).result() for s, submit in _ops(sequential, data)][-1]

    shuffled = client.create_model()
    ops = _ops(shuffled, data)
    order = [4, 2, 3, 0, 1] * 2  # every request twice (a retry), in reverse-ish order
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = list(pool.map(lambda i: ops[i][1](ops[i][0]), order))
    by_seq: dict[int, set] = {}
    for i, f in zip(order, futures, strict=True):
        by_seq.setdefault(i, set()).add(f.request_id)
    assert all(len(ids) == 1 for ids in by_seq.values())  # a retry gets the first request
    got = futures[0].result()
    for g, e in zip(got["loss_fn_outputs"], expected["loss_fn_outputs"], strict=True):
        np.testing.assert_array_equal(g["logprobs"], e["logprobs"])
    assert shuffled.get_info()["step"] == 2  # each optim_step applied once


def test_try_again_until_the_gap_is_filled_and_skip_seq(client):
    training = client.create_model()
    late = training.forward(datums("C", 1), seq_id=2)
    answer = client.post("retrieve_future", {"request_id": late.request_id, "timeout": 0})
    assert answer["type"] == "try_again"
    training.skip_seq(0).result()
    training.skip_seq(1).result()
    assert late.result(timeout=30)["loss_fn_outputs"][0]["logprobs"].shape == (
        len(datums("C", 1)[0].tokens),
    )
    with pytest.raises(RemoteError, match="unknown request") as e:
        client.post("retrieve_future", {"request_id": "nope"})
    assert e.value.status == 404


def _body(training, data, **extra):
    return {
        "model_id": training.model_id,
        "seq_id": 1,
        "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"},
        **extra,
    }


def _datum_json(tokens, targets, weights):
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": {"target_tokens": targets, "weights": weights},
    }


def _bad_requests(training):
    good = datums("I", 1)[0]
    t = len(good.tokens)
    toks = good.tokens.tolist()
    tt = encode_tensor(good.loss_fn_inputs["target_tokens"])
    w = encode_tensor(np.ones(t, np.float32))
    nan = np.ones(t, np.float32)
    nan[1] = np.nan
    nan_b64 = {"data": base64.b64encode(nan.tobytes()).decode(), "dtype": "float32", "shape": [t]}
    long = list(range(1, 2)) * 1025
    return [
        (
            {**_body(training, [_datum_json(toks, tt, w)]), "model_id": "model-x"},
            404,
            "unknown model",
        ),
        (_body(training, [_datum_json([*toks[:-1], 99], tt, w)]), 400, "outside the vocabulary"),
        (
            _body(training, [_datum_json(toks, tt, encode_tensor(np.ones(t + 1, np.float32)))]),
            400,
            "expected shape",
        ),
        (_body(training, [_datum_json(toks, tt, nan_b64)]), 400, "non-finite"),
        (
            _body(
                training,
                [
                    _datum_json(
                        long,
                        encode_tensor(np.ones(1025, np.int64)),
                        encode_tensor(np.ones(1025, np.float32)),
                    )
                ],
            ),
            400,
            "exceeds the context length",
        ),
        (
            {
                **_body(training, [_datum_json(toks, tt, w)]),
                "forward_backward_input": {"data": [_datum_json(toks, tt, w)], "loss_fn": "dpo"},
            },
            400,
            "unknown loss 'dpo'",
        ),
        (
            _body(
                training,
                [
                    {
                        "model_input": {"chunks": [{"type": "encoded_text", "tokens": toks}]},
                        "loss_fn_inputs": {"target_tokens": tt},
                    }
                ],
            ),
            400,
            "weights: missing",
        ),
        (
            _body(
                training, [_datum_json(toks, {"data": [1, 2], "dtype": "int64", "shape": [3]}, w)]
            ),
            400,
            "needs 3 values",
        ),
        (
            _body(
                training,
                [
                    _datum_json(toks, tt, w),
                    _datum_json(
                        toks,
                        encode_tensor(np.ones((t, 2), np.int64)),
                        encode_tensor(np.ones((t, 2), np.float32)),
                    ),
                ],
            ),
            400,
            "same number of targets",
        ),
        (_body(training, []), 400, "non-empty list"),
        ({**_body(training, [_datum_json(toks, tt, w)]), "seq_id": -1}, 400, "seq_id"),
    ]


def test_bad_inputs_get_4xx_and_change_nothing(server, client):
    data = datums("I", 2, seed=6)
    reference = client.create_model()
    reference.forward_backward(data, seq_id=0).result()
    reference.optim_step({"learning_rate": 1e-3}, seq_id=1).result()

    training = client.create_model()
    training.forward_backward(data, seq_id=0).result()
    for body, status, message in _bad_requests(training):
        with pytest.raises(RemoteError) as e:
            client.post("forward_backward", body)
        assert e.value.status == status, (message, str(e.value))
        assert message in str(e.value)
    with pytest.raises(RemoteError, match="learning_rate") as e:
        training.optim_step({"learning_rate": -1.0}, seq_id=1)
    assert e.value.status == 400
    # The rejected requests used no seq_id and left the accumulated gradient alone.
    training.optim_step({"learning_rate": 1e-3}, seq_id=1).result()
    assert_trees_equal(
        params_of(training, server, "bad_after")[0], params_of(reference, server, "bad_ref")[0]
    )


def test_api_key_and_body_limit(tmp_path):
    from jaxreg.service import create_server

    secret = "s3cret-key-123"
    srv = create_server(api_key=secret, state_dir=tmp_path, max_body_bytes=4096)
    srv.start_background()
    try:
        with httpx.Client(base_url=srv.url) as http:
            assert http.get("/api/v1/healthz").status_code == 200
            r = http.post("/api/v1/create_model", json={})
            assert r.status_code == 401 and secret not in r.text
            r = http.post("/api/v1/create_model", json={}, headers={"X-API-Key": "wrong"})
            assert r.status_code == 401
            r = http.post(
                "/api/v1/create_model", content=b"x" * 5000, headers={"X-API-Key": secret}
            )
            assert r.status_code == 413
            r = http.post(
                "/api/v1/create_model", content=b"{not json", headers={"X-API-Key": secret}
            )
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        with jr.remote.ServiceClient(srv.url, api_key=secret) as c:
            assert secret not in repr(c)
            assert c.create_model().model_id.startswith("model-")
    finally:
        srv.stop()


def test_save_restart_load_resumes_bit_identically(tmp_path):
    data = datums("I", 3, seed=7)
    adam = {"learning_rate": 1e-3, "weight_decay": 0.01}

    def train(training, n):
        for _ in range(n):
            training.forward_backward(data)
            training.optim_step(adam)

    first = start(state_dir=tmp_path)
    try:
        with jr.remote.ServiceClient(first.url) as c:
            training = c.create_model()
            train(training, 2)
            training.forward_backward(data[:1])  # an accumulated gradient is saved too
            assert training.save_state("ckpt").result()["path"] == "jaxreg://ckpt"
            train(training, 2)
            expected = training.forward(data).result()
            expected_step = training.get_info()["step"]
    finally:
        first.stop()
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no temporary left behind
    second = start(state_dir=tmp_path)
    try:
        with jr.remote.ServiceClient(second.url) as c:
            training = c.create_model()
            training.load_state("jaxreg://ckpt").result()
            train(training, 2)
            got = training.forward(data).result()
            assert training.get_info()["step"] == expected_step
            with pytest.raises(RemoteError, match="no saved state named 'missing'"):
                training.load_state("missing").result()
            with pytest.raises(RemoteError, match="path") as e:
                training.save_state("../escape")
            assert e.value.status == 400
    finally:
        second.stop()
    for g, e in zip(got["loss_fn_outputs"], expected["loss_fn_outputs"], strict=True):
        np.testing.assert_array_equal(g["logprobs"], e["logprobs"])


def test_json_and_base64_encodings_agree(server):
    data = datums("R", 2, seed=8)
    results = []
    for encoding in ("json", "base64"):
        with jr.remote.ServiceClient(server.url, tensor_encoding=encoding) as c:
            results.append(c.create_model().forward(data).result())
    for a, b in zip(*(r["loss_fn_outputs"] for r in results), strict=True):
        np.testing.assert_array_equal(a["logprobs"], b["logprobs"])


def test_importance_sampling_loss(server, client):
    training = client.create_model()
    base = datums("C", 2, seed=9)
    lp = [o["logprobs"] for o in training.forward(base).result()["loss_fn_outputs"]]
    rng = np.random.default_rng(0)
    data, expected = [], 0.0
    for d, lpd in zip(base, lp, strict=True):
        sampling = (lpd + rng.normal(0, 0.1, lpd.shape)).astype(np.float32)
        adv = rng.normal(size=lpd.shape).astype(np.float32)
        data.append(
            Datum(
                d.tokens,
                {
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "logprobs": sampling,
                    "advantages": adv,
                },
            )
        )
        expected -= float(np.sum(np.exp(lpd.astype(np.float64) - sampling) * adv))
    out = training.forward_backward(data, "importance_sampling").result()
    np.testing.assert_allclose(out["metrics"]["loss:sum"], expected, rtol=1e-4, atol=1e-4)


def test_unknown_endpoint_and_json_error_body(server):
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/api/v1/forward_backward", content=json.dumps([1, 2]))
        assert r.status_code == 400 and "JSON object" in r.json()["error"]


def test_forward_only_changes_nothing(server, client):
    data = datums("I", 2, seed=10)
    reference = client.create_model()
    reference.optim_step({"learning_rate": 1e-3}).result()
    training = client.create_model()
    body = training._data_body("forward_backward", data, "cross_entropy", None, None)
    body["forward_only"] = True
    out = training.submit("forward_backward", body).result()
    assert out["type"] == "forward" and out["metrics"]["loss:sum"] > 0
    training.optim_step({"learning_rate": 1e-3}).result()  # nothing was accumulated
    assert_trees_equal(
        params_of(training, server, "fo")[0], params_of(reference, server, "fo_ref")[0]
    )
