"""Adapter for the official ``tinker`` SDK (``pip install 'jaxreg[tinker]'``).

Wraps a ``tinker.TrainingClient`` so that
[`jaxreg.remote.forward_backward_custom`][jaxreg.remote.forward_backward_custom]
can drive it: a Tinker user adds regularizers by changing one call::

  result = jr.remote.forward_backward_custom(tinker_training_client, data,
                                             base=..., regularizers=[...]).result()

As the SDK's own ``forward_backward_custom`` does, the adapter reserves the forward's
and the backward's request ids together when called (so another thread's request
cannot land between them), sends the same forward payload (``target_tokens`` and
``weights``, zeros when absent), and returns a future at once: an ``optim_step``
submitted right after it is applied after the backward, and a training loop can
pipeline its requests. When the objective fails (a non-finite loss, say), the reserved
backward ids are filled with a zero-weight backward (no gradient), so the SDK client
stays usable, and the future raises the error.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxreg._src.remote.futures import EXECUTOR, CustomFuture
from jaxreg._src.remote.wire import Datum


def _tinker_types():
    try:
        import tinker.types as types
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the official tinker SDK is not installed: pip install 'jaxreg[tinker]'"
        ) from e
    return types


def to_tinker_datum(datum: Datum):
    """A ``tinker.types.Datum`` with the same tokens and loss inputs."""
    types = _tinker_types()
    return types.Datum(
        model_input=types.ModelInput.from_ints([int(t) for t in datum.tokens]),
        loss_fn_inputs={
            k: types.TensorData.from_numpy(np.asarray(v)) for k, v in datum.loss_fn_inputs.items()
        },
    )


class _Done:
    """An already-computed result with the future interface used by the adapter."""

    def __init__(self, value: dict[str, Any]):
        self._value = value

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        return self._value

    async def result_async(self) -> dict[str, Any]:
        return self._value


def _to_dict(output: Any) -> dict[str, Any]:
    outs = [
        {k: np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v) for k, v in o.items()}
        for o in output.loss_fn_outputs
    ]
    return {"loss_fn_outputs": outs, "metrics": dict(getattr(output, "metrics", {}) or {})}


class TinkerTrainingClient:
    """The [`TrainingClientLike`][jaxreg.remote.TrainingClientLike] interface over a
    ``tinker.TrainingClient``, plus
    [`submit_custom`][jaxreg.remote.TinkerTrainingClient.submit_custom] (``SubmitsCustomSteps``).

    It has no ``skip_seq``: the SDK numbers requests when it sends them, and a failed
    custom step fills its reserved backward ids itself.
    """

    def __init__(self, client: Any):
        self.client = client

    @property
    def synchronous(self) -> bool:
        """True for a client without the SDK's id reservation (run in the caller's thread)."""
        return not hasattr(self.client, "_reserve_request_ids")

    @classmethod
    def wrap(cls, client: Any) -> TinkerTrainingClient:
        """``client`` adapted (itself when already adapted); raises ``TypeError`` for an
        object without ``forward`` and ``forward_backward``."""
        if isinstance(client, cls):
            return client
        if not (hasattr(client, "forward") and hasattr(client, "forward_backward")):
            raise TypeError(
                "training: expected a jaxreg TrainingClient or a tinker.TrainingClient, "
                f"found {type(client).__name__}"
            )
        return cls(client)

    def reserve_seq_ids(self, n: int = 1) -> list[None]:
        """``n`` times ``None``: the SDK numbers requests itself."""
        return [None] * n

    # The SDK numbers requests itself: ``seq_id`` (``None``, from reserve_seq_ids) and
    # ``loss_fn_config`` are not sent.
    def _submit(self, method: str, data: Sequence[Any], loss_fn: str) -> Any:
        return getattr(self.client, method)([to_tinker_datum(d) for d in data], loss_fn)

    def forward(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> _Done:
        """The SDK's ``forward``, waited for: per-datum ``logprobs`` as NumPy arrays."""
        return _Done(_to_dict(self._submit("forward", data, loss_fn).result()))

    def forward_backward(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> _Done:
        """The SDK's ``forward_backward``, waited for."""
        return _Done(_to_dict(self._submit("forward_backward", data, loss_fn).result()))

    async def forward_async(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> _Done:
        """The ``async`` form of [`forward`][jaxreg.remote.TinkerTrainingClient.forward]."""
        return _Done(_to_dict(await self._submit("forward", data, loss_fn).result_async()))

    async def forward_backward_async(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> _Done:
        """The ``async`` form of ``forward_backward``."""
        future = self._submit("forward_backward", data, loss_fn)
        return _Done(_to_dict(await future.result_async()))

    # ------------------------------------------------------------ forward_backward_custom
    def forward_data(self, data: list[Any], datums: list[Datum]) -> list[Any]:
        """The SDK's own custom-loss forward payload: ``target_tokens`` and ``weights``."""
        types = _tinker_types()
        out = []
        for raw, d in zip(data, datums, strict=True):
            model_input = getattr(raw, "model_input", None) or to_tinker_datum(d).model_input
            targets = np.asarray(d.loss_fn_inputs["target_tokens"])
            weights = d.loss_fn_inputs.get("weights")
            weights = np.zeros(targets.shape, np.float32) if weights is None else weights
            out.append(
                types.Datum(
                    model_input=model_input,
                    loss_fn_inputs={
                        "target_tokens": types.TensorData.from_numpy(targets.astype(np.int64)),
                        "weights": types.TensorData.from_numpy(np.asarray(weights, np.float32)),
                    },
                )
            )
        return out

    def submit_custom(self, state: Any) -> Any:
        """Reserves the forward's and backward's ids together; returns a ``CustomFuture``.

        Submits the forward at once (the SDK sends it in id order) and runs the
        objective and the backward on a background thread.
        """
        from tinker.lib.public_interfaces.training_client import _ReservedRequestChunk

        client = self.client
        forward_data = self.forward_data(state.data, state.datums)
        chunks = list(client._chunked_requests_generator(forward_data))
        n = len(chunks)
        ids = client._reserve_request_ids(2 * n)  # both phases, before anything else
        forward_requests = [
            _ReservedRequestChunk(rid, c.data, c.estimated_bytes_count)
            for rid, c in zip(ids[:n], chunks, strict=True)
        ]
        forward = client._run_fwd_bwd(forward_requests, "cross_entropy", None, forward_only=True)

        def backward(datums):
            types = _tinker_types()
            requests, offset = [], 0
            for rid, chunk in zip(ids[n:], forward_requests, strict=True):
                part = []
                for fwd, d in zip(
                    chunk.data, datums[offset : offset + len(chunk.data)], strict=True
                ):
                    part.append(
                        types.Datum(
                            model_input=fwd.model_input,
                            loss_fn_inputs={
                                "target_tokens": fwd.loss_fn_inputs["target_tokens"],
                                "weights": types.TensorData.from_numpy(
                                    np.asarray(d.loss_fn_inputs["weights"], np.float32)
                                ),
                            },
                        )
                    )
                offset += len(chunk.data)
                requests.append(_ReservedRequestChunk(rid, part, chunk.estimated_bytes_count))
            return client._run_fwd_bwd(requests, "cross_entropy", None, forward_only=False)

        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fwd = forward.result()
                logprobs, out, linear = state.compute(_to_dict(fwd))
            except BaseException as e:
                # Fill the reserved backward ids (zero weights: no gradient) so that the
                # client's later requests are not left waiting for them.
                zero = [
                    Datum(d.tokens, {"weights": np.zeros(len(d.tokens), np.float32)})
                    for d in state.datums
                ]
                try:
                    backward(zero).result()
                finally:
                    future.set_exception(e)
                return
            try:
                bwd = backward(linear).result()
                future.set_result(state.finish(_to_dict(bwd), logprobs, out))
            except BaseException as e:
                future.set_exception(e)

        EXECUTOR.get().submit(run)
        return CustomFuture(future, (ids[0] + 1, ids[n] + 1))  # seq_ids as sent (from 1)
