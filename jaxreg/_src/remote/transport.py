"""One POST to the service: its errors, the retry policy, and the retry loop.

``Exchange`` is the retry loop of one request without any I/O of its own: the
sync and the async client each drive it with their own HTTP client and sleep, so the
two paths cannot drift apart. [`RetryPolicy`][jaxreg.remote.RetryPolicy] decides what is retried and
how long to wait.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx

from jaxreg._src.core import telemetry
from jaxreg._src.core.errors import ConfigError, JaxregError

logger = logging.getLogger("jaxreg.remote")

Outcome = httpx.Response | httpx.TransportError
"""What one attempt ends with: the service's answer, or a connection failure."""


class RemoteError(JaxregError):
    """A request to the service failed; the message says which request and why.

    Attributes:
      endpoint: e.g. ``"forward_backward"``.
      status: the HTTP status, or ``None`` for a transport failure or a request that
        failed while running (``category`` then says whose fault it was).
      model_id: the request's model, when it had one.
      seq_id: the request's sequence number, when it had one.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        model_id: str | None = None,
        seq_id: int | None = None,
        category: str | None = None,
    ):
        super().__init__(message)
        self.endpoint, self.status, self.category = endpoint, status, category
        self.model_id, self.seq_id = model_id, seq_id


def describe(endpoint: str, body: Mapping[str, Any]) -> str:
    """``"forward (model m-1, seq_id 3)"``: a request as errors and logs name it."""
    parts = [
        p
        for p in (
            f"model {body['model_id']}" if body.get("model_id") else "",
            f"seq_id {body['seq_id']}" if body.get("seq_id") is not None else "",
        )
        if p
    ]
    return f"{endpoint}" + (f" ({', '.join(parts)})" if parts else "")


def request_error(
    endpoint: str,
    body: Mapping[str, Any],
    what: str,
    *,
    status: int | None = None,
    category: str | None = None,
) -> RemoteError:
    """A [`RemoteError`][jaxreg.remote.RemoteError] about one request: the message is the request as
    ``describe`` names it followed by ``what``; it carries the model and ``seq_id``."""
    return RemoteError(
        f"{describe(endpoint, body)}{what}",
        endpoint=endpoint,
        status=status,
        model_id=body.get("model_id"),
        seq_id=body.get("seq_id"),
        category=category,
    )


def http_error(endpoint: str, body: Mapping[str, Any], response: httpx.Response) -> RemoteError:
    """The error for an HTTP error answer, with the service's reason."""
    try:
        reason = response.json().get("error", response.text)
    except (ValueError, AttributeError):
        reason = response.text[:500]
    status = response.status_code
    return request_error(endpoint, body, f" failed: HTTP {status}: {reason}", status=status)


def gave_up(
    endpoint: str, body: Mapping[str, Any], error: Exception, attempts: int, elapsed: float
) -> RemoteError:
    """The error for a request that failed to reach the service ``attempts`` times."""
    return request_error(
        endpoint,
        body,
        f" failed after {attempts} attempts over {elapsed:.1f}s: {type(error).__name__}: {error}",
    )


class RetryPolicy:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``.

    Connection errors, timeouts and the answers in ``RETRY_STATUS`` (408, 425,
    429, 5xx) are retried until ``max_elapsed`` seconds have passed since the first
    attempt (the last wait is shortened to end there), or after ``max_retries``
    retries when that is set. The default window, 30 s, outlasts a restart of the
    service. A ``Retry-After`` header is honoured (up to ``cap``).

    Args:
      max_retries: the most retries (``None``: bounded by ``max_elapsed`` only).
      base: the backoff's first wait, in seconds.
      cap: the backoff's largest wait, in seconds.
      seed: for reproducible jitter.
      max_elapsed: seconds from the first attempt after which no retry starts.

    Example:
      >>> import httpx
      >>> from jaxreg.remote import RetryPolicy
      >>> policy = RetryPolicy(max_retries=2, base=0.5, seed=0)  # or max_elapsed=120.0
      >>> policy.next_delay(0, httpx.Response(503, headers={"Retry-After": "1.5"}), 0.0)
      1.5
      >>> policy.next_delay(0, httpx.Response(400), 0.0) is None  # not worth retrying
      True
      >>> policy.next_delay(2, httpx.ConnectError("refused"), 0.0) is None  # 2 retries done
      True
    """

    RETRY_STATUS: ClassVar[frozenset[int]] = frozenset({408, 425, 429, 500, 502, 503, 504})

    def __init__(
        self,
        max_retries: int | None = None,
        base: float = 0.1,
        cap: float = 2.0,
        seed: int | None = None,
        *,
        max_elapsed: float = 30.0,
    ):
        if max_retries is not None and max_retries < 0:
            raise ConfigError(f"max_retries: expected >= 0 or None, found {max_retries!r}")
        if not max_elapsed >= 0:
            raise ConfigError(f"max_elapsed: expected seconds >= 0, found {max_elapsed!r}")
        self.max_retries, self.base, self.cap = max_retries, base, cap
        self.max_elapsed = max_elapsed
        self._rng = random.Random(seed)

    def retryable(self, outcome: Outcome) -> bool:
        """Whether a failed attempt may succeed when repeated: a connection failure, or
        an answer in ``RETRY_STATUS``."""
        if isinstance(outcome, httpx.Response):
            return outcome.status_code in self.RETRY_STATUS
        return isinstance(outcome, httpx.TransportError)

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """The backoff after attempt ``attempt`` (from 0), or the ``Retry-After`` seconds."""
        if retry_after is not None:
            try:
                return min(self.cap, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return self._rng.uniform(0, min(self.cap, self.base * 2**attempt))

    def next_delay(self, attempt: int, outcome: Outcome, elapsed: float) -> float | None:
        """The wait before retrying after attempt ``attempt`` failed with ``outcome``,
        ``elapsed`` seconds after the first attempt; ``None``: do not retry."""
        if self.max_retries is not None and attempt >= self.max_retries:
            return None
        left = self.max_elapsed - elapsed
        if left <= 0 or not self.retryable(outcome):
            return None
        retry_after = (
            outcome.headers.get("retry-after") if isinstance(outcome, httpx.Response) else None
        )
        return min(left, self.delay(attempt, retry_after))


_REQUEST_STOP = ("jaxreg", "remote", "request", "stop")


class Exchange:
    """The retry loop of one POST, without I/O: the sync and the async client drive it.

    A driver makes an attempt (``send`` or ``send_async``), hands its outcome
    to ``settle``, sleeps the wait that returns, and repeats until ``settle``
    returns ``None``; ``answer`` is then the JSON answer. ``settle`` raises
    [`RemoteError`][jaxreg.remote.RemoteError] when the outcome is final (an error answer not worth
    retrying, or the policy's window or retries used up).

    Example:
      >>> import httpx
      >>> from jaxreg._src.remote.transport import Exchange, RetryPolicy
      >>> exchange = Exchange(RetryPolicy(seed=0), "get_info", {"model_id": "m"})
      >>> exchange.settle(httpx.Response(503, headers={"Retry-After": "0.25"}))
      0.25
      >>> exchange.settle(httpx.Response(200, json={"step": 3})), exchange.answer
      (None, {'step': 3})
    """

    def __init__(self, policy: RetryPolicy, endpoint: str, body: Mapping[str, Any]):
        self.policy, self.endpoint, self.body = policy, endpoint, body
        self.path = f"/api/v1/{endpoint}"
        self.content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        self.attempt = 0
        self.answer: Any = None
        self._started, self._first = time.perf_counter(), time.monotonic()

    def send(self, http: httpx.Client) -> Outcome:
        """Makes one attempt with a sync client."""
        try:
            return http.post(self.path, content=self.content)
        except httpx.TransportError as e:
            return e

    async def send_async(self, http: httpx.AsyncClient) -> Outcome:
        """Makes one attempt with an async client."""
        try:
            return await http.post(self.path, content=self.content)
        except httpx.TransportError as e:
            return e

    def settle(self, outcome: Outcome) -> float | None:
        """``None`` when ``outcome`` is the answer (now in ``answer``), else the wait
        before the next attempt; raises [`RemoteError`][jaxreg.remote.RemoteError] when
        ``outcome`` is final."""
        if isinstance(outcome, httpx.Response) and outcome.status_code < 400:
            self._emit(outcome)
            self.answer = outcome.json()
            return None
        elapsed = time.monotonic() - self._first
        delay = self.policy.next_delay(self.attempt, outcome, elapsed)
        if delay is None:
            if isinstance(outcome, httpx.Response):
                raise http_error(self.endpoint, self.body, outcome)
            raise gave_up(self.endpoint, self.body, outcome, self.attempt + 1, elapsed) from outcome
        logger.info(
            "retrying %s in %.2fs after %s",
            describe(self.endpoint, self.body),
            delay,
            getattr(outcome, "status_code", type(outcome).__name__),
        )
        self.attempt += 1
        return delay

    def _emit(self, response: httpx.Response) -> None:
        """The ``("jaxreg", "remote", "request", "stop")`` telemetry event, when listened to."""
        if telemetry.active(_REQUEST_STOP):
            telemetry.execute(
                _REQUEST_STOP,
                {
                    "latency": time.perf_counter() - self._started,
                    "bytes_sent": len(self.content),
                    "bytes_received": len(response.content),
                    "retries": self.attempt,
                },
                {
                    "endpoint": self.endpoint,
                    "status": response.status_code,
                    "model_id": self.body.get("model_id"),
                    "seq_id": self.body.get("seq_id"),
                },
            )
