"""The service's ``dro`` and ``stable_reinforce`` against float64 closed forms, the
sampler's stability records, and both losses through the unmodified tinker SDK."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from jaxreg.service import losses
from jaxreg.service.sampling import ProvenanceSpan, StabilityRecords


def _err(status, message):
    return ValueError(message)


def _value_and_grad(loss_fn, lp, inputs, mask):
    f = jax.value_and_grad(lambda x: losses.policy_loss(loss_fn, x, inputs, np.float32(mask)))
    value, grad = f(np.float32(lp))
    return float(value), np.asarray(grad, np.float64)


def _rl_inputs(seed, shape=(3, 9)):
    rng = np.random.default_rng(seed)
    q = rng.normal(-2.0, 1.0, shape)
    lp = q + rng.normal(0.0, 0.6, shape)  # ratios on both sides of 1
    adv = rng.normal(0.0, 2.0, shape)
    mask = (rng.random(shape) < 0.8).astype(np.float64)
    return q, lp, adv, mask


@pytest.mark.parametrize("beta", [0.0, 0.05, 3.0])
def test_dro_against_float64_closed_form(beta):
    q, lp, adv, mask = _rl_inputs(0)
    lp[0, :3] = q[0, :3] + np.array([30.0, -30.0, 1e-4])  # far off-policy, and near it
    lp[2, 4] = 40.0  # a masked-out position with a wild value counts for nothing
    mask[2, 4] = 0.0
    value = -np.sum((lp * adv - 0.5 * beta * (lp - q) ** 2) * mask)
    grad = -(adv - beta * (lp - q)) * mask
    config = losses.check_config("dro", {"beta": beta}, "cfg", _err)
    inputs = {"logprobs": np.float32(q), "advantages": np.float32(adv), **config}
    got_value, got_grad = _value_and_grad("dro", lp, inputs, mask)
    np.testing.assert_allclose(got_value, value, rtol=2e-5)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kl", [0.0, 0.1, 2.0])
def test_stable_reinforce_against_float64_closed_form(kl):
    q, lp, adv, mask = _rl_inputs(1)
    sampled = np.ones_like(q)
    sampled[:, :2] = 0.0  # prompt positions: given, not sampled
    lp[0, 0] = q[0, 0] + 50.0  # wild ratios where nothing was sampled count for nothing
    lp[1, 1] = q[1, 1] - 50.0
    lp[0, 5] = q[0, 5] + 1e-6  # r ~ 1: the penalty (~ 5e-13) must not cancel badly
    lp[1, 6] = q[1, 6] - 20.0  # r = e^-20: weight ~ 2e-9, penalty 19
    lp[2, 7] = q[2, 7] + 6.0  # r = e^6: the weight is truncated at 1
    mask[:, 5:8] = 1.0
    s = sampled * mask
    log_r = np.where(s > 0, lp - q, 0.0)
    r = np.exp(log_r)
    w = np.minimum(r, 1.0)
    value = -np.sum((w * lp * adv - kl * (r - 1.0 - log_r)) * s)
    grad = -(w * adv - kl * (r - 1.0)) * s
    config = losses.check_config("stable_reinforce", {"kl_coeff": kl}, "cfg", _err)
    inputs = {
        "logprobs": np.float32(q),
        "advantages": np.float32(adv),
        "sampled": np.float32(sampled),
        **config,
    }
    got_value, got_grad = _value_and_grad("stable_reinforce", lp, inputs, mask)
    np.testing.assert_allclose(got_value, value, rtol=2e-5)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-4)
    # On-policy (r = 1) it is REINFORCE, whatever kl_coeff: -sum(lp * A), gradient -A.
    on = {**inputs, "logprobs": np.float32(lp)}
    got_value, got_grad = _value_and_grad("stable_reinforce", np.float32(lp), on, mask)
    lp32 = np.float32(lp).astype(np.float64)
    np.testing.assert_allclose(got_value, -np.sum(lp32 * adv * s), rtol=2e-5)
    np.testing.assert_allclose(got_grad, -adv * s, rtol=1e-5, atol=1e-6)


def test_stable_reinforce_overflowing_ratio():
    """r = e^200 overflows float32: harmless without the penalty (the weight is 1, the
    gradient -A); with it the loss is +inf, which the engine refuses as non-finite."""
    lp, q = np.array([[-0.5, -1.0]]), np.array([[-200.5, -1.0]])
    adv, mask, sampled = np.array([[2.0, -1.0]]), np.ones((1, 2)), np.ones((1, 2))
    for kl in (0.0, 0.5):
        config = losses.check_config("stable_reinforce", {"kl_coeff": kl}, "cfg", _err)
        inputs = {"logprobs": np.float32(q), "advantages": np.float32(adv)}
        inputs.update(sampled=np.float32(sampled), **config)
        value, grad = _value_and_grad("stable_reinforce", lp, inputs, mask)
        if kl == 0.0:
            np.testing.assert_allclose(value, -(-0.5 * 2.0 + -1.0 * -1.0), rtol=1e-6)
            np.testing.assert_allclose(grad, -adv, rtol=1e-6)
        else:
            assert value == np.inf


def test_loss_config_validation():
    assert float(losses.check_config("dro", None, "cfg", _err)["beta"]) == pytest.approx(0.05)
    assert float(losses.check_config("stable_reinforce", {}, "c", _err)["kl_coeff"]) == 0.0
    with pytest.raises(ValueError, match=r"unknown options \['kl_coef'\].*\['kl_coeff'\]"):
        losses.check_config("stable_reinforce", {"kl_coef": 0.1}, "cfg", _err)
    with pytest.raises(ValueError, match=r"cfg\.beta: expected a finite number >= 0"):
        losses.check_config("dro", {"beta": -1.0}, "cfg", _err)
    with pytest.raises(ValueError, match=r"cfg\.kl_coeff: .*found 'x'"):
        losses.check_config("stable_reinforce", {"kl_coeff": "x"}, "cfg", _err)


def test_stability_records_resolve_and_refuse():
    r = StabilityRecords(capacity=2)
    r.record("s1", ["a", "b"], [
        {"tokens": [4, 5, 6], "logprobs": [-0.1, -0.2, -0.3]},
        {"tokens": [7], "logprobs": [-1.5]},
    ])  # fmt: skip
    # prompt (2 positions of a's prompt), then a's tokens 1..2, then all of b
    spans = [ProvenanceSpan(False, "a", 0, 2), ProvenanceSpan(True, "a", 1, 2)]
    spans.append(ProvenanceSpan(True, "b", 0, 1))
    q, sampled = r.resolve("s1", spans, np.array([9, 9, 5, 6, 7]), "d")
    np.testing.assert_array_equal(q, np.float32([0, 0, -0.2, -0.3, -1.5]))
    np.testing.assert_array_equal(sampled, [0, 0, 1, 1, 1])
    # [T, K] targets: the first column is the sampled token
    q2, _ = r.resolve("s1", spans, np.array([[9, 1]] * 2 + [[5, 0], [6, 0], [7, 3]]), "d")
    np.testing.assert_array_equal(q2, q)
    refusals = [
        ("s1", spans[:2], [9, 9, 5, 6, 7], r"d\.loss_fn_input_spans: .*cover 4 .*expected 5"),
        ("s2", spans, [9, 9, 5, 6, 7], r"\[1\]\.sequence_id: no recorded sequence 'a'"),
        ("s1", [ProvenanceSpan(True, "zz", 0, 1)], [7], r"no recorded sequence 'zz'"),
        ("s1", [ProvenanceSpan(True, "a", 2, 2)], [6, 0], r"\[0\]: positions \[2, 4\)"),
        ("s1", spans, [9, 9, 5, 6, 8], r"\[2\]: target_tokens\[4:5\] \[8\] are not .*\[7\]"),
    ]
    for session, sp, targets, match in refusals:
        with pytest.raises(ValueError, match=match):
            r.resolve(session, sp, np.array(targets), "d")
    # a was used last (by the refused request with a forged token, before its b span):
    r.record("s1", ["c"], [{"tokens": [1], "logprobs": [-0.5]}])  # evicts b, the LRU one
    with pytest.raises(ValueError, match="no recorded sequence 'b'"):
        r.resolve("s1", [ProvenanceSpan(True, "b", 0, 1)], np.array([7]), "d")
    assert r.resolve("s1", [ProvenanceSpan(True, "a", 0, 1)], np.array([4]), "d")[0] == -0.1
    expired = StabilityRecords(ttl_s=0.0)
    expired.record("s", ["x"], [{"tokens": [1], "logprobs": [-0.5]}])
    time.sleep(0.01)
    with pytest.raises(ValueError, match="no recorded sequence 'x'"):
        expired.resolve("s", [ProvenanceSpan(True, "x", 0, 1)], np.array([1]), "d")


# ------------------------------------------------------------------ through the SDK
tinker = pytest.importorskip("tinker")
pytest.importorskip("tinker.proto.tinker_public_pb2")

from jaxreg.service import start, tasks  # noqa: E402

KEY = "tml-jaxreg-test"


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    srv = start(state_dir=tmp_path_factory.mktemp("loss-states"), api_key=KEY)
    service = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
    try:
        yield srv, service
    finally:
        service.close("success").result(timeout=30)
        srv.stop()


def _rollouts(training, record):
    """Two sampled answers to one prompt, as the cookbook's RL loop builds datums."""
    types = tinker.types
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=record).result()
    prompt = [tasks.BOS, *tasks.encode("R123>")]
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=7)
    resp = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result(timeout=120)
    data, qs = [], []
    for k, seq in enumerate(resp.sequences):
        full = prompt + list(seq.tokens)
        n_prompt = len(prompt) - 1  # targets that are prompt tokens
        adv = np.float32([0.0] * n_prompt + [1.5 if k == 0 else -0.5] * len(seq.tokens))
        q = np.float32([0.0] * n_prompt + list(seq.logprobs))
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={
                "target_tokens": np.asarray(full[1:], np.int64),
                "logprobs": q,
                "advantages": adv,
            },
        )
        if record:
            sid = seq.sequence_id
            datum = datum.with_provenance(
                model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=len(full) - 1)],
                loss_fn_inputs=[
                    types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_prompt),
                    types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens)),
                ],
            )
        data.append(datum)
        qs.append((q.astype(np.float64), adv.astype(np.float64), n_prompt))
    return data, qs


def test_dro_and_stable_reinforce_through_the_sdk(sdk):
    _srv, service = sdk
    training = service.create_lora_training_client(base_model="jaxreg-base", rank=4).result()
    data, qs = _rollouts(training, record=True)
    kl, beta = 0.3, 0.2
    sr = training.forward_backward(data, "stable_reinforce", {"kl_coeff": kl}).result(120)
    dro = training.forward_backward(data, "dro", {"beta": beta}).result(120)
    want_sr = want_dro = 0.0
    for out_sr, out_dro, (q, adv, n_prompt) in zip(
        sr.loss_fn_outputs, dro.loss_fn_outputs, qs, strict=True
    ):
        lp = np.asarray(out_sr["logprobs"].to_numpy(), np.float64)
        np.testing.assert_allclose(lp, out_dro["logprobs"].to_numpy(), rtol=1e-6)
        s = np.arange(len(lp)) >= n_prompt
        log_r = np.where(s, lp - q, 0.0)
        r = np.exp(log_r)
        want_sr -= np.sum((np.minimum(r, 1) * lp * adv - kl * (r - 1 - log_r)) * s)
        want_dro -= np.sum(lp * adv - 0.5 * beta * (lp - q) ** 2)
    np.testing.assert_allclose(sr.metrics["loss:sum"], want_sr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dro.metrics["loss:sum"], want_dro, rtol=1e-4, atol=1e-5)
    training.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result(timeout=120)


def test_stable_reinforce_refusals_through_the_sdk(sdk):
    """Without provenance, or claiming a token the sampler did not draw: a 400 naming the
    field, and the client's next request is answered at once."""
    _srv, service = sdk
    training = service.create_lora_training_client(base_model="jaxreg-base", rank=4).result()
    plain, _ = _rollouts(training, record=False)
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\]\.loss_fn_input_spans: .*prov"):
        training.forward_backward(plain, "stable_reinforce").result(timeout=60)
    data, _ = _rollouts(training, record=True)
    tgt = data[0].loss_fn_inputs["target_tokens"].to_numpy().copy()
    tgt[-1] = (tgt[-1] + 1) % 32  # not what the sampler drew
    forged = tinker.types.Datum(
        model_input=data[0].model_input,
        loss_fn_inputs={**data[0].loss_fn_inputs, "target_tokens": tgt},
    ).with_provenance(data[0].model_input_spans, data[0].loss_fn_input_spans)
    with pytest.raises(tinker.BadRequestError, match=r"are not the tokens sequence"):
        training.forward_backward([forged], "stable_reinforce").result(timeout=60)
    start_t = time.monotonic()
    training.forward_backward(data, "stable_reinforce").result(timeout=60)
    assert time.monotonic() - start_t < 30  # not the SDK's 300 s wait for a lost seq_id


def test_stable_reinforce_on_the_jaxreg_wire(sdk):
    """jaxreg's own client passes ``sampled`` itself; anything but 0/1 is refused."""
    import jaxreg as jr
    from jaxreg._src.remote.wire import Datum

    srv, _service = sdk
    client = jr.remote.ServiceClient(srv.url, api_key=KEY)
    model = client.create_model()
    e = tasks.make_examples("R", 1, seed=0, min_digits=3, max_digits=3)[0]
    n = len(e.tokens)
    q = np.full(n, -1.0, np.float32)
    adv = np.linspace(-1.0, 1.0, n).astype(np.float32)
    sampled = np.float32(e.answer_mask)
    inputs = {"target_tokens": e.targets.astype(np.int64), "logprobs": q, "advantages": adv}
    out = model.forward_backward(
        [Datum(e.tokens, {**inputs, "sampled": sampled})], "stable_reinforce", {"kl_coeff": 0.5}
    ).result()
    lp = np.asarray(out["loss_fn_outputs"][0]["logprobs"], np.float64)
    log_r = np.where(sampled > 0, lp - q, 0.0)
    r = np.exp(log_r)
    want = -np.sum((np.minimum(r, 1) * lp * adv - 0.5 * (r - 1 - log_r)) * sampled)
    np.testing.assert_allclose(out["metrics"]["loss:sum"], want, rtol=1e-4, atol=1e-5)
    bad = Datum(e.tokens, {**inputs, "sampled": sampled * 0.5})
    with pytest.raises(Exception, match=r"loss_fn_inputs\.sampled: expected 0 or 1, found 0\.5"):
        model.forward_backward([bad], "stable_reinforce").result()
    with pytest.raises(Exception, match=r"loss_fn_inputs\.sampled: missing"):
        model.forward_backward([Datum(e.tokens, inputs)], "stable_reinforce").result()
