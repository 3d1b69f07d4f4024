"""A refused request never leaves the official SDK waiting (issue 20).

The tinker SDK numbers a model's requests itself (``seq_id``) and never resends a
number; it retries 408, 409, 429 and 5xx whatever ``x-should-retry`` says. So every
refusal of the front door must use up its ``seq_id`` and must not be a 409: after each
kind of refusal below, the client's next request is answered within 2 s (the service
would otherwise hold it for ``seq_wait_s``, 300 s by default, or the SDK would retry
for 300 s).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("tinker.proto.tinker_public_pb2")

from jaxreg.service import start, tasks  # noqa: E402
from jaxreg.service.limits import Limits  # noqa: E402

types = tinker.types
KEY = "tml-jaxreg-refusals"
ADAM = types.AdamParams(learning_rate=1e-3)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """One service with a small memory budget and one SDK training client."""
    srv = start(
        state_dir=tmp_path_factory.mktemp("refusals"),
        api_key=KEY,
        limits=Limits(memory_bytes=64 << 20),
    )
    service = tinker.ServiceClient(base_url=srv.url, api_key=KEY)
    try:
        training = service.create_lora_training_client(base_model="jaxreg-base", rank=2).result()
        # Compiled once here, so the timed requests below measure waiting, not compiling.
        training.forward_backward([_datum()], "cross_entropy").result(timeout=120)
        training.optim_step(ADAM).result(timeout=120)
        yield training
    finally:
        service.close("success").result(timeout=30)
        srv.stop()


def _datum(tokens=None, targets=None, **extra):
    e = tasks.make_examples("I", 1, seed=0, min_digits=2, max_digits=3)[0]
    tokens = e.tokens.tolist() if tokens is None else tokens
    targets = e.targets.astype(np.int64) if targets is None else targets
    inputs = {"target_tokens": targets, "weights": np.ones(len(targets), np.float32), **extra}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def _refusals():
    """(name, call) for every kind of refusal a training client's request can meet."""
    good = _datum()
    n = len(good.model_input.to_ints())
    big = _datum(tokens=[1] * 120, targets=np.ones(120, np.int64))
    rl = types.Datum(
        model_input=good.model_input,
        loss_fn_inputs={
            "target_tokens": good.loss_fn_inputs["target_tokens"],
            "logprobs": np.zeros(n, np.float32),
            "advantages": np.ones(n, np.float32),
        },
    )
    return [
        ("unknown loss", lambda t: t.forward_backward([good], "no_such_loss")),
        ("OOV token", lambda t: t.forward_backward([_datum(tokens=[10**6] * n)], "cross_entropy")),
        (
            "bad shape",
            lambda t: t.forward_backward(
                [_datum(targets=np.ones(n + 3, np.int64))], "cross_entropy"
            ),
        ),
        (
            "input the loss does not take",
            lambda t: t.forward_backward(
                [_datum(advantages=np.ones(n, np.float32))], "cross_entropy"
            ),
        ),
        (
            "bad loss config",
            lambda t: t.forward_backward(
                [_datum(logprobs=np.zeros(n, np.float32), advantages=np.ones(n, np.float32))],
                "ppo",
                {"clip_low_threshold": 2.0, "clip_high_threshold": 1.0},
            ),
        ),
        ("over the memory budget", lambda t: t.forward_backward([big] * 256, "cross_entropy")),
        (
            "stable_reinforce without provenance",
            lambda t: t.forward_backward([rl], "stable_reinforce"),
        ),
        (
            "stable_reinforce naming an unrecorded sequence",
            lambda t: t.forward_backward(
                [
                    rl.with_provenance(
                        [types.SampledProvenanceSpan(sequence_id="nope", length=n)],
                        [types.SampledProvenanceSpan(sequence_id="nope", length=n)],
                    )
                ],
                "stable_reinforce",
            ),
        ),
        (
            "bad adam params",
            lambda t: t.optim_step(types.AdamParams(learning_rate=1e-3, beta1=1.5)),
        ),
        ("existing checkpoint name", lambda t: t.save_state("taken")),
        ("bad checkpoint name", lambda t: t.save_state("no spaces allowed")),
        ("unknown checkpoint", lambda t: t.load_state(f"tinker://{t.model_id}/weights/nope")),
        (
            "sampler weights loaded as state",
            lambda t: t.load_state(f"tinker://{t.model_id}/sampler_weights/nope"),
        ),
    ]


@pytest.mark.filterwarnings("ignore:DEPRECATED:FutureWarning")
@pytest.mark.parametrize("name", [n for n, _ in _refusals()])
def test_the_next_request_is_answered_at_once(training, name):
    if name == "existing checkpoint name":
        training.save_state("taken").result(timeout=60)
    call = dict(_refusals())[name]
    with pytest.raises(Exception) as refused:  # the SDK raises various classes
        call(training).result(timeout=10)
    assert not isinstance(refused.value, tinker.ConflictError), "a 409 makes the SDK retry"
    start_s = time.monotonic()
    out = training.forward_backward([_datum()], "cross_entropy").result(timeout=10)
    training.optim_step(ADAM).result(timeout=10)
    elapsed = time.monotonic() - start_s
    assert np.isfinite(out.metrics["loss:sum"])
    assert elapsed < 2.0, f"after a refusal ({name}) the next request took {elapsed:.1f}s"


def test_existing_name_is_refused_once_naming_it(training):
    training.save_state("twice").result(timeout=60)
    start_s = time.monotonic()
    with pytest.raises(tinker.BadRequestError, match="twice"):
        training.save_state("twice").result(timeout=30)
    assert time.monotonic() - start_s < 2.0  # not retried
