"""The unmodified official ``tinker`` SDK (0.38) against ``jaxreg serve`` over loopback HTTP.

Only ``base_url`` and a ``tml-`` API key point the SDK at the reference service;
everything else is the SDK's own code: its bootstrap, its protobuf encoding, its
``seq_id`` numbering (from 1), its futures and retries.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("tinker.proto.tinker_public_pb2")

from service_helpers import assert_trees_equal  # noqa: E402

import jaxreg as jr  # noqa: E402
from jaxreg.service import checkpoint, start, tasks  # noqa: E402

types = tinker.types
KEY = "tml-jaxreg-test"
ADAM = types.AdamParams(learning_rate=1e-3)


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    """One service (with an API key) and one SDK ServiceClient for the module."""
    state_dir = tmp_path_factory.mktemp("tinker-states")
    srv = start(state_dir=state_dir, api_key=KEY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_BASE_URL", srv.url)
        mp.setenv("TINKER_API_KEY", KEY)
        service = tinker.ServiceClient()  # both read from the environment
        try:
            yield srv, service
        finally:
            service.close("success").result(timeout=30)
            srv.stop()


def _data(task="I", n=4, seed=0, weights="answer"):
    out = []
    for e in tasks.make_examples(task, n, seed=seed, min_digits=2, max_digits=4):
        w = e.answer_mask if weights == "answer" else np.ones(len(e.tokens), np.float32)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(e.tokens.tolist()),
                loss_fn_inputs={"target_tokens": e.targets.astype(np.int64), "weights": w},
            )
        )
    return out


def _np(td) -> np.ndarray:
    return np.asarray(td.to_numpy(), np.float64)


def test_auth_and_bootstrap(sdk):
    srv, _service = sdk
    url = f"{srv.url}/api/v1/client/config"
    assert httpx.post(url, json={"sdk_version": "0.38.0"}).status_code == 401
    bad = httpx.post(url, json={"sdk_version": "0.38.0"}, headers={"X-API-Key": "tml-wrong"})
    assert bad.status_code == 401
    ok = httpx.post(url, json={"sdk_version": "0.38.0"}, headers={"X-API-Key": KEY})
    assert ok.status_code == 200 and ok.json()["pjwt_auth_enabled"] is False
    caps = tinker.RestClient(base_url=srv.url, api_key=KEY).get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == ["jaxreg-base"]


def test_supervised_loop(sdk):
    _srv, service = sdk
    training = service.create_lora_training_client(base_model="jaxreg-base", rank=4).result()
    assert training.get_info().model_id == training.model_id
    data = _data()
    losses = []
    for _ in range(4):
        fb = training.forward_backward(data, "cross_entropy")  # pipelined, as the SDK does
        step = training.optim_step(ADAM)
        out = fb.result(timeout=120)
        assert step.result(timeout=120).metrics["step"] == len(losses) + 1
        # loss:sum against float64 NumPy on the logprobs returned (protobuf both ways)
        expected = -sum(
            float(np.sum(_np(d.loss_fn_inputs["weights"]) * _np(o["logprobs"])))
            for d, o in zip(data, out.loss_fn_outputs, strict=True)
        )
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [
            [d.model_input.length] for d in data
        ]
        losses.append(out.metrics["loss:sum"])
    assert losses == sorted(losses, reverse=True), losses  # LoRA rank 4, lr 1e-3
    assert losses[-1] < 0.9 * losses[0], losses


def _raw(srv, path, **kw):
    headers = {"X-API-Key": KEY, "X-Stainless-Package-Version": "0.38.0", **kw.pop("headers", {})}
    return httpx.post(f"{srv.url}/api/v1/{path}", headers=headers, timeout=60, **kw)


def test_idempotency_retry_statuses_and_unknown_loss(sdk):
    from tinker.proto.request_conv import forward_backward_request_to_proto

    srv, _service = sdk
    a = _raw(srv, "create_session", json={"tags": [], "sdk_version": "0.38.0"},
             headers={"X-Idempotency-Key": "k1"})  # fmt: skip
    b = _raw(srv, "create_session", json={"tags": [], "sdk_version": "0.38.0"},
             headers={"X-Idempotency-Key": "k1"})  # fmt: skip
    c = _raw(srv, "create_session", json={"tags": [], "sdk_version": "0.38.0"})
    assert a.json() == b.json() and c.json()["session_id"] != a.json()["session_id"]
    gone = _raw(srv, "retrieve_future", json={"request_id": "no-such-request"})
    assert gone.status_code == 410  # the SDK's "promise expired" status
    sid = a.json()["session_id"]
    _raw(srv, "create_model", json={"session_id": sid, "model_seq_id": 0,
                                    "base_model": "jaxreg-base"})  # fmt: skip
    model_id = f"{sid}:train:0"

    def proto(loss_fn, seq_id, config=None):
        request = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(
                data=_data(n=1), loss_fn=loss_fn, loss_fn_config=config
            ),
            model_id=model_id,
            seq_id=seq_id,
        )
        body = forward_backward_request_to_proto(request).SerializeToString()
        return _raw(srv, "forward_backward", content=body,
                    headers={"Content-Type": "application/x-protobuf"})  # fmt: skip

    bad = proto("gspo", 1)
    assert bad.status_code == 400
    for name in ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "stable_reinforce"):
        assert name in bad.json()["error"]
    # A refused request uses up its seq_id (the SDK never resends one): the next is 2.
    assert proto("ppo", 2, {"clip_epsilon": 0.1}).status_code == 400
    first, retry = proto("cross_entropy", 3), proto("cross_entropy", 3)  # a retried seq_id
    assert first.json()["request_id"] == retry.json()["request_id"]
    result = _raw(srv, "retrieve_future", json={"request_id": first.json()["request_id"]},
                  headers={"Accept": "application/x-protobuf"})  # fmt: skip
    assert result.headers["content-type"] == "application/x-protobuf"
    for path in ("tinker://../weights/x", "tinker://m/weights/../x", "file:///etc/passwd"):
        bad_path = _raw(srv, "weights_info", json={"tinker_path": path})
        assert bad_path.status_code == 400 and "tinker://" in bad_path.json()["error"]
    # Sessions: a heartbeat keeps one alive; once finished, 410 stops the SDK's heartbeat.
    assert _raw(srv, "session_heartbeat", json={"session_id": sid}).status_code == 200
    finish = _raw(srv, f"sessions/{sid}/finish", json={"reason": {"type": "success"}})
    assert finish.status_code == 200
    assert _raw(srv, "session_heartbeat", json={"session_id": sid}).status_code == 410


def test_forward_backward_custom_through_the_sdk(sdk):
    _srv, service = sdk
    data = _data(n=4, seed=3)
    builtin = service.create_lora_training_client(base_model="jaxreg-base", rank=4).result()
    custom = service.create_lora_training_client(base_model="jaxreg-base", rank=4).result()
    # The SDK's own custom-loss forward payload, weights included.
    adapter = jr.remote.TinkerTrainingClient.wrap(custom)
    ours = adapter.forward_data(data, [jr.remote.to_datum(d) for d in data])
    theirs = custom._get_custom_loss_forward_data(data, "cross_entropy")

    def wire(ds):  # the bytes the SDK sends
        from tinker.proto.request_conv import forward_backward_request_to_proto

        request = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=ds, loss_fn="cross_entropy"),
            model_id=custom.model_id,
            seq_id=1,
        )
        return forward_backward_request_to_proto(request).SerializeToString()

    assert wire(ours) == wire(theirs)
    for _step in range(2):
        ref = builtin.forward_backward(data, "cross_entropy")
        builtin.optim_step(ADAM).result(timeout=120)
        start = time.perf_counter()
        fut = jr.remote.forward_backward_custom(
            custom,
            data,
            base=jr.losses.cross_entropy,
            regularizers=[jr.Term("entropy", jr.regularizers.entropy, weight=0.0)],
            track_grad_norms=True,
        )
        submitted = time.perf_counter() - start
        opt = custom.optim_step(ADAM)  # pipelined right behind the custom step
        seq_f, seq_b = fut.seq_ids
        assert seq_b == seq_f + 1  # reserved together
        out = fut.result(timeout=120)
        opt.result(timeout=120)
        # A zero-weight regularizer: the same update as the built-in cross-entropy.
        assert out.metrics["loss:sum"] == pytest.approx(ref.result().metrics["loss:sum"], rel=1e-5)
        assert out.metrics["regularizers/entropy/weight"] == 0.0
        assert "total_grad_norm" in out.metrics
        assert submitted < 5.0  # returned without waiting for the service
    a = custom.forward(data, "cross_entropy").result(timeout=120).metrics["loss:sum"]
    b = builtin.forward(data, "cross_entropy").result(timeout=120).metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-5)
    # A non-finite objective: nothing trains, the error is raised, the client goes on.
    before = custom.forward(data, "cross_entropy").result(timeout=120).metrics["loss:sum"]
    nan = jr.Term("nan", lambda x, batch: jr.losses.cross_entropy(x, batch)[0] * np.nan)
    with pytest.raises(jr.NonFiniteError):
        jr.remote.forward_backward_custom(custom, data, base=nan).result(timeout=120)
    custom.optim_step(types.AdamParams(learning_rate=0.0)).result(timeout=120)
    after = custom.forward(data, "cross_entropy").result(timeout=120).metrics["loss:sum"]
    assert after == before


def test_sampling_and_rl_loop(sdk):
    _srv, service = sdk
    training = service.create_lora_training_client(base_model="jaxreg-base", rank=4).result()
    sampler = training.save_weights_and_get_sampling_client().result(timeout=120)
    prompt_text = "I25>"
    prompt = [tasks.BOS, *tasks.encode(prompt_text)]
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7, stop="\n")
    first = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result(timeout=120)
    again = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result(timeout=120)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]  # seed
    newline = tasks.encode("\n")[0]
    for s in first.sequences:
        assert len(s.tokens) <= 5 and len(s.logprobs) == len(s.tokens)
        assert s.stop_reason == ("stop" if s.tokens[-1] == newline else "length")
        assert newline not in s.tokens[:-1]
    # RL: the sampler's logprobs are the training model's (importance ratio 1), then a
    # PPO step on the rewards, checked against float64 NumPy.
    data, rewards = [], []
    for s in first.sequences:
        full = prompt + list(s.tokens)
        answer = tasks.decode(s.tokens).strip()
        rewards.append(float(answer == tasks.answer("I", "25")))
        n_prompt = len(prompt) - 1
        mask = np.r_[np.zeros(n_prompt), np.ones(len(s.tokens))].astype(np.float32)
        data.append((full, mask, np.r_[np.zeros(n_prompt), s.logprobs].astype(np.float32)))
    adv = np.asarray(rewards) - np.mean(rewards) + 0.5  # a nonzero signal either way
    datums = [
        types.Datum(
            model_input=types.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={
                "target_tokens": np.asarray(full[1:], np.int64),
                "logprobs": q,
                "advantages": (mask * a).astype(np.float32),
            },
        )
        for (full, mask, q), a in zip(data, adv, strict=True)
    ]
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    out = training.forward_backward(datums, "ppo", config).result(timeout=120)
    training.optim_step(ADAM).result(timeout=120)
    expected = 0.0
    for d, o, (_, mask, q) in zip(datums, out.loss_fn_outputs, data, strict=True):
        lp = _np(o["logprobs"])
        np.testing.assert_allclose(lp[mask > 0], np.asarray(q, np.float64)[mask > 0], atol=2e-4)
        r = np.exp(np.where(mask > 0, lp - q, 0.0))
        a = _np(d.loss_fn_inputs["advantages"])
        expected -= np.sum(np.minimum(r * a, np.clip(r, 0.9, 1.1) * a) * mask)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # ... and an importance-sampling step through jaxreg's terms on the same rollout.
    fut = jr.remote.forward_backward_custom(
        training, datums, base=jr.losses.importance_sampling,
        regularizers=[jr.Term("entropy", jr.regularizers.entropy, weight=0.01)],
    )  # fmt: skip
    step = training.optim_step(ADAM)
    result = fut.result(timeout=120)
    assert step.result(timeout=120).metrics["step"] == 2
    assert np.isfinite(result.metrics["loss_total"])


def test_save_restart_load_bit_identical(sdk, tmp_path):
    srv, service = sdk
    training = service.create_lora_training_client(base_model="jaxreg-base", rank=4).result()
    data = _data(n=3, seed=5)
    training.forward_backward(data, "cross_entropy")
    training.optim_step(ADAM).result(timeout=120)
    path = training.save_state("ckpt").result(timeout=120).path
    assert path == f"tinker://{training.model_id}/weights/ckpt"
    info = tinker.RestClient().get_weights_info_by_tinker_path(path).result()
    assert info.base_model == "jaxreg-base" and info.lora_rank == 4
    # LoRA rank honoured: the base is untouched and every update has rank <= 4
    # (float64 SVD of A @ B); attention, MLP and the tied unembedding are adapted.
    file = next(srv.engine.state_dir.glob("tinker/*/weights/ckpt.npz"))
    tree, _ = checkpoint.load_tree(file)
    assert_trees_equal(tree["params"]["base"], srv.engine._base_params)
    adapters = tree["params"]["lora"]
    assert len(adapters) == 1 + 4 * len(tree["params"]["base"]["layers"])
    for name, ab in adapters.items():
        delta = np.asarray(ab["a"], np.float64) @ np.asarray(ab["b"], np.float64)
        s = np.linalg.svd(delta, compute_uv=False)
        assert s[0] > 0 and (s[4:] <= 1e-9 * s[0]).all(), name

    def continue_training(client):
        losses = []
        for _ in range(2):
            fb = client.forward_backward(data, "cross_entropy")
            client.optim_step(ADAM).result(timeout=120)
            losses.append(fb.result().metrics["loss:sum"])
        return [*losses, client.forward(data, "cross_entropy").result().metrics["loss:sum"]]

    expected = continue_training(training)
    # A new service process state: a new engine on the same state directory.
    again = start(state_dir=srv.engine.state_dir, api_key=KEY)
    try:
        other = tinker.ServiceClient(base_url=again.url, api_key=KEY)
        resumed = other.create_training_client_from_state_with_optimizer(path).result()
        assert continue_training(resumed) == expected  # bit-identical
        other.close("success").result(timeout=30)
    finally:
        again.stop()


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_policy_losses_against_float64_closed_forms(loss_fn):
    """Value and gradient (w.r.t. the logprobs) of the service's ppo and cispo losses."""
    import jax

    from jaxreg.service import losses

    rng = np.random.default_rng(1)
    shape = (3, 7)
    q = rng.normal(-2.0, 1.0, shape)
    lp = q + rng.normal(0.0, 0.4, shape)  # ratios on both sides of the clip range
    adv = rng.normal(0.0, 2.0, shape)
    mask = (rng.random(shape) < 0.8).astype(np.float64)
    lo, hi = 0.85, 1.1
    r = np.exp(lp - q)
    c = np.clip(r, lo, hi)
    if loss_fn == "ppo":
        value = -np.sum(np.minimum(r * adv, c * adv) * mask)
        grad = -np.where(r * adv <= c * adv, r * adv, 0.0) * mask  # d/dlp of min(...)
    else:
        value = -np.sum(c * lp * adv * mask)
        grad = -c * adv * mask  # the clipped ratio is a constant (stop_gradient)
    config = losses.check_config(
        loss_fn, {"clip_low_threshold": lo, "clip_high_threshold": hi}, "cfg", ValueError
    )
    inputs = {"logprobs": np.float32(q), "advantages": np.float32(adv), **config}
    f = jax.value_and_grad(lambda x: losses.policy_loss(loss_fn, x, inputs, np.float32(mask)))
    got_value, got_grad = f(np.float32(lp))
    np.testing.assert_allclose(float(got_value), value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad), grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="clip_epsilon"):
        losses.check_config(loss_fn, {"clip_epsilon": 0.2}, "cfg", lambda s, m: ValueError(m))
