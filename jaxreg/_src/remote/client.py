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
service's reason. The retry loop and its policy are in
``jaxreg._src.remote.transport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import httpx
import numpy as np

from jaxreg._src.core.errors import ConfigError
from jaxreg._src.remote import param_diagnostics as extension
from jaxreg._src.remote.param_diagnostics import EXTENSION, UnsupportedExtensionError
from jaxreg._src.remote.transport import (
    Exchange,
    RemoteError,
    RetryPolicy,
    describe,
    gave_up,
    http_error,
    request_error,
)
from jaxreg._src.remote.wire import (
    API_KEY_HEADER,
    ENCODINGS,
    Datum,
    Encoding,
    decode_tensor,
    to_datum,
)

logger = logging.getLogger("jaxreg.remote")


def _waiting_failed(endpoint, body, request_id, error: RemoteError) -> RemoteError:
    """A failure of ``retrieve_future``, told as a failure of the call it waited for."""
    what = f": waiting for its result (request {request_id}) failed: {error}"
    return request_error(endpoint, body, what, status=error.status)


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
            raise ConfigError(
                f"tensor_encoding: expected one of {ENCODINGS}, found {tensor_encoding!r}"
            )
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.retry = retry or RetryPolicy()
        self.tensor_encoding = cast(Encoding, tensor_encoding)
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
    def post(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POSTs ``body`` to ``/api/v1/<endpoint>`` with retries; returns the JSON answer."""
        exchange = Exchange(self.retry, endpoint, body)
        while (delay := exchange.settle(exchange.send(self._http))) is not None:
            time.sleep(delay)
        return exchange.answer

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
        exchange = Exchange(self.retry, endpoint, body)
        http = self._async_http()
        while (delay := exchange.settle(await exchange.send_async(http))) is not None:
            await asyncio.sleep(delay)
        return exchange.answer

    def _check_result(self, endpoint, body, result) -> dict[str, Any]:
        if result.get("type") == "request_failed":
            category = result.get("category")
            what = f" failed on the service ({category} error): {result.get('error')}"
            raise request_error(endpoint, body, what, category=category)
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
                raise TimeoutError(f"{describe(endpoint, body)}: no result after {timeout}s")

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
            raise gave_up("capabilities", {}, e, 1, time.monotonic() - started) from e
        if response.status_code in (404, 405):
            caps: dict[str, Any] = {"extensions": []}
        elif response.status_code >= 400:
            raise http_error("capabilities", {}, response)
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

    @property
    def synchronous(self) -> bool:
        """``False``: requests carry ``seq_id`` s, so a custom step may run on a background
        thread (see [`TrainingClientLike`][jaxreg.remote.TrainingClientLike])."""
        return False

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

    def _data_body(
        self, endpoint, data, loss_fn, loss_fn_config, seq_id, param_diagnostics=None
    ) -> dict[str, Any]:
        """The body of a ``forward`` or ``forward_backward`` request (the one place both
        are built, for the sync and the async methods)."""
        encoding = self.service.tensor_encoding
        datums = [to_datum(d, f"data[{i}]").to_json(encoding) for i, d in enumerate(_as_list(data))]
        key = "forward_input" if endpoint == "forward" else "forward_backward_input"
        payload = {"data": datums, "loss_fn": loss_fn, "loss_fn_config": loss_fn_config}
        body = self._body(endpoint, seq_id, tensor_encoding=encoding, **{key: payload})
        if param_diagnostics is not None:
            body[extension.FIELD] = extension.encode_field(param_diagnostics, encoding)
        return body

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

    # Each request has a sync method returning an APIFuture and an ``*_async`` one
    # returning it once submitted; both build the same body (``_data_body``, ``_body``).
    def forward(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> APIFuture:
        """Per-datum logprobs (``loss_fn_outputs[i]["logprobs"]``); changes nothing."""
        body = self._data_body("forward", data, loss_fn, loss_fn_config, seq_id)
        return self.submit("forward", body)

    def forward_backward(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
        param_diagnostics: Mapping[str, Any] | None = None,
    ) -> APIFuture:
        """Logprobs and ``loss:sum``; the gradient accumulates until ``optim_step``.

        ``param_diagnostics``: the jaxreg-service extension field (see
        [`ParamDiagnostics`][jaxreg.remote.ParamDiagnostics]), sent only when given.
        """
        body = self._data_body(
            "forward_backward", data, loss_fn, loss_fn_config, seq_id, param_diagnostics
        )
        return self.submit("forward_backward", body)

    def optim_step(
        self, adam_params: Mapping[str, float] | Any = None, *, seq_id: int | None = None
    ) -> APIFuture:
        """Applies the accumulated gradient with Adam(W) and clears it."""
        body = self._body("optim_step", seq_id, adam_params=_adam_dict(adam_params))
        return self.submit("optim_step", body)

    def save_state(self, name: str, *, seq_id: int | None = None) -> APIFuture:
        """Saves the model (weights, optimizer state, accumulated gradient) as ``name``; the
        result's ``path`` (``"jaxreg://<name>"``) is what
        [`load_state`][jaxreg.remote.TrainingClient.load_state] takes."""
        return self.submit("save_state", self._body("save_state", seq_id, path=name))

    def load_state(self, path: str, *, seq_id: int | None = None) -> APIFuture:
        """Restores the model saved by ``save_state`` (``path``:
        its result's ``path``, or the bare name)."""
        return self.submit("load_state", self._body("load_state", seq_id, path=path))

    def skip_seq(self, seq_id: int) -> APIFuture:
        """Releases a reserved ``seq_id`` (see ``jaxreg.service.app``)."""
        return self.submit("skip_seq", self._body("skip_seq", seq_id))

    async def forward_async(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
    ) -> APIFuture:
        """The ``async`` form of ``forward``: returns the future once submitted."""
        body = self._data_body("forward", data, loss_fn, loss_fn_config, seq_id)
        return await self.submit_async("forward", body)

    async def forward_backward_async(
        self,
        data: Sequence[Any],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        seq_id: int | None = None,
        param_diagnostics: Mapping[str, Any] | None = None,
    ) -> APIFuture:
        """The ``async`` form of ``forward_backward``."""
        body = self._data_body(
            "forward_backward", data, loss_fn, loss_fn_config, seq_id, param_diagnostics
        )
        return await self.submit_async("forward_backward", body)

    async def optim_step_async(
        self, adam_params: Mapping[str, float] | Any = None, *, seq_id: int | None = None
    ) -> APIFuture:
        """The ``async`` form of [`optim_step`][jaxreg.remote.TrainingClient.optim_step]."""
        body = self._body("optim_step", seq_id, adam_params=_adam_dict(adam_params))
        return await self.submit_async("optim_step", body)

    async def save_state_async(self, name: str, *, seq_id: int | None = None) -> APIFuture:
        """The ``async`` form of [`save_state`][jaxreg.remote.TrainingClient.save_state]."""
        return await self.submit_async("save_state", self._body("save_state", seq_id, path=name))

    async def load_state_async(self, path: str, *, seq_id: int | None = None) -> APIFuture:
        """The ``async`` form of [`load_state`][jaxreg.remote.TrainingClient.load_state]."""
        return await self.submit_async("load_state", self._body("load_state", seq_id, path=path))

    def get_info(self) -> dict[str, Any]:
        return self.service.post("get_info", {"model_id": self.model_id})

    def delete(self) -> None:
        """Deletes the model on the service; later calls on this client get 404."""
        self.service.delete_model(self.model_id)


def require_extension(training: Any) -> None:
    """Raises ``UnsupportedExtensionError`` unless ``training``'s service has it.

    Only jaxreg's own [`TrainingClient`][jaxreg.remote.TrainingClient] can send the extension; the
    service must list ``param_grad_diagnostics`` in ``GET /api/v1/capabilities``.
    """
    if not isinstance(training, TrainingClient):
        raise UnsupportedExtensionError(
            "param_diagnostics=True is an extension of jaxreg's reference service "
            f"({EXTENSION}); found a {type(training).__name__} (e.g. the official tinker "
            "SDK), which cannot send it. Use a jaxreg.remote.TrainingClient of a jaxreg "
            "service, or call without param_diagnostics."
        )
    extensions = training.service.capabilities().get("extensions", [])
    if EXTENSION not in extensions:
        raise UnsupportedExtensionError(
            f"param_diagnostics=True needs the service extension {EXTENSION!r}; the service "
            f"at {training.service.base_url} lists {list(extensions)}. Nothing was sent. "
            "Call without param_diagnostics, or use jaxreg's reference service."
        )


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
