"""What ``forward_backward_custom`` needs of a training client.

[`TrainingClientLike`][jaxreg.remote.TrainingClientLike] is the interface it drives: jaxreg's own
[`TrainingClient`][jaxreg.remote.TrainingClient] (HTTP to a jaxreg or Tinker-like service) and
[`TinkerTrainingClient`][jaxreg.remote.TinkerTrainingClient] (the official ``tinker`` SDK) both have
it, and any other client that has it is driven as it is. Anything else (an official
``tinker.TrainingClient``, say) is wrapped in a ``TinkerTrainingClient`` first.

Optional capabilities are protocols of their own, checked with ``isinstance``:
[`SupportsSkipSeq`][jaxreg.remote.SupportsSkipSeq] (a reserved ``seq_id`` can be released when a
step fails before its backward was sent) and ``SubmitsCustomSteps`` (the client submits the
whole custom step itself, as the SDK adapter does to reserve its request ids together).

The protocols are ``runtime_checkable``: ``isinstance`` checks that the members
exist, not their signatures (mypy checks those).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from jaxreg._src.remote.futures import CustomFuture


@runtime_checkable
class ResultFuture(Protocol):
    """A submitted request's pending result (``loss_fn_outputs``, ``metrics``, ...)."""

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Blocks until the result is there and returns it (raises what the request
        raised)."""
        ...

    async def result_async(self) -> dict[str, Any]:
        """The result, awaited without blocking the event loop."""
        ...


@runtime_checkable
class TrainingClientLike(Protocol):
    """A training client bound to one model, as ``forward_backward_custom`` drives it.

    A custom step reserves two ``seq_id`` s
    ([`reserve_seq_ids`][jaxreg.remote.TrainingClientLike.reserve_seq_ids]), sends a
    [`forward`][jaxreg.remote.TrainingClientLike.forward] with ``cross_entropy`` on the first, runs
    the objective on the logprobs, and sends a
    [`forward_backward`][jaxreg.remote.TrainingClientLike.forward_backward] with ``cross_entropy``
    and the linearised weights on the second. Loss outputs are dicts of NumPy arrays
    (``loss_fn_outputs[i]["logprobs"]``).

    Example:
      >>> import jaxreg as jr
      >>> service = jr.remote.ServiceClient("http://127.0.0.1:8000")  # connects lazily
      >>> isinstance(service.training_client("model-0"), jr.remote.TrainingClientLike)
      True
      >>> isinstance(jr.remote.TinkerTrainingClient(object()), jr.remote.TrainingClientLike)
      True
      >>> isinstance(object(), jr.remote.TrainingClientLike)
      False
    """

    @property
    def synchronous(self) -> bool:
        """Whether a custom step must run in the caller's thread, start to end.

        ``True`` for a client that orders requests by when they are *sent* (it has no
        ``seq_id`` s to reserve): running the step on a background thread would let a
        later call (an ``optim_step``) overtake the step's backward.
        """
        ...

    def reserve_seq_ids(self, n: int = 1) -> Sequence[int | None]:
        """Takes ``n`` sequence numbers now for requests sent later (``None`` each for a
        client without them)."""
        ...

    def forward(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> ResultFuture:
        """Submits a forward pass (changes nothing): per-datum ``logprobs``."""
        ...

    def forward_backward(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> ResultFuture:
        """Submits a forward and backward pass; the gradient accumulates on the model."""
        ...

    async def forward_async(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> ResultFuture:
        """The ``async`` form of [`forward`][jaxreg.remote.TrainingClientLike.forward]."""
        ...

    async def forward_backward_async(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> ResultFuture:
        """The ``async`` form of ``forward_backward``."""
        ...


@runtime_checkable
class SupportsSkipSeq(Protocol):
    """Optional: a client whose reserved ``seq_id`` s can be released.

    When a custom step fails after reserving its backward's ``seq_id`` (a non-finite
    loss, say), the id is released so the model's later requests do not wait for it.

    Example:
      >>> import jaxreg as jr
      >>> service = jr.remote.ServiceClient("http://127.0.0.1:8000")
      >>> isinstance(service.training_client("model-0"), jr.remote.SupportsSkipSeq)
      True
      >>> isinstance(jr.remote.TinkerTrainingClient(object()), jr.remote.SupportsSkipSeq)
      False
    """

    def skip_seq(self, seq_id: int) -> ResultFuture:
        """Tells the service that ``seq_id`` will never be sent."""
        ...


@runtime_checkable
class SubmitsCustomSteps(Protocol):
    """Optional: a client that submits a whole custom step itself (unless
    [`synchronous`][jaxreg.remote.TrainingClientLike.synchronous]).

    The official SDK numbers requests when they are sent; its adapter reserves the
    forward's and the backward's ids together and submits the forward at once.
    """

    def submit_custom(self, step: Any) -> CustomFuture:
        """Submits the step (jaxreg's private ``_Step``: data, objective, reserved ids);
        returns its future at once."""
        ...
