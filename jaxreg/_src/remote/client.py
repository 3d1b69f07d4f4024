"""HTTP clients for the reference service and any service speaking its (Tinker's) protocol.

[`ServiceClient`][jaxreg.remote.ServiceClient] owns the connection pool (httpx, sync and async); its
[`create_model`][jaxreg.remote.ServiceClient.create_model] returns a
[`TrainingClient`][jaxreg.remote.TrainingClient] bound to one model, with the same methods as the
official SDK's ``TrainingClient``: ``forward``, ``forward_backward``, ``optim_step``,
``save_state``, ``load_state``, each returning a future (``.result()``), and ``*_async`` variants
returning awaitable futures.

Every work request carries a ``seq_id`` taken from the client's counter when the call
is made, so the service applies a model's requests in call order even when they
arrive out of order, and a retried request (same ``seq_id``) is never applied twice.
That makes retrying safe: connection errors, timeouts, 429 and 5xx answers are
retried with exponential backoff and jitter (``Retry-After`` is honoured) for up to
30 s by default, long enough for a restarted service to come back; any other error
raises [`RemoteError`][jaxreg.remote.RemoteError] naming the call, the model, the ``seq_id`` and the
service's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import numpy as np

from jaxreg._src.core import telemetry
from jaxreg._src.core.errors import JaxregError
from jaxreg._src.remote.wire import ENCODINGS, Datum, decode_tensor, to_datum

logger = logging.getLogger("jaxreg.remote")

API_KEY_HEADER = "X-API-Key"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


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


def _describe(endpoint: str, body: Mapping[str, Any]) -> str:
    parts = [
        p
        for p in (
            f"model {body['model_id']}" if body.get("model_id") else "",
            f"seq_id {body['seq_id']}" if body.get("seq_id") is not None else "",
        )
        if p
    ]
    return f"{endpoint}" + (f" ({', '.join(parts)})" if parts else "")


def _waiting_failed(endpoint, body, request_id, error: RemoteError) -> RemoteError:
    """A failure of ``retrieve_future``, told as a failure of the call it waited for."""
    return RemoteError(
        f"{_describe(endpoint, body)}: waiting for its result (request {request_id}) "
        f"failed: {error}",
        endpoint=endpoint,
        status=error.status,
        model_id=body.get("model_id"),
        seq_id=body.get("seq_id"),
    )


_REQUEST_STOP = ("jaxreg", "remote", "request", "stop")


def _emit(endpoint, body, content, response, started, attempt) -> None:
    """The ``("jaxreg", "remote", "request", "stop")`` telemetry event, when listened to."""
    if telemetry.active(_REQUEST_STOP):
        telemetry.execute(
            _REQUEST_STOP,
            {
                "latency": time.perf_counter() - started,
                "bytes_sent": len(content),
                "bytes_received": len(response.content),
                "retries": attempt,
            },
            {
                "endpoint": endpoint,
                "status": response.status_code,
                "model_id": body.get("model_id"),
                "seq_id": body.get("seq_id"),
            },
        )


class RetryPolicy:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``.

    Retries go on until ``max_elapsed`` seconds have passed since the first attempt
    (the last wait is shortened to end there), or after ``max_retries`` retries when
    that is set. The default window, 30 s, outlasts a restart of the service.

    Args:
      max_retries: the most retries (``None``: bounded by ``max_elapsed`` only).
      base: the backoff's first wait, in seconds.
      cap: the backoff's largest wait, in seconds.
      seed: for reproducible jitter.
      max_elapsed: seconds from the first attempt after which no retry starts.

    Example:
      >>> import jaxreg as jr
      >>> retry = jr.remote.RetryPolicy(max_elapsed=120.0, seed=0)   # a slow restart
      >>> with jr.remote.ServiceClient(service_url, retry=retry) as client:
      ...     client.healthz()
      {'status': 'ok'}
      >>> 0 <= retry.delay(3) <= min(retry.cap, retry.base * 2**3)   # full jitter
      True
      >>> retry.delay(0, retry_after="1.5")                          # Retry-After wins
      1.5
    """

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
            raise ValueError(f"max_retries: expected >= 0 or None, found {max_retries!r}")
        if not max_elapsed >= 0:
            raise ValueError(f"max_elapsed: expected seconds >= 0, found {max_elapsed!r}")
        self.max_retries, self.base, self.cap = max_retries, base, cap
        self.max_elapsed = max_elapsed
        self._rng = random.Random(seed)

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after is not None:
            try:
                return min(self.cap, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return self._rng.uniform(0, min(self.cap, self.base * 2**attempt))


class ServiceClient:
    """A connection to a training service (the reference service, or one like it).

    Args:
      base_url: e.g. ``"http://127.0.0.1:8000"``.
      api_key: sent in the ``X-API-Key`` header; never logged nor shown in ``repr``.
      timeout: seconds for one HTTP exchange.
      retry: the [`RetryPolicy`][jaxreg.remote.RetryPolicy] for connection errors, 429 and 5xx.
      tensor_encoding: ``"base64"`` (compact, the default) or ``"json"`` lists, for
        tensors sent and received.
      poll_timeout: how long the service may hold one ``retrieve_future`` call.
      transport: an httpx transport (for tests and fault injection).
      async_transport: an httpx async transport (for tests and fault injection).

    Example:
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> tokens = np.arange(1, 13)                  # a datum of 12 tokens
      >>> inputs = {"target_tokens": tokens + 1, "weights": np.ones(12, np.float32)}
      >>> data = [jr.remote.Datum(tokens, inputs)] * 3
      >>> with jr.remote.ServiceClient(service_url) as client:   # "http://127.0.0.1:8000"
      ...     training = client.create_model()
      ...     fb = training.forward_backward(data, "cross_entropy").result()
      ...     step = training.optim_step({"learning_rate": 1e-3}).result()
      ...     training.delete()
      >>> fb["loss_fn_outputs"][0]["logprobs"].shape, step["metrics"]["step"]
      ((12,), 1)
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        tensor_encoding: str = "base64",
        poll_timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ):
        if tensor_encoding not in ENCODINGS:
            raise ValueError(
                f"tensor_encoding: expected one of {ENCODINGS}, found {tensor_encoding!r}"
            )
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.retry = retry or RetryPolicy()
        self.tensor_encoding = tensor_encoding
        self.poll_timeout = poll_timeout
        headers = {b"content-type": b"application/json"}
        if api_key:  # as UTF-8 bytes: any character works, as on the service
            headers[API_KEY_HEADER.encode()] = api_key.encode("utf-8")
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        # Without TCP_NODELAY, a request's body waits for the ACK of its headers, which
        # the server delays by ~40 ms (Nagle + delayed ACK): set it on every connection.
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = transport or httpx.HTTPTransport(limits=limits, socket_options=nodelay)
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self._ahttp_args: dict[str, Any] = dict(
            base_url=self.base_url, headers=headers, timeout=timeout
        )
        # Pooled connections belong to the event loop that opened them, so each loop gets
        # its own transport, unless the caller gave one (and then owns its lifetime).
        self._async_transport = async_transport
        self._async_transport_args: dict[str, Any] = dict(limits=limits, socket_options=nodelay)
        # Keyed by the loop itself, weakly: an id() can be reused by a later loop once the
        # first is closed, and a client bound to a closed loop fails.
        self._ahttp: weakref.WeakKeyDictionary[Any, httpx.AsyncClient] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        key = "None" if self._api_key is None else "'***'"
        return f"ServiceClient(base_url={self.base_url!r}, api_key={key})"

    # -------------------------------------------------------------- raw requests
    def _raise_for(self, endpoint, body, response: httpx.Response) -> None:
        try:
            reason = response.json().get("error", response.text)
        except (ValueError, AttributeError):
            reason = response.text[:500]
        raise RemoteError(
            f"{_describe(endpoint, body)} failed: HTTP {response.status_code}: {reason}",
            endpoint=endpoint,
            status=response.status_code,
            model_id=body.get("model_id"),
            seq_id=body.get("seq_id"),
        )

    def _give_up(
        self, endpoint, body, error: Exception, attempts: int, elapsed: float
    ) -> RemoteError:
        return RemoteError(
            f"{_describe(endpoint, body)} failed after {attempts} attempts over "
            f"{elapsed:.1f}s: {type(error).__name__}: {error}",
            endpoint=endpoint,
            model_id=body.get("model_id"),
            seq_id=body.get("seq_id"),
        )

    def _retry_delay(self, endpoint, body, outcome, attempt, started) -> float:
        """The wait before the next attempt; raises when ``outcome`` is final."""
        elapsed = time.monotonic() - started
        retry, delay = self._should_retry(attempt, outcome, elapsed)
        if not retry:
            if isinstance(outcome, httpx.Response):
                self._raise_for(endpoint, body, outcome)
            raise self._give_up(endpoint, body, outcome, attempt + 1, elapsed) from outcome
        logger.info(
            "retrying %s in %.2fs after %s",
            _describe(endpoint, body),
            delay,
            getattr(outcome, "status_code", type(outcome).__name__),
        )
        return delay

    def _should_retry(self, attempt, outcome, elapsed) -> tuple[bool, float]:
        policy = self.retry
        if policy.max_retries is not None and attempt >= policy.max_retries:
            return False, 0.0
        left = policy.max_elapsed - elapsed
        if left <= 0:
            return False, 0.0
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in _RETRY_STATUS:
                return False, 0.0
            return True, min(left, policy.delay(attempt, outcome.headers.get("retry-after")))
        return True, min(left, policy.delay(attempt))

    def post(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POSTs ``body`` to ``/api/v1/<endpoint>`` with retries; returns the JSON answer."""
        content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        started, first = time.perf_counter(), time.monotonic()
        for attempt in itertools.count():
            try:
                outcome: Any = self._http.post(f"/api/v1/{endpoint}", content=content)
            except httpx.TransportError as e:
                outcome = e
            if isinstance(outcome, httpx.Response) and outcome.status_code < 400:
                _emit(endpoint, body, content, outcome, started, attempt)
                return outcome.json()
            time.sleep(self._retry_delay(endpoint, body, outcome, attempt, first))
        raise AssertionError("unreachable")

    def _async_http(self) -> httpx.AsyncClient:
        # One AsyncClient per event loop: httpx clients must not cross loops.
        loop = asyncio.get_running_loop()
        if loop not in self._ahttp:
            transport = self._async_transport or httpx.AsyncHTTPTransport(
                **self._async_transport_args
            )
            self._ahttp[loop] = httpx.AsyncClient(transport=transport, **self._ahttp_args)
        return self._ahttp[loop]

    async def post_async(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The ``async`` form of [`post`][jaxreg.remote.ServiceClient.post]."""
        content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        http = self._async_http()
        started, first = time.perf_counter(), time.monotonic()
        for attempt in itertools.count():
            try:
                outcome: Any = await http.post(f"/api/v1/{endpoint}", content=content)
            except httpx.TransportError as e:
                outcome = e
            if isinstance(outcome, httpx.Response) and outcome.status_code < 400:
                _emit(endpoint, body, content, outcome, started, attempt)
                return outcome.json()
            await asyncio.sleep(self._retry_delay(endpoint, body, outcome, attempt, first))
        raise AssertionError("unreachable")

    def _check_result(self, endpoint, body, result) -> dict[str, Any]:
        if result.get("type") == "request_failed":
            raise RemoteError(
                f"{_describe(endpoint, body)} failed on the service "
                f"({result.get('category')} error): {result.get('error')}",
                endpoint=endpoint,
                model_id=body.get("model_id"),
                seq_id=body.get("seq_id"),
                category=result.get("category"),
            )
        return result

    def wait(
        self, endpoint: str, body: Mapping[str, Any], request_id: str, timeout: float | None = None
    ) -> dict[str, Any]:
        """Polls ``retrieve_future`` until the request's result is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            poll = (
                self.poll_timeout
                if deadline is None
                else max(0.0, min(self.poll_timeout, deadline - time.monotonic()))
            )
            try:
                result = self.post("retrieve_future", {"request_id": request_id, "timeout": poll})
            except RemoteError as e:
                raise _waiting_failed(endpoint, body, request_id, e) from e
            if result.get("type") != "try_again":
                return self._check_result(endpoint, body, result)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{_describe(endpoint, body)}: no result after {timeout}s")

    async def wait_async(
        self, endpoint: str, body: Mapping[str, Any], request_id: str
    ) -> dict[str, Any]:
        while True:
            try:
                result = await self.post_async(
                    "retrieve_future", {"request_id": request_id, "timeout": self.poll_timeout}
                )
            except RemoteError as e:
                raise _waiting_failed(endpoint, body, request_id, e) from e
            if result.get("type") != "try_again":
                return self._check_result(endpoint, body, result)

    # -------------------------------------------------------------- high level
    def healthz(self) -> dict[str, Any]:
        response = self._http.get("/api/v1/healthz")
        response.raise_for_status()
        return response.json()

    def capabilities(self) -> dict[str, Any]:
        """The service's API extensions, ``{"extensions": [...]}`` (asked once, then cached).

        A service without ``GET /api/v1/capabilities`` (404) has none.
        """
        cached = getattr(self, "_capabilities", None)
        if cached is not None:
            return cached
        started = time.monotonic()
        try:
            response = self._http.get("/api/v1/capabilities")
        except httpx.TransportError as e:
            raise self._give_up("capabilities", {}, e, 1, time.monotonic() - started) from e
        if response.status_code in (404, 405):
            caps: dict[str, Any] = {"extensions": []}
        elif response.status_code >= 400:
            self._raise_for("capabilities", {}, response)
        else:
            caps = response.json()
        self._capabilities = caps
        return caps

    def create_model(self, base_model: str = "jaxreg-base") -> TrainingClient:
        """Creates a model on the service and returns a client bound to it."""
        body = {"base_model": base_model}
        rid = self.post("create_model", body)["request_id"]
        return TrainingClient(self, self.wait("create_model", body, rid)["model_id"])

    def delete_model(self, model_id: str) -> dict[str, Any]:
        """Deletes a model on the service, freeing its memory (``delete_model``)."""
        return self.post("delete_model", {"model_id": model_id})

    def training_client(self, model_id: str) -> TrainingClient:
        """A client for an existing model (its next ``seq_id`` must be 0)."""
        return TrainingClient(self, model_id)

    def close(self) -> None:
        self._http.close()

    async def aclose(self) -> None:
        """Closes the running event loop's HTTP client (others go with their loops)."""
        http = self._ahttp.pop(asyncio.get_running_loop(), None)
        if http is not None:
            await http.aclose()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class APIFuture:
    """The result of a submitted request: ``result()`` blocks, ``await`` works too."""

    def __init__(self, training: TrainingClient, endpoint: str, body: dict, request_id: str):
        self._training, self.endpoint, self._body = training, endpoint, body
        self.request_id = request_id
        self.seq_id = body.get("seq_id")
        self._value: dict | None = None

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        if self._value is None:
            client = self._training.service
            self._value = _decode_outputs(
                client.wait(self.endpoint, self._body, self.request_id, timeout)
            )
        return self._value

    async def result_async(self) -> dict[str, Any]:
        if self._value is None:
            client = self._training.service
            self._value = _decode_outputs(
                await client.wait_async(self.endpoint, self._body, self.request_id)
            )
        return self._value

    def __await__(self):
        return self.result_async().__await__()

    def __repr__(self) -> str:
        return f"APIFuture({self.endpoint}, seq_id={self.seq_id}, request_id={self.request_id!r})"


def _decode_outputs(result: dict[str, Any]) -> dict[str, Any]:
    """Replaces the ``TensorData`` of ``loss_fn_outputs`` by NumPy arrays."""
    if "loss_fn_outputs" in result:
        result = dict(result)
        result["loss_fn_outputs"] = [
            {k: decode_tensor(v, f"loss_fn_outputs[{i}].{k}") for k, v in out.items()}
            for i, out in enumerate(result["loss_fn_outputs"])
        ]
    return result


class TrainingClient:
    """A client bound to one model: Tinker's ``TrainingClient`` methods over HTTP.

    Data may be jaxreg [`Datum`][jaxreg.remote.Datum] objects, official
    ``tinker.types.Datum`` objects or Tinker-shaped dicts.
    """

    def __init__(self, service: ServiceClient, model_id: str):
        self.service, self.model_id = service, model_id
        self._next_seq = 0
        self._seq_lock = threading.Lock()
        self._automatic: set[int] = set()  # seq_ids taken from the counter, not yet sent

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, service={self.service!r})"

    def reserve_seq_ids(self, n: int = 1) -> list[int]:
        """Takes ``n`` sequence numbers now, for requests that will be sent later."""
        with self._seq_lock:
            first, self._next_seq = self._next_seq, self._next_seq + n
        return list(range(first, first + n))

    def _body(self, endpoint, seq_id, **fields) -> dict[str, Any]:
        if seq_id is None:
            seq = self.reserve_seq_ids()[0]
            with self._seq_lock:
                self._automatic.add(seq)
        else:  # an explicit id: later automatic ids continue after it
            seq = seq_id
            with self._seq_lock:
                self._next_seq = max(self._next_seq, seq_id + 1)
        return {"model_id": self.model_id, "seq_id": seq, **fields}

    def _data_body(self, endpoint, data, loss_fn, loss_fn_config, seq_id):
        datums = [
            to_datum(d, f"data[{i}]").to_json(self.service.tensor_encoding)
            for i, d in enumerate(_as_list(data))
        ]
        key = "forward_input" if endpoint == "forward" else "forward_backward_input"
        payload = {"data": datums, "loss_fn": loss_fn, "loss_fn_config": loss_fn_config}
        return self._body(
            endpoint, seq_id, tensor_encoding=self.service.tensor_encoding, **{key: payload}
        )

    def submit(self, endpoint: str, body: dict[str, Any]) -> APIFuture:
        automatic = self._take_automatic(body)
        try:
            rid = self.service.post(endpoint, body)["request_id"]
        except RemoteError as e:
            if automatic and self._refused(endpoint, body, e):
                with contextlib.suppress(RemoteError):
                    self.service.post("skip_seq", self._skip_body(body))
            raise
        return APIFuture(self, endpoint, body, rid)

    async def submit_async(self, endpoint: str, body: dict[str, Any]) -> APIFuture:
        automatic = self._take_automatic(body)
        try:
            rid = (await self.service.post_async(endpoint, body))["request_id"]
        except RemoteError as e:
            if automatic and self._refused(endpoint, body, e):
                with contextlib.suppress(RemoteError):
                    await self.service.post_async("skip_seq", self._skip_body(body))
            raise
        return APIFuture(self, endpoint, body, rid)

    def _take_automatic(self, body) -> bool:
        """Whether ``body``'s ``seq_id`` came from the counter (and forgets it)."""
        with self._seq_lock:
            seq = body.get("seq_id")
            if seq in self._automatic:
                self._automatic.discard(seq)
                return True
            return False

    @staticmethod
    def _refused(endpoint, body, error: RemoteError) -> bool:
        """A request refused for its content: an automatic ``seq_id`` was not used and
        is released (``skip_seq``), or the model's later requests would wait for it.
        An explicit ``seq_id`` stays the caller's to reuse."""
        return (
            error.status in (400, 413)
            and endpoint != "skip_seq"
            and isinstance(body.get("seq_id"), int)
        )

    def _skip_body(self, body) -> dict[str, Any]:
        return {"model_id": self.model_id, "seq_id": body["seq_id"]}

    def forward(
        self,
        data,
        loss_fn: str = "cross_entropy",
        loss_fn_config=None,
        *,
        seq_id: int | None = None,
    ) -> APIFuture:
        """Per-datum logprobs (``loss_fn_outputs[i]["logprobs"]``); changes nothing."""
        return self.submit(
            "forward", self._data_body("forward", data, loss_fn, loss_fn_config, seq_id)
        )

    def forward_backward(
        self,
        data,
        loss_fn: str = "cross_entropy",
        loss_fn_config=None,
        *,
        seq_id: int | None = None,
        param_diagnostics: Mapping[str, Any] | None = None,
    ) -> APIFuture:
        """Logprobs and ``loss:sum``; the gradient accumulates until ``optim_step``.

        ``param_diagnostics``: the jaxreg-service extension field (see
        [`ParamDiagnostics`][jaxreg.remote.ParamDiagnostics]), sent only when given.
        """
        body = self._data_body("forward_backward", data, loss_fn, loss_fn_config, seq_id)
        self._add_param_diagnostics(body, param_diagnostics)
        return self.submit("forward_backward", body)

    def _add_param_diagnostics(self, body, field) -> None:
        if field is not None:
            from jaxreg._src.remote import param_diagnostics

            body[param_diagnostics.FIELD] = param_diagnostics.encode_field(
                field, self.service.tensor_encoding
            )

    def optim_step(
        self, adam_params: Mapping[str, float] | Any = None, *, seq_id: int | None = None
    ) -> APIFuture:
        """Applies the accumulated gradient with Adam(W) and clears it."""
        return self.submit(
            "optim_step", self._body("optim_step", seq_id, adam_params=_adam_dict(adam_params))
        )

    def save_state(self, name: str, *, seq_id: int | None = None) -> APIFuture:
        return self.submit("save_state", self._body("save_state", seq_id, path=name))

    def load_state(self, path: str, *, seq_id: int | None = None) -> APIFuture:
        return self.submit("load_state", self._body("load_state", seq_id, path=path))

    def skip_seq(self, seq_id: int) -> APIFuture:
        """Releases a reserved ``seq_id`` (see ``jaxreg.service.app``)."""
        return self.submit("skip_seq", self._body("skip_seq", seq_id))

    async def forward_async(
        self, data, loss_fn="cross_entropy", loss_fn_config=None, *, seq_id=None
    ) -> APIFuture:
        return await self.submit_async(
            "forward", self._data_body("forward", data, loss_fn, loss_fn_config, seq_id)
        )

    async def forward_backward_async(
        self,
        data,
        loss_fn="cross_entropy",
        loss_fn_config=None,
        *,
        seq_id=None,
        param_diagnostics=None,
    ) -> APIFuture:
        body = self._data_body("forward_backward", data, loss_fn, loss_fn_config, seq_id)
        self._add_param_diagnostics(body, param_diagnostics)
        return await self.submit_async("forward_backward", body)

    async def optim_step_async(self, adam_params=None, *, seq_id=None) -> APIFuture:
        return await self.submit_async(
            "optim_step", self._body("optim_step", seq_id, adam_params=_adam_dict(adam_params))
        )

    def get_info(self) -> dict[str, Any]:
        return self.service.post("get_info", {"model_id": self.model_id})

    def delete(self) -> None:
        """Deletes the model on the service; later calls on this client get 404."""
        self.service.delete_model(self.model_id)


def _as_list(data: Any) -> list[Any]:
    if isinstance(data, Datum | Mapping) or not isinstance(data, Iterable):
        raise TypeError(f"data: expected a list of Datum, found {type(data).__name__}")
    return list(data)


def _adam_dict(params: Any) -> dict[str, float]:
    if params is None:
        return {}
    if hasattr(params, "model_dump"):  # tinker.types.AdamParams
        params = params.model_dump()
    if not isinstance(params, Mapping):
        raise TypeError(f"adam_params: expected a dict, found {type(params).__name__}")
    return {k: float(np.asarray(v)) for k, v in params.items() if k != "type"}
