"""What ``forward_backward_custom`` returns: ``CustomResult`` and ``CustomFuture``.

Both paths of [`forward_backward_custom`][jaxreg.remote.forward_backward_custom]
(``custom.py``, sync and async) and the tinker SDK's adapter (``tinker.py``, which
submits a whole custom step itself) hand back a ``CustomFuture``; ``EXECUTOR`` is the
threads that run custom steps in the background.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses

import numpy as np

from jaxreg._src.core.output import CompositeOutput
from jaxreg._src.core.pools import LazySingleton
from jaxreg._src.remote.param_diagnostics import ParamDiagnostics


@dataclasses.dataclass(frozen=True)
class CustomResult:
    """What [`forward_backward_custom`][jaxreg.remote.forward_backward_custom] returns.

    Attributes:
      loss_fn_outputs: the service's per-datum outputs of the backward request.
      metrics: the service's metrics, ``loss:sum`` (the custom loss),
        ``surrogate_loss:sum`` (the linearised loss the service computed) and the
        objective's [`flat`][jaxreg.CompositeOutput.flat] metrics.
      output: the [`CompositeOutput`][jaxreg.CompositeOutput] (device arrays).
      logprobs: the per-datum logprobs the loss was computed on.
      param_diagnostics: with ``param_diagnostics=True``, each term's gradient norm and
        the cosines **in parameter space**, measured by the service
        ([`ParamDiagnostics`][jaxreg.remote.ParamDiagnostics]; also in ``metrics`` as
        ``param/<term>/grad_norm``, ``param/total_grad_norm``, ``param/cos/<a>/<b>``);
        else ``None``.
    """

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]
    output: CompositeOutput
    logprobs: list[np.ndarray]
    param_diagnostics: ParamDiagnostics | None = None


class CustomFuture:
    """The pending result of ``forward_backward_custom``: ``result()`` or ``await``."""

    def __init__(self, future: concurrent.futures.Future, seq_ids: tuple[int, int]):
        self._future = future
        self.seq_ids = seq_ids

    def result(self, timeout: float | None = None) -> CustomResult:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()


EXECUTOR = LazySingleton(lambda: concurrent.futures.ThreadPoolExecutor(8, "jaxreg-custom"))
"""The threads that run custom steps in the background (shared, created on first use)."""


__all__ = ["EXECUTOR", "CustomFuture", "CustomResult"]
