"""``forward_backward_custom``: a composed objective trained on a remote service.

The service only knows its built-in losses. A custom loss ``L(logprobs)`` is trained
through the cross-entropy loss by linearisation, as Tinker's own
``forward_backward_custom`` does:

1. ``forward`` with ``cross_entropy`` returns each datum's logprobs ``lp``;
2. the objective runs on the packed batch and gives ``g = dL/dlp``;
3. ``forward_backward`` with ``cross_entropy`` and ``weights = -g`` makes the service
   compute ``d/dθ [-sum(weights * lp)] = sum(g * dlp/dθ) = dL/dθ`` exactly.

Nothing is sent in step 3 unless every term's value and the whole gradient are finite
([`NonFiniteError`][jaxreg.NonFiniteError], naming the terms, is raised instead).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxreg._src.core.compose import Objective, compose
from jaxreg._src.core.guards import check_finite
from jaxreg._src.core.term import InputError
from jaxreg._src.remote.client import require_extension
from jaxreg._src.remote.futures import EXECUTOR, CustomFuture, CustomResult
from jaxreg._src.remote.param_diagnostics import (
    check_objective,
    parse_result,
    request_field,
)
from jaxreg._src.remote.protocol import (
    ResultFuture,
    SubmitsCustomSteps,
    SupportsSkipSeq,
    TrainingClientLike,
)
from jaxreg._src.remote.tinker import TinkerTrainingClient
from jaxreg._src.remote.wire import Datum, to_datum
from jaxreg._src.terms.batch import Batch, Bucket
from jaxreg._src.terms.tokens import SAMPLING_LOGPROBS

logger = logging.getLogger("jaxreg.remote")


def _objective(objective, base, regularizers, param_diagnostics, options) -> Objective:
    """The objective a custom step runs: the one given, or composed from ``base=`` and
    ``regularizers=`` (with per-term gradients for ``param_diagnostics``)."""
    if objective is not None:
        if base is not None or regularizers or options:
            raise TypeError(
                "forward_backward_custom: give either objective= or base=/regularizers= "
                "(with compose options), not both"
            )
        if not isinstance(objective, Objective):
            raise TypeError(
                f"objective: expected a jaxreg Objective (from jr.compose), found "
                f"{type(objective).__name__}"
            )
    else:
        if param_diagnostics:
            options = {"term_grads": True, **options}
        objective = compose(base, regularizers, **options)
    if param_diagnostics:
        check_objective(objective)
    return objective


def _pack(datums: list[Datum], logprobs: list[np.ndarray], bucket: Bucket, batch_bucket):
    """Packs the datums' ``loss_fn_inputs`` into a Batch, under their names.

    Tinker's ``logprobs`` (the sampling policy's) becomes ``sampling_logprobs``: in a
    jaxreg batch ``x`` is the current policy's logprobs.
    """
    names = sorted({k for d in datums for k in d.loss_fn_inputs})
    if "logprobs" in names and SAMPLING_LOGPROBS in names:
        raise InputError(
            f"loss_fn_inputs: both 'logprobs' (Tinker's name for the sampling policy's "
            f"logprobs) and {SAMPLING_LOGPROBS!r} (jaxreg's) are given; keep one"
        )
    inputs = {}
    for name in names:
        missing = [i for i, d in enumerate(datums) if name not in d.loss_fn_inputs]
        if missing:
            raise InputError(
                f"data[{missing[0]}].loss_fn_inputs: missing {name!r}, which other datums have"
            )
        key = SAMPLING_LOGPROBS if name == "logprobs" else name
        inputs[key] = [d.loss_fn_inputs[name] for d in datums]
    return Batch.from_ragged(logprobs, inputs, bucket=bucket, batch_bucket=batch_bucket)


# How far ``logsumexp`` of one position's returned logprobs may be from 0 for its targets
# to count as the whole vocabulary (float32 logprobs of a 32k vocabulary sum to 1 within
# about 1e-5; a top-K subset misses at least the smallest probability, rarely < 1e-3).
FULL_VOCABULARY_TOLERANCE = 1e-3


def check_full_vocabulary(datums: Sequence[Datum], logprobs: Sequence[np.ndarray]) -> None:
    """Raises unless every datum's targets are the whole vocabulary at every position.

    ``grad_space="logits"`` maps gradients with ``g - exp(x) * sum(g)``, which is exact
    only when the ``K`` targets of a position are ``K`` distinct tokens whose
    probabilities sum to 1, i.e. the whole vocabulary. Checked on the logprobs the
    service returned, so it needs no vocabulary size.
    """
    for i, (d, lp) in enumerate(zip(datums, logprobs, strict=True)):
        targets = np.asarray(d.loss_fn_inputs["target_tokens"])
        where = f"data[{i}].loss_fn_inputs['target_tokens']"
        if targets.ndim != 2:
            raise InputError(
                f"{where}: grad_space='logits' needs [T, K] targets spanning the whole "
                f"vocabulary at every position; found shape {targets.shape}. Use "
                "grad_space='x' for one target per position."
            )
        ordered = np.sort(targets, axis=-1)
        if targets.shape[1] > 1 and (ordered[:, 1:] == ordered[:, :-1]).any():
            row = int(np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(-1))[0][0])
            raise InputError(
                f"{where}[{row}]: grad_space='logits' needs K distinct tokens per position; "
                f"found repeated tokens in {targets[row].tolist()}"
            )
        lp = np.asarray(lp, np.float64)
        mass = np.logaddexp.reduce(lp, axis=-1) if lp.ndim == 2 else lp
        worst = int(np.argmax(np.abs(mass)))
        if abs(float(mass.flat[worst])) > FULL_VOCABULARY_TOLERANCE:
            raise InputError(
                f"{where}[{worst}]: grad_space='logits' needs the targets to span the whole "
                f"vocabulary, but their probabilities sum to {np.exp(mass.flat[worst]):.6f}, "
                "not 1 (a top-K subset?). The projection to logit space is not exact then: "
                "use grad_space='x'."
            )


def _linearised(datums, grads) -> list[Datum]:
    out = []
    for d, g in zip(datums, grads, strict=True):
        weights = -np.asarray(g, np.float32)
        fields = {"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": weights}
        out.append(Datum(d.tokens, fields))
    return out


class _Step:
    """The state of one ``forward_backward_custom`` call (shared by sync and async)."""

    def __init__(self, training, data, objective, weights, step, bucket, batch_bucket, param=False):
        self.param_diagnostics, self.param_field = param, None
        if not isinstance(training, TrainingClientLike):  # e.g. a tinker.TrainingClient
            training = TinkerTrainingClient.wrap(training)
        self.training: TrainingClientLike = training
        self.data = list(data)  # as given: host terms receive it
        self.datums = [to_datum(d, f"data[{i}]") for i, d in enumerate(self.data)]
        if not self.datums:
            raise InputError("data: expected at least one datum, found none")
        for i, d in enumerate(self.datums):
            if "target_tokens" not in d.loss_fn_inputs:
                raise InputError(f"data[{i}].loss_fn_inputs: missing 'target_tokens'")
        self.objective, self.weights, self.step = objective, weights, step
        self.bucket, self.batch_bucket = bucket, batch_bucket
        self.seq_ids = tuple(training.reserve_seq_ids(2))
        self.forward_data = [
            Datum(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"]})
            for d in self.datums
        ]

    def compute(self, forward_result):
        logprobs = [o["logprobs"] for o in forward_result["loss_fn_outputs"]]
        if self.objective.grad_space == "logits":
            check_full_vocabulary(self.datums, logprobs)
        x, batch = _pack(self.datums, logprobs, self.bucket, self.batch_bucket)
        out = self.objective(x, batch, weights=self.weights, step=self.step, data=self.data)
        grad, scalars = jax.device_get((out.grad, out.scalars))  # one transfer
        if not (np.isfinite(scalars).all() and np.isfinite(grad).all()):
            check_finite(out, "; nothing was sent to the service")  # names terms, raises
        if self.param_diagnostics:
            self.param_field = request_field(out, batch)
        return logprobs, out, _linearised(self.datums, batch.unpad(grad))

    def finish(self, backward_result, logprobs, out) -> CustomResult:
        service = backward_result.get("metrics", {})
        metrics = {k: v for k, v in service.items() if k != "loss:sum"}
        metrics.update(out.flat())
        metrics["loss:sum"] = metrics["loss_total"]
        metrics["surrogate_loss:sum"] = service.get("loss:sum", float("nan"))
        diagnostics = None
        if self.param_field is not None:
            diagnostics = parse_result(backward_result, self.param_field)
            metrics.update(diagnostics.metrics())
        return CustomResult(backward_result["loss_fn_outputs"], metrics, out, logprobs, diagnostics)

    def backward_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the backward request (the extension's field)."""
        return {} if self.param_field is None else {"param_diagnostics": self.param_field}


def forward_backward_custom(
    training: Any,
    data: Sequence[Any],
    objective: Objective | None = None,
    *,
    base: Any = None,
    regularizers: Sequence[Any] = (),
    weights: Mapping[str, Any] | None = None,
    step: Any = None,
    bucket: Bucket = "pow2",
    batch_bucket: Bucket = "pow2",
    param_diagnostics: bool = False,
    **compose_options: Any,
) -> CustomFuture:
    """Trains a composed objective on a remote service through its cross-entropy loss.

    Reserves two ``seq_id`` s (the forward and the backward) when called and returns a
    future at once; the work runs on a background thread. An ``optim_step`` submitted
    right after this call is therefore applied after the backward, in order.

    Args:
      training: a [`TrainingClient`][jaxreg.remote.TrainingClient] (or any client with the
        [`TrainingClientLike`][jaxreg.remote.TrainingClientLike] interface), or an official
        ``tinker.TrainingClient`` (adapted automatically).
      data: the datums (jaxreg ``Datum``, ``tinker.types.Datum`` or dicts); every
        ``loss_fn_inputs`` field reaches the objective as ``batch.inputs[name]``, except
        Tinker's ``logprobs`` (the sampling policy's), which arrives as
        ``batch.inputs["sampling_logprobs"]`` (``x`` holds the current logprobs).
      objective: from [`jaxreg.compose`][jaxreg.compose]. Or give ``base=`` / ``regularizers=`` and
        any ``compose`` option (``track_grad_norms=True``, ...) instead.
      weights: passed to the objective (no recompilation when they change).
      step: passed to the objective (no recompilation when it changes).
      bucket: padding of lengths (see [`jaxreg.Batch.from_ragged`][jaxreg.Batch.from_ragged]).
      batch_bucket: padding of the batch size (see
        [`jaxreg.Batch.from_ragged`][jaxreg.Batch.from_ragged]).
      param_diagnostics: also measure each term's gradient **w.r.t. the model's
        parameters** on the service (norms, cosines; ``result.param_diagnostics``). A
        jaxreg-service extension: needs the objective's ``term_grads=True`` (set
        automatically with ``base=``/``regularizers=``) and a service listing
        ``param_grad_diagnostics``; otherwise raises (``TermError``,
        [`UnsupportedExtensionError`][jaxreg.remote.UnsupportedExtensionError]) before anything is
        sent.

    Returns:
      A [`CustomFuture`][jaxreg.remote.CustomFuture]; its ``result()`` is a
      [`CustomResult`][jaxreg.remote.CustomResult]. It raises
      [`NonFiniteError`][jaxreg.NonFiniteError] (nothing sent; the reserved backward ``seq_id`` is
      released) or [`RemoteError`][jaxreg.remote.RemoteError].

    Example:
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> tokens = np.arange(1, 13)
      >>> inputs = {
      ...     "target_tokens": tokens + 1,
      ...     "weights": np.ones(12, np.float32),
      ...     "ref_logprobs": np.full(12, -3.0, np.float32),   # e.g. from the base model
      ... }
      >>> data = [jr.remote.Datum(tokens, inputs)] * 3
      >>> with jr.remote.ServiceClient(service_url) as client:
      ...     training = client.create_model()
      ...     result = jr.remote.forward_backward_custom(
      ...         training, data, base=jr.losses.cross_entropy,
      ...         regularizers=[jr.Term("kl", jr.regularizers.kl("ref_logprobs"), 0.1)],
      ...         track_grad_norms=True).result()
      ...     step = training.optim_step({"learning_rate": 1e-3}).result()
      ...     training.delete()
      >>> result.output.term_names, result.logprobs[0].shape
      (('base', 'kl'), (12,))
      >>> result.metrics["regularizers/kl/weight"], "regularizers/kl/grad_norm" in result.metrics
      (0.1, True)
    """
    obj = _objective(objective, base, regularizers, param_diagnostics, compose_options)
    if param_diagnostics:
        require_extension(training)
    state = _Step(training, data, obj, weights, step, bucket, batch_bucket, param_diagnostics)
    if (submitted := _submitted_by_client(state)) is not None:
        return submitted
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(_run_sync(state))
        except BaseException as e:
            future.set_exception(e)

    if state.training.synchronous:  # e.g. a tinker client without id reservation
        run()
    else:
        EXECUTOR.get().submit(run)
    return CustomFuture(future, state.seq_ids)


def _run_sync(state: _Step) -> CustomResult:
    training = state.training
    seq_f, seq_b = state.seq_ids
    sent = False
    try:
        fwd = training.forward(state.forward_data, "cross_entropy", seq_id=seq_f).result()
        logprobs, out, linear = state.compute(fwd)
        bwd_future: ResultFuture = training.forward_backward(
            linear, "cross_entropy", seq_id=seq_b, **state.backward_options()
        )
        sent = True
        return state.finish(bwd_future.result(), logprobs, out)
    finally:
        if not sent:
            _release(training, seq_b)


def _submitted_by_client(state: _Step) -> CustomFuture | None:
    """The step's future when its client submits custom steps itself (the official
    tinker SDK, which reserves the forward's and backward's ids together), else ``None``."""
    training = state.training
    if isinstance(training, SubmitsCustomSteps) and not training.synchronous:
        return training.submit_custom(state)
    return None


def _release(training: TrainingClientLike, seq_id: int | None) -> None:
    """Releases a reserved ``seq_id`` that will not be sent, when the client can."""
    if isinstance(training, SupportsSkipSeq) and seq_id is not None:
        try:
            training.skip_seq(seq_id).result()
        except Exception as e:  # the original error is raised; this one is reported
            logger.warning(
                "could not release reserved seq_id %s (%s); later requests of this model "
                "may wait for it",
                seq_id,
                e,
            )


async def forward_backward_custom_async(
    training: Any,
    data: Sequence[Any],
    objective: Objective | None = None,
    *,
    base: Any = None,
    regularizers: Sequence[Any] = (),
    weights: Mapping[str, Any] | None = None,
    step: Any = None,
    bucket: Bucket = "pow2",
    batch_bucket: Bucket = "pow2",
    param_diagnostics: bool = False,
    **compose_options: Any,
) -> CustomFuture:
    """The ``async`` form of ``forward_backward_custom`` (same arguments).

    Awaiting it reserves the ``seq_id`` s and submits the forward; await the returned
    [`CustomFuture`][jaxreg.remote.CustomFuture] for the result.
    """
    obj = _objective(objective, base, regularizers, param_diagnostics, compose_options)
    if param_diagnostics:
        await asyncio.to_thread(require_extension, training)
    state = _Step(training, data, obj, weights, step, bucket, batch_bucket, param_diagnostics)
    if (submitted := _submitted_by_client(state)) is not None:
        return submitted  # the official tinker SDK: submitted without blocking
    seq_f, seq_b = state.seq_ids
    training = state.training
    fwd_future = await training.forward_async(state.forward_data, "cross_entropy", seq_id=seq_f)

    async def run() -> CustomResult:
        sent = False
        try:
            fwd = await fwd_future.result_async()
            logprobs, out, linear = await asyncio.to_thread(state.compute, fwd)
            bwd = await training.forward_backward_async(
                linear, "cross_entropy", seq_id=seq_b, **state.backward_options()
            )
            sent = True
            return state.finish(await bwd.result_async(), logprobs, out)
        finally:
            if not sent:
                await asyncio.to_thread(_release, training, seq_b)

    task = asyncio.ensure_future(run())
    future: concurrent.futures.Future = concurrent.futures.Future()

    def done(t: asyncio.Task) -> None:
        if t.cancelled():
            future.cancel()
        elif t.exception() is not None:
            future.set_exception(t.exception())
        else:
            future.set_result(t.result())

    task.add_done_callback(done)
    return CustomFuture(future, state.seq_ids)
