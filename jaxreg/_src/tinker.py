"""Adapter for the official ``tinker`` SDK (``pip install 'jaxreg[tinker]'``).

Wraps a ``tinker.TrainingClient`` so that :func:`jaxreg.remote.forward_backward_custom`
can drive it: a Tinker user adds regularizers by changing one call::

  result = jr.remote.forward_backward_custom(tinker_training_client, data,
                                             base=..., regularizers=[...]).result()

The official SDK numbers its requests itself when they are submitted, so ids cannot
be reserved ahead: with Tinker, the forward and the backward are submitted before
``forward_backward_custom`` returns, and an ``optim_step`` submitted afterwards is
applied after them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxreg._src.wire import Datum


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
    """The :class:`~jaxreg.remote.TrainingClient` interface over a ``tinker.TrainingClient``."""

    synchronous = True  # the SDK orders requests at submission: run in the caller's thread

    def __init__(self, client: Any):
        self.client = client

    @classmethod
    def wrap(cls, client: Any) -> TinkerTrainingClient:
        if isinstance(client, cls):
            return client
        if not (hasattr(client, "forward") and hasattr(client, "forward_backward")):
            raise TypeError(
                "training: expected a jaxreg TrainingClient or a tinker.TrainingClient, "
                f"found {type(client).__name__}"
            )
        return cls(client)

    def reserve_seq_ids(self, n: int = 1) -> list[None]:
        return [None] * n

    def forward(self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None):
        out = self.client.forward([to_tinker_datum(d) for d in data], loss_fn).result()
        return _Done(_to_dict(out))

    def forward_backward(self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None):
        out = self.client.forward_backward([to_tinker_datum(d) for d in data], loss_fn)
        return _Done(_to_dict(out.result()))

    async def forward_async(
        self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None
    ):
        fut = await self.client.forward_async([to_tinker_datum(d) for d in data], loss_fn)
        return _Done(_to_dict(await fut.result_async()))

    async def forward_backward_async(
        self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None
    ):
        fut = await self.client.forward_backward_async([to_tinker_datum(d) for d in data], loss_fn)
        return _Done(_to_dict(await fut.result_async()))
