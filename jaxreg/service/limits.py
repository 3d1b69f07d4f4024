"""The service's resource limits: how much one request may ask for, and for how long.

``Limits`` gathers every bound the engine enforces; ``work_bytes`` is the
activation memory a ``forward`` or ``forward_backward`` of a padded ``[B, T]`` (or
``[B, T, K]``) batch needs, an upper bound fitted to XLA's own accounting
(``compiled.memory_analysis()``) and to the peak RSS measured by
``benchmarks/service_limits_bench.py``:

.. math::

   \\text{forward}: 4B\\,(3HT^2 + 8Td + 4TK + 2TV)\\qquad
   \\text{backward}: 4B\\,(5LHT^2 + 40LTd + 8TK + 4TV)

(float32 bytes; ``H`` heads, ``L`` layers, ``d`` width, ``V`` vocabulary, ``K`` targets
per position, 1 for ``[B, T]`` targets). The attention scores ``[B, H, T, T]`` dominate
at long contexts. Requests run only while the sum of their estimates fits in
``memory_bytes``; a request that could never fit is refused with 413.

Example:
  >>> limits = Limits(memory_bytes=512 << 20, max_models=16)
  >>> work_bytes(ModelConfig(), batch=8, length=1024, targets=1, backward=True) > 1 << 30
  True
"""

from __future__ import annotations

import dataclasses
import math

from jaxreg.service.model import ModelConfig

MAX_SEQ_ID = (1 << 53) - 1
"""The largest ``seq_id`` accepted (exact in a float64 JSON number)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Every bound the engine enforces (each is configurable; see ``jaxreg serve -h``).

    Attributes:
      max_tokens: the most token-targets one request may carry: the sum over datums of
        ``T`` (``[T]`` targets) or ``T * K`` (``[T, K]`` targets).
      memory_bytes: the activation memory that running requests may use together
        (``work_bytes``); a request needing more is refused with 413.
      max_models: the most models held at once; ``create_model`` beyond it is a 409.
      model_ttl_s: a model with no request for this many seconds is deleted
        (``None``: never).
      max_seq_ahead: a ``seq_id`` may be at most this far ahead of the next one the
        model expects (and never above ``MAX_SEQ_ID``).
      seq_wait_s: a request waiting this long for a missing predecessor fails, naming
        the missing ``seq_id`` s.
      remember_seqs: how many applied ``seq_id`` s each model remembers, to answer
        retries with the first request's id.
      workers: threads running requests; one model's requests always run one at a
        time, in order, and different models' requests run side by side.
    """

    max_tokens: int = 1 << 20
    memory_bytes: int = 1 << 30
    max_models: int = 64
    model_ttl_s: float | None = 6 * 3600.0
    max_seq_ahead: int = 1 << 16
    seq_wait_s: float = 300.0
    remember_seqs: int = 1 << 14
    workers: int = 4

    def __post_init__(self):
        for name in ("max_tokens", "memory_bytes", "max_models", "max_seq_ahead"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name}: expected a positive int, found {value!r}")
        for name in ("remember_seqs", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name}: expected a positive int, found {value!r}")
        for name in ("model_ttl_s", "seq_wait_s"):
            value = getattr(self, name)
            if name == "model_ttl_s" and value is None:
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"Limits.{name}: expected a positive number of seconds, found {value!r}"
                )


def work_bytes(cfg: ModelConfig, batch: int, length: int, targets: int, backward: bool) -> int:
    """An upper bound of the activation memory of one padded request, in bytes.

    Args:
      cfg: the model's architecture.
      batch, length: the padded ``[B, T]`` shape.
      targets: ``K`` for ``[B, T, K]`` targets, 1 for ``[B, T]``.
      backward: ``forward_backward`` (activations kept for the gradient) or ``forward``.
    """
    b, t, k = batch, length, max(1, targets)
    h, d, v, n = cfg.n_heads, cfg.d_model, cfg.vocab_size, cfg.n_layers
    if backward:
        per_datum = 5 * n * h * t * t + 40 * n * t * d + 8 * t * k + 4 * t * v
    else:
        per_datum = 3 * h * t * t + 8 * t * d + 4 * t * k + 2 * t * v
    return 4 * b * per_datum


def mib(n: int) -> str:
    """``n`` bytes in MiB, for messages."""
    return f"{n / (1 << 20):.0f} MiB"
