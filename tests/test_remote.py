"""``jaxreg.remote`` against the real reference service over loopback HTTP.

Fault injection wraps the real HTTP transport (requests are really sent unless a
fault drops them first); everything else talks to the service directly.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from service_helpers import assert_trees_equal, datums, examples, params_of

import jaxreg as jr
from jaxreg._src.remote.wire import Datum, decode_tensor

ADAM = {"learning_rate": 1e-3}


class Transport(httpx.BaseTransport):
    """The real HTTP transport, recording request bodies and injecting chosen faults."""

    def __init__(self, faults=None, seed: int = 0):
        self.inner = httpx.HTTPTransport()
        self.faults = faults or {}
        self.rng = random.Random(seed)
        self.sent: list[tuple[str, dict]] = []
        self.injected: dict[str, int] = {}
        self.lock = threading.Lock()

    def _pick(self, endpoint: str) -> str | None:
        with self.lock:
            for fault, p in self.faults.get(endpoint, self.faults.get("*", {})).items():
                if self.rng.random() < p:
                    self.injected[fault] = self.injected.get(fault, 0) + 1
                    return fault
        return None

    def handle_request(self, request):
        endpoint = request.url.path.rsplit("/", 1)[-1]
        fault = self._pick(endpoint)
        if fault == "connect":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if fault in ("429", "500", "503"):
            return httpx.Response(
                int(fault),
                json={"error": "injected"},
                headers={"retry-after": "0"} if fault == "429" else {},
            )
        if fault == "delay":
            time.sleep(0.02)
        with self.lock:
            self.sent.append((endpoint, json.loads(request.content or b"{}")))
        response = self.inner.handle_request(request)
        if fault == "lose_response":  # the service did the work; the answer is lost
            response.read()
            response.close()
            raise httpx.ReadError("injected: connection reset", request=request)
        return response

    def bodies(self, endpoint):
        return [b for e, b in self.sent if e == endpoint]


def _client(server, transport=None, **kw):
    return jr.remote.ServiceClient(server.url, transport=transport, **kw)


@pytest.fixture(scope="module")
def objective():
    """CE + KL + entropy, compiled once for the module."""
    return jr.compose(
        jr.Term("nll", jr.losses.cross_entropy),
        [
            jr.Term("kl", jr.regularizers.kl("ref_logprobs"), weight=0.1),
            jr.Term("entropy", jr.regularizers.entropy, weight=0.01),
        ],
        track_grad_norms=True,
    )


def _with_ref(client, data, seed=0):
    """Adds ``ref_logprobs``: the base model's logprobs plus noise."""
    lp = client.create_model().forward(data).result()["loss_fn_outputs"]
    rng = np.random.default_rng(seed)
    return [
        d.replace_inputs(
            ref_logprobs=(o["logprobs"] + rng.normal(0, 0.3, o["logprobs"].shape)).astype(
                np.float32
            )
        )
        for d, o in zip(data, lp, strict=True)
    ]


def _numpy_objective(lp, d):
    """CE (sum) + 0.1 KL (k3, token mean) + 0.01 entropy bonus, in float64 NumPy."""
    lp = [np.asarray(x, np.float64) for x in lp]
    n = sum(x.size for x in lp)
    ce = -sum(np.sum(x * e.loss_fn_inputs["weights"]) for x, e in zip(lp, d, strict=True))
    kl = 0.0
    for x, e in zip(lp, d, strict=True):
        r = np.clip(e.loss_fn_inputs["ref_logprobs"].astype(np.float64) - x, -20, 20)
        kl += np.sum(np.exp(r) - r - 1)
    ent = sum(np.sum(x) for x in lp) / n  # loss = -H, with H = -mean(logprob)
    return ce + 0.1 * kl / n + 0.01 * ent


def test_custom_cross_entropy_equals_builtin(server, client):
    data = datums("I", 3, seed=11)
    builtin = client.create_model()
    builtin.forward_backward(data)
    builtin.optim_step(ADAM).result()
    custom = client.create_model()
    result = jr.remote.forward_backward_custom(custom, data, base=jr.losses.cross_entropy).result()
    custom.optim_step(ADAM).result()
    assert_trees_equal(
        params_of(custom, server, "ce_custom")[0], params_of(builtin, server, "ce_builtin")[0]
    )
    np.testing.assert_allclose(
        result.metrics["loss:sum"], result.metrics["surrogate_loss:sum"], rtol=1e-5
    )


def test_sent_weights_are_minus_the_gradient_by_finite_differences(server, client, objective):
    data = _with_ref(client, datums("I", 3, seed=12, weights="random"))
    transport = Transport()
    with _client(server, transport) as c:
        result = jr.remote.forward_backward_custom(c.create_model(), data, objective).result()
    (body,) = transport.bodies("forward_backward")
    sent = [
        decode_tensor(d["loss_fn_inputs"]["weights"])
        for d in body["forward_backward_input"]["data"]
    ]
    lp = result.logprobs
    assert set(body["forward_backward_input"]["data"][0]["loss_fn_inputs"]) == {
        "target_tokens",
        "weights",
    }
    np.testing.assert_allclose(result.metrics["loss:sum"], _numpy_objective(lp, data), rtol=1e-5)
    h = 1e-5
    for i, x in enumerate(lp):
        for t in range(len(x)):
            up = [y.astype(np.float64).copy() for y in lp]
            down = [y.astype(np.float64).copy() for y in lp]
            up[i][t] += h
            down[i][t] -= h
            fd = (_numpy_objective(up, data) - _numpy_objective(down, data)) / (2 * h)
            np.testing.assert_allclose(-sent[i][t], fd, rtol=1e-4, atol=1e-6)
    assert result.metrics["regularizers/kl/grad_norm"] > 0
    assert "surrogate_loss:sum" in result.metrics and "tokens:sum" in result.metrics


def test_regularizer_moves_the_update_its_way(server, client):
    data = _with_ref(client, datums("C", 4, seed=13), seed=1)
    kl = jr.regularizers.kl("ref_logprobs")

    def kl_after(weight):
        training = client.create_model()
        jr.remote.forward_backward_custom(
            training,
            data,
            base=jr.losses.cross_entropy,
            regularizers=[jr.Term("kl", kl, weight=weight)],
        ).result()
        training.optim_step({"learning_rate": 3e-4}).result()
        lp = [
            o["logprobs"]
            for o in training.forward(
                [
                    Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]})
                    for d in data
                ]
            ).result()["loss_fn_outputs"]
        ]
        x, batch = jr.Batch.from_ragged(
            lp, {"ref_logprobs": [d.loss_fn_inputs["ref_logprobs"] for d in data]}
        )
        return float(kl(x, batch)[0])

    without, with_kl = kl_after(0.0), kl_after(50.0)
    assert with_kl < without, (with_kl, without)


def test_multi_target_data(server, client):
    rng = np.random.default_rng(14)
    data = []
    for e in examples("R", 3, seed=14):
        targets = np.stack(
            [e.targets, rng.integers(0, 32, len(e.tokens)), rng.integers(0, 32, len(e.tokens))],
            axis=1,
        ).astype(np.int64)
        weights = np.zeros(targets.shape, np.float32)
        weights[:, 0] = e.answer_mask
        data.append(Datum(e.tokens, {"target_tokens": targets, "weights": weights}))
    builtin = client.create_model()
    builtin.forward_backward(data)
    builtin.optim_step(ADAM).result()
    custom = client.create_model()
    result = jr.remote.forward_backward_custom(
        custom,
        data,
        base=jr.losses.cross_entropy,
        regularizers=[jr.Term("entropy", jr.regularizers.entropy(renormalize=True), 0.0)],
        track_grad_norms=True,
    ).result()
    custom.optim_step(ADAM).result()
    assert result.logprobs[0].shape == data[0].loss_fn_inputs["target_tokens"].shape
    assert result.loss_fn_outputs[0]["logprobs"].shape == result.logprobs[0].shape
    assert_trees_equal(
        params_of(custom, server, "k_custom")[0], params_of(builtin, server, "k_builtin")[0]
    )


def _full_vocabulary(task, n, seed):
    """Datums whose targets are the whole vocabulary (a shuffled order) at every position."""
    rng = np.random.default_rng(seed)
    data = []
    for e in examples(task, n, seed=seed):
        targets = np.stack([rng.permutation(32) for _ in e.tokens]).astype(np.int64)
        weights = (targets == e.targets[:, None]) * e.answer_mask[:, None]
        data.append(
            Datum(e.tokens, {"target_tokens": targets, "weights": weights.astype(np.float32)})
        )
    return data


# beta1 = beta2 = 0 and a large eps make one step ``-lr * g / (|g| + eps) ~ -g``: the
# parameter change is the parameter-space gradient itself.
LINEAR_STEP = {"learning_rate": 1e3, "beta1": 0.0, "beta2": 0.0, "eps": 1e3}


def test_logit_space_leaves_the_parameter_update_unchanged(server, client):
    data = _full_vocabulary("I", 3, seed=15)
    start = params_of(client.create_model(), server, "gs_start")[0]
    deltas, sent = {}, {}
    for space in ("x", "logits"):
        transport = Transport()
        with _client(server, transport) as c:
            training = c.create_model()
            result = jr.remote.forward_backward_custom(
                training,
                data,
                base=jr.losses.cross_entropy,
                regularizers=[jr.Term("entropy", jr.regularizers.entropy, 0.1)],
                track_grad_norms=True,
                grad_space=space,
            ).result()
            training.optim_step(LINEAR_STEP).result()
            after = params_of(training, server, f"gs_{space}")[0]
        assert result.output.grad_space == space
        (body,) = transport.bodies("forward_backward")
        sent[space] = decode_tensor(
            body["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]
        )
        deltas[space] = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, start)
    # What is sent differs (the logit-space weights sum to 0 at every position) ...
    assert np.abs(sent["x"].sum(-1)).max() > 1e-3
    np.testing.assert_allclose(sent["logits"].sum(-1), 0, atol=1e-6)
    # ... and the model moves the same way.
    scale = max(float(np.abs(d).max()) for d in jax.tree.leaves(deltas["x"]))
    assert scale > 1e-4
    for a, b in zip(jax.tree.leaves(deltas["x"]), jax.tree.leaves(deltas["logits"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)


def test_logit_space_refuses_targets_that_are_not_the_whole_vocabulary(server, client):
    training = client.create_model()
    top_k = datums("I", 2, seed=16)
    top_k = [
        d.replace_inputs(
            target_tokens=np.stack(
                [d.loss_fn_inputs["target_tokens"], (d.loss_fn_inputs["target_tokens"] + 1) % 32], 1
            ),
            weights=np.stack([d.loss_fn_inputs["weights"]] * 2, 1),
        )
        for d in top_k
    ]
    run = lambda data: jr.remote.forward_backward_custom(
        training, data, base=jr.losses.cross_entropy, grad_space="logits"
    ).result()
    with pytest.raises(jr.InputError, match=r"probabilities sum to 0\.\d+, not 1"):
        run(top_k)
    repeated = _full_vocabulary("I", 1, seed=17)
    targets = repeated[0].loss_fn_inputs["target_tokens"].copy()
    targets[1, 0] = targets[1, 1]
    with pytest.raises(jr.InputError, match=r"target_tokens'\]\[1\].*distinct tokens"):
        run([repeated[0].replace_inputs(target_tokens=targets)])
    with pytest.raises(jr.InputError, match=r"\[T, K\] targets"):
        run(datums("I", 1, seed=18))


def test_non_finite_loss_sends_nothing_and_leaves_the_model_unchanged(server, client):
    data = datums("I", 2, seed=15)
    transport = Transport()
    with _client(server, transport) as c:
        training = c.create_model()
        before = params_of(training, server, "nan_before")[0]
        bad = jr.Term("bad", lambda x, batch: jnp.log(-jnp.sum(jnp.exp(x))))
        future = jr.remote.forward_backward_custom(
            training, data, base=jr.losses.cross_entropy, regularizers=[bad]
        )
        step = training.optim_step(ADAM)  # pipelined behind the custom backward
        with pytest.raises(jr.NonFiniteError, match="bad") as e:
            future.result()
        assert e.value.terms == ("bad",)
        step.result(timeout=30)  # the reserved backward seq_id was released
        assert transport.bodies("forward_backward") == []
        assert_trees_equal(params_of(training, server, "nan_after")[0], before)


def test_tinker_datums_round_trip(server, client):
    types = pytest.importorskip("tinker.types")
    originals = []
    for e in examples("C", 2, seed=16):
        originals.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(e.tokens.tolist()),
                loss_fn_inputs={
                    "target_tokens": e.targets.astype(np.int64),
                    "weights": e.answer_mask,
                    "advantages": np.ones(len(e.tokens), np.float32),
                },
            )
        )
    converted = [jr.remote.to_datum(d) for d in originals]
    back = [jr.remote.to_tinker_datum(d) for d in converted]
    for o, b in zip(originals, back, strict=True):
        assert o.model_input.to_ints() == b.model_input.to_ints()
        for k, v in o.loss_fn_inputs.items():
            np.testing.assert_array_equal(v.to_numpy(), b.loss_fn_inputs[k].to_numpy())
            assert v.dtype == b.loss_fn_inputs[k].dtype
    transport = Transport()
    with _client(server, transport) as c:
        jr.remote.forward_backward_custom(
            c.create_model(), originals, base=jr.losses.cross_entropy
        ).result()
    (body,) = transport.bodies("forward_backward")
    for o, sent in zip(originals, body["forward_backward_input"]["data"], strict=True):
        assert sent["model_input"]["chunks"][0]["tokens"] == o.model_input.to_ints()
        got = jr.remote.to_datum(sent)
        np.testing.assert_array_equal(
            got.loss_fn_inputs["target_tokens"], o.loss_fn_inputs["target_tokens"].to_numpy()
        )
        np.testing.assert_array_equal(
            got.loss_fn_inputs["weights"], o.loss_fn_inputs["weights"].to_numpy()
        )


class _SDKLike:
    """The official ``tinker.TrainingClient`` interface (tinker types in and out), served
    by the reference service, to drive :class:`jaxreg.remote.TinkerTrainingClient`."""

    def __init__(self, training):
        self.training = training
        self.types = pytest.importorskip("tinker.types")

    def _call(self, method, data, loss_fn):
        assert all(isinstance(d, self.types.Datum) for d in data)
        out = getattr(self.training, method)(
            [jr.remote.to_datum(d) for d in data], loss_fn
        ).result()
        outs = [
            {k: self.types.TensorData.from_numpy(v) for k, v in o.items()}
            for o in out["loss_fn_outputs"]
        ]
        value = self.types.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord", loss_fn_outputs=outs, metrics=out["metrics"]
        )
        return type("Future", (), {"result": lambda self, timeout=None: value})()

    def forward(self, data, loss_fn):
        return self._call("forward", data, loss_fn)

    def forward_backward(self, data, loss_fn):
        return self._call("forward_backward", data, loss_fn)


def test_tinker_training_client_adapter(server, client):
    data = datums("I", 2, seed=17)
    builtin = client.create_model()
    builtin.forward_backward(data)
    builtin.optim_step(ADAM).result()
    training = client.create_model()
    result = jr.remote.forward_backward_custom(
        _SDKLike(training), data, base=jr.losses.cross_entropy
    )
    assert result.done()  # the SDK orders requests itself: the adapter runs in the caller
    training.optim_step(ADAM).result()
    assert_trees_equal(
        params_of(training, server, "sdk")[0], params_of(builtin, server, "sdk_ref")[0]
    )


def _train(training, data, objective, steps, pipelined=True):
    for i in range(steps):
        batch = data[i % 2 :: 2]
        future = jr.remote.forward_backward_custom(
            training, batch, objective, weights={"kl": 0.1 * (i + 1)}
        )
        if pipelined:
            step = training.optim_step(ADAM)
            future.result()
        else:
            future.result()
            step = training.optim_step(ADAM)
        step.result()


def test_fault_injection_every_step_exactly_once(server, client, objective):
    data = _with_ref(client, datums("I", 4, seed=18))
    reference = client.create_model()
    _train(reference, data, objective, 4, pipelined=False)
    faults = {
        "*": {
            "connect": 0.15,
            "lose_response": 0.15,
            "429": 0.1,
            "500": 0.1,
            "503": 0.05,
            "delay": 0.1,
        }
    }
    transport = Transport(faults, seed=3)
    retry = jr.remote.RetryPolicy(max_retries=30, base=0.001, cap=0.01, seed=0)
    with _client(server, transport, retry=retry) as c:
        training = c.training_client(c.create_model().model_id)
        _train(training, data, objective, 4)
        assert training.get_info()["step"] == 4
        faulty = params_of(training, server, "faulty")[0]
    assert transport.injected.get("lose_response", 0) > 0 and transport.injected.get("connect")
    assert_trees_equal(faulty, params_of(reference, server, "faultless")[0])


def test_exhausted_retries_raise_and_apply_nothing(server, client):
    data = datums("I", 2, seed=19)
    transport = Transport({"forward_backward": {"500": 1.0}})
    retry = jr.remote.RetryPolicy(max_retries=2, base=0.001, cap=0.001)
    with _client(server, transport, retry=retry) as c:
        training = c.create_model()
        before = params_of(training, server, "retry_before")[0]
        future = jr.remote.forward_backward_custom(training, data, base=jr.losses.cross_entropy)
        with pytest.raises(jr.remote.RemoteError, match=r"forward_backward .*HTTP 500") as e:
            future.result()
        assert e.value.status == 500 and e.value.seq_id == future.seq_ids[1]
        training.optim_step(ADAM).result(timeout=30)
        assert_trees_equal(params_of(training, server, "retry_after")[0], before)


def test_async_api_matches_sync(server, client, objective):
    data = _with_ref(client, datums("I", 4, seed=20))
    sync = client.create_model()
    _train(sync, data, objective, 2, pipelined=False)

    async def main(training):
        for i in range(2):
            future = await jr.remote.forward_backward_custom_async(
                training, data[i % 2 :: 2], objective, weights={"kl": 0.1 * (i + 1)}
            )
            step = await training.optim_step_async(ADAM)
            result = await future
            await step
        await training.service.aclose()
        return result

    training = client.create_model()
    result = asyncio.run(main(training))
    assert np.isfinite(result.metrics["loss:sum"])
    assert_trees_equal(params_of(training, server, "async")[0], params_of(sync, server, "sync")[0])


def test_capabilities_of_an_unreachable_service_is_a_remote_error():
    """Not a TypeError from the error path itself (a merge left an argument out)."""
    unreachable = jr.remote.ServiceClient("http://127.0.0.1:9")
    with unreachable, pytest.raises(jr.remote.RemoteError, match=r"capabilities.*after 1 attempt"):
        unreachable.capabilities()


def test_async_calls_from_successive_event_loops(server, client):
    """Each ``asyncio.run`` has its own loop; a closed loop's id can be reused by the next.

    The client kept one httpx.AsyncClient per ``id(loop)``, so a later loop with a
    recycled id got a client bound to a closed loop ("Event loop is closed").
    """
    training = client.create_model()
    data = datums("C", 1, seed=21)

    async def forward():
        return await (await training.forward_async(data)).result_async()

    for _ in range(4):
        out = asyncio.run(forward())
        assert out["loss_fn_outputs"][0]["logprobs"].shape == (len(data[0].tokens),)
        gc.collect()


def test_no_recompilation_across_random_lengths(server, client):
    objective = jr.compose(
        jr.losses.cross_entropy,
        [jr.Term("ent", jr.regularizers.entropy, 0.01)],
        track_grad_norms=True,
    )
    training = client.create_model()
    rng = np.random.default_rng(21)
    shapes = set()
    for i in range(12):
        data = datums("I", int(rng.integers(1, 5)), seed=100 + i)
        result = jr.remote.forward_backward_custom(training, data, objective).result()
        shapes.add(np.asarray(result.output.grad).shape)
    assert objective.trace_count == len(shapes) <= 4


# ----------------------------------------------------------------- the declared interface
class _Minimal:
    """Only ``forward`` and ``forward_backward``, as an official tinker client has."""

    def forward(self, data, loss_fn):
        raise AssertionError("not called")

    def forward_backward(self, data, loss_fn):
        raise AssertionError("not called")


def test_training_clients_have_the_declared_interface(client):
    from jaxreg._src.remote.protocol import SubmitsCustomSteps

    ours = client.training_client("model-never-used")  # sends nothing
    sdk = jr.remote.TinkerTrainingClient(_Minimal())
    typed: list[jr.remote.TrainingClientLike] = [ours, sdk]  # checked by mypy as well
    for training in typed:
        assert isinstance(training, jr.remote.TrainingClientLike)
    assert ours.synchronous is False
    assert sdk.synchronous is True  # no SDK id reservation: run in the caller's thread
    # Optional capabilities: only ours releases seq_ids, only the adapter submits steps.
    assert isinstance(ours, jr.remote.SupportsSkipSeq)
    assert not isinstance(sdk, jr.remote.SupportsSkipSeq)
    assert isinstance(sdk, SubmitsCustomSteps) and not isinstance(ours, SubmitsCustomSteps)
    future = jr.remote.APIFuture(ours, "forward", {"seq_id": 0}, "request-0")
    assert isinstance(future, jr.remote.ResultFuture)
    # An official-SDK-like client lacks the interface (it gets wrapped); so does a
    # client missing any one member.
    assert not isinstance(_Minimal(), jr.remote.TrainingClientLike)
    assert isinstance(_Recording(ours), jr.remote.TrainingClientLike)
    members = [
        "synchronous",
        "reserve_seq_ids",
        "forward",
        "forward_backward",
        "forward_async",
        "forward_backward_async",
    ]
    for name in members:
        partial = type("Partial", (), {k: v for k, v in vars(_Recording).items() if k != name})
        assert not isinstance(partial(ours), jr.remote.TrainingClientLike), name


class _Recording:
    """A third-party client with the declared interface and no ``skip_seq``: delegates to
    a jaxreg ``TrainingClient`` and records what it is asked."""

    synchronous = True

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def reserve_seq_ids(self, n=1):
        return self.inner.reserve_seq_ids(n)

    def forward(self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None):
        self.calls.append(("forward", seq_id, isinstance(data[0], Datum)))
        return self.inner.forward(data, loss_fn, loss_fn_config, seq_id=seq_id)

    def forward_backward(self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None):
        self.calls.append(("forward_backward", seq_id, isinstance(data[0], Datum)))
        return self.inner.forward_backward(data, loss_fn, loss_fn_config, seq_id=seq_id)

    async def forward_async(
        self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None
    ):
        self.calls.append(("forward_async", seq_id, isinstance(data[0], Datum)))
        return await self.inner.forward_async(data, loss_fn, loss_fn_config, seq_id=seq_id)

    async def forward_backward_async(
        self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None
    ):
        self.calls.append(("forward_backward_async", seq_id, isinstance(data[0], Datum)))
        return await self.inner.forward_backward_async(data, loss_fn, loss_fn_config, seq_id=seq_id)


def test_a_client_with_the_interface_is_driven_as_it_is(server, client):
    """Not wrapped as if it were the official SDK (which sends tinker datums and reads
    attributes of the SDK's output types)."""
    data = datums("I", 2, seed=24)
    builtin = client.create_model()
    builtin.forward_backward(data)
    builtin.optim_step(ADAM).result()
    training = client.create_model()
    recording = _Recording(training)
    assert isinstance(recording, jr.remote.TrainingClientLike)
    future = jr.remote.forward_backward_custom(recording, data, base=jr.losses.cross_entropy)
    assert future.done()  # synchronous: run in the caller's thread
    assert recording.calls == [("forward", 0, True), ("forward_backward", 1, True)]  # jaxreg Datums
    assert future.seq_ids == (0, 1)
    training.optim_step(ADAM).result()
    assert_trees_equal(
        params_of(training, server, "iface")[0], params_of(builtin, server, "iface_ref")[0]
    )


# ----------------------------------------------------------------- async save/load
def test_async_save_and_load_state(server, client):
    """``save_state_async``/``load_state_async``, submitted without waiting in between:
    the service applies them in call order, and loading restores the saved model."""
    from jaxreg.service import checkpoint

    data = datums("I", 2, seed=25)
    training = client.create_model()

    async def main():
        await training.forward_backward_async(data)
        await training.optim_step_async(ADAM)
        saved = await training.save_state_async("async_ckpt")
        at_save = await training.forward_async(data)
        await training.forward_backward_async(data)
        await training.optim_step_async(ADAM)
        moved = await training.forward_async(data)
        loaded = await training.load_state_async("jaxreg://async_ckpt")
        after_load = await training.forward_async(data)
        results = [await f for f in (saved, at_save, moved, loaded, after_load)]
        await training.service.aclose()
        return results

    saved, at_save, moved, loaded, after_load = asyncio.run(main())
    assert saved == {"type": "save_state", "path": "jaxreg://async_ckpt", "step": 1}
    assert loaded == {"type": "load_state", "path": "jaxreg://async_ckpt", "step": 1}
    assert training.get_info()["step"] == 1
    logprobs = [[o["logprobs"] for o in r["loss_fn_outputs"]] for r in (at_save, moved, after_load)]
    assert not all(np.array_equal(a, b) for a, b in zip(logprobs[0], logprobs[1], strict=True))
    for a, b in zip(logprobs[0], logprobs[2], strict=True):
        np.testing.assert_array_equal(a, b)
    on_disk, meta = checkpoint.load_tree(server.engine.state_dir / "async_ckpt.npz")
    assert meta["step"] == 1
    assert_trees_equal(params_of(training, server, "async_ckpt_after")[0], on_disk["params"])


def test_loading_a_state_that_does_not_fit_names_it_and_changes_nothing(server, client):
    from jaxreg.service import checkpoint

    training = client.create_model()
    before = params_of(training, server, "fit_before")[0]
    tree, meta = checkpoint.load_tree(server.engine.state_dir / "fit_before.npz")
    tree["params"] = jax.tree.map(lambda a: np.zeros((*a.shape, 2), a.dtype), tree["params"])
    checkpoint.save_tree(server.engine.state_dir / "misfit.npz", tree, meta)
    with pytest.raises(jr.remote.RemoteError, match=r"path: state 'misfit' does not fit") as e:
        training.load_state("misfit").result()
    assert e.value.category == "user"  # a 400 of the job that ran it
    assert "expected float32[" in str(e.value)  # names the first array that does not fit
    assert_trees_equal(params_of(training, server, "fit_after")[0], before)


# ----------------------------------------------------------------- retries
def test_retry_policy_decides_what_is_retried_and_how_long_to_wait():
    policy = jr.remote.RetryPolicy(max_retries=4, base=0.1, cap=0.5, seed=7, max_elapsed=10.0)
    reference = random.Random(7)  # full jitter: uniform(0, min(cap, base * 2**attempt))
    busy = httpx.Response(503)
    for attempt, bound in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5)]:  # 0.8 capped at 0.5
        assert policy.next_delay(attempt, busy, 0.0) == reference.uniform(0, bound)
    assert policy.next_delay(4, busy, 0.0) is None  # max_retries used up
    # Retry-After is honoured, capped at cap, floored at 0; unparsable: jitter instead.
    for header, expected in [("0.25", 0.25), ("60", 0.5), ("-3", 0.0)]:
        answer = httpx.Response(429, headers={"Retry-After": header})
        assert policy.next_delay(0, answer, 0.0) == expected
    garbled = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert policy.next_delay(0, garbled, 0.0) == reference.uniform(0, 0.1)
    # The last wait ends at the window's end; none starts after it.
    assert policy.next_delay(0, httpx.Response(429, headers={"Retry-After": "0.4"}), 9.9) == (
        pytest.approx(0.1)
    )
    assert policy.next_delay(0, busy, 10.0) is None
    # What is retried: RETRY_STATUS and transport failures; not other answers or errors.
    for status in (408, 425, 429, 500, 502, 503, 504):
        assert policy.retryable(httpx.Response(status))
    for status in (400, 401, 404, 409, 413, 422, 501):
        assert not policy.retryable(httpx.Response(status))
        assert policy.next_delay(0, httpx.Response(status), 0.0) is None
    assert policy.retryable(httpx.ConnectError("refused"))
    assert policy.retryable(httpx.ReadTimeout("slow"))
    assert not policy.retryable(ValueError("not a transport error"))  # type: ignore[arg-type]
    unbounded = jr.remote.RetryPolicy(seed=1)  # max_retries=None: the window only
    assert unbounded.next_delay(1000, busy, 29.0) is not None


def test_sync_and_async_posts_retry_the_same_way():
    """One retry loop for both paths: the same script of failures gives the same
    attempts, answer, telemetry and errors."""
    from jaxreg._src.core import telemetry

    script = [
        lambda r: httpx.ConnectError("refused", request=r),
        lambda r: httpx.Response(503, json={"error": "busy"}),
        lambda r: httpx.Response(429, headers={"Retry-After": "0"}),
        lambda r: httpx.Response(200, json={"echo": json.loads(r.content)}),
        lambda r: httpx.Response(503, json={"error": "busy"}),
        lambda r: httpx.Response(400, json={"error": "seq_id: expected an int"}),
    ]

    def scripted():
        calls = iter(script)
        seen = []

        def handle(request):
            seen.append(request.url.path)
            out = next(calls)(request)
            if isinstance(out, Exception):
                raise out
            return out

        return handle, seen

    def run(post):
        retries = []
        telemetry.attach(
            "test-retry",
            ("jaxreg", "remote", "request", "stop"),
            lambda e, m, md: retries.append(m["retries"]),
        )
        try:
            answer = post("forward", {"model_id": "m", "seq_id": 3})
            with pytest.raises(jr.remote.RemoteError) as e:
                post("forward", {"model_id": "m", "seq_id": 4})
        finally:
            telemetry.detach("test-retry")
        return answer, retries, e.value

    policy = dict(base=0.001, cap=0.001, seed=0)
    handle, seen_sync = scripted()
    with jr.remote.ServiceClient(
        "http://test", transport=httpx.MockTransport(handle), retry=jr.remote.RetryPolicy(**policy)
    ) as c:
        sync = run(c.post)
    handle, seen_async = scripted()
    c = jr.remote.ServiceClient(
        "http://test",
        async_transport=httpx.MockTransport(handle),
        retry=jr.remote.RetryPolicy(**policy),
    )

    async def post_async(endpoint, body):
        return await c.post_async(endpoint, body)

    def post(endpoint, body):
        return asyncio.run(post_async(endpoint, body))

    asynchronous = run(post)
    for (answer, retries, error), seen in [(sync, seen_sync), (asynchronous, seen_async)]:
        assert answer == {"echo": {"model_id": "m", "seq_id": 3}}
        assert retries == [3]
        assert seen == ["/api/v1/forward"] * 6
        assert error.status == 400 and error.seq_id == 4 and error.endpoint == "forward"
        assert "forward (model m, seq_id 4) failed: HTTP 400: seq_id: expected an int" in str(error)


def test_retries_give_up_after_max_retries_on_both_paths():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    retry = dict(max_retries=2, base=0.001, cap=0.001)
    with (
        jr.remote.ServiceClient(
            "http://test",
            transport=httpx.MockTransport(refuse),
            retry=jr.remote.RetryPolicy(**retry),
        ) as c,
        pytest.raises(jr.remote.RemoteError, match=r"get_info \(model m\) failed after 3 "),
    ):
        c.post("get_info", {"model_id": "m"})
    c = jr.remote.ServiceClient(
        "http://test",
        async_transport=httpx.MockTransport(refuse),
        retry=jr.remote.RetryPolicy(**retry),
    )
    with pytest.raises(jr.remote.RemoteError, match=r"get_info \(model m\) failed after 3 ") as e:
        asyncio.run(c.post_async("get_info", {"model_id": "m"}))
    assert isinstance(e.value.__cause__, httpx.ConnectError)
