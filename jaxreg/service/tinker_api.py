"""The official tinker SDK's front door: ``jaxreg serve`` as a local Tinker.

An unmodified ``tinker`` script (SDK 0.38) trains against the reference service when
``base_url`` points at it and ``TINKER_API_KEY`` holds a ``tml-`` key::

  service = tinker.ServiceClient(base_url="http://127.0.0.1:8000", api_key="tml-local")
  training = service.create_lora_training_client(base_model="jaxreg-base", rank=8)
  training.forward_backward(data, "cross_entropy"); training.optim_step(types.AdamParams())

Everything runs on the same ``Engine`` as jaxreg's own JSON
API. This module adds what the SDK speaks and the JSON API does not:

* bootstrap: ``client/config`` (API-key auth, no JWT), ``client/dynamic_config``,
  ``create_session``, ``session_heartbeat``, ``sessions/{id}/finish``, ``telemetry``,
  ``GET get_server_capabilities``;
* models: ``create_model`` (id ``{session}:train:{n}``; its requests are numbered
  from ``seq_id`` 1, as the SDK sends them), ``get_info``, ``weights_info``;
* ``forward_backward`` in the SDK's protobuf encoding both ways
  (``jaxreg.service.tinker_proto``), ``optim_step`` (Adam);
* ``save_weights`` / ``load_weights`` with ``tinker://{model}/weights/{name}`` paths
  (also creating a model from a checkpoint), ``save_weights_for_sampler``;
* sampling: ``create_sampling_session``, ``asample``, ``GET samplers/{id}``;
* ``retrieve_future``: protobuf results where the SDK asks for them, ``408`` with a
  ``try_again`` body while a result is not ready, ``410`` for an unknown or expired
  request id, JSON ``{"error", "category"}`` for a failed request;
* requests are deduplicated on ``X-Idempotency-Key`` (a retried POST gets the first
  answer) as well as on ``seq_id``.

Where each part lives: the shared state and helpers in ``jaxreg.service.tinker_base``;
sessions in ``tinker_sessions``; models, ``forward_backward`` and ``optim_step`` in
``tinker_training``; ``save_weights``/``load_weights`` in ``tinker_checkpoints``;
sampling in ``tinker_sampling``; ``retrieve_future`` in ``tinker_futures``; the
``RestClient``'s training-run and checkpoint calls in ``tinker_rest``. This module
wires them: authentication, errors and idempotency around every handler
(``TinkerAPI.endpoint``), the routes, and ``mount``.

Requests are told apart from jaxreg's JSON API (same paths for ``create_model``,
``get_info``, ``forward_backward``, ``optim_step``, ``retrieve_future``) by the SDK's
``X-Stainless-Package-Version`` header or a protobuf body.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import logging
import threading
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxreg._src.remote.wire import API_KEY_HEADER, WireError
from jaxreg.service import tinker_proto
from jaxreg.service.engine import Engine
from jaxreg.service.errors import ServiceError
from jaxreg.service.sampling import Sampler, StabilityRecords
from jaxreg.service.tinker_base import KEEP as _KEEP
from jaxreg.service.tinker_base import json_response as _json
from jaxreg.service.tinker_checkpoints import TinkerCheckpoints
from jaxreg.service.tinker_futures import TinkerFutures
from jaxreg.service.tinker_rest import TinkerREST
from jaxreg.service.tinker_sampling import TinkerSampling
from jaxreg.service.tinker_sampling import Worker as _Worker
from jaxreg.service.tinker_sessions import TinkerSessions
from jaxreg.service.tinker_training import TinkerTraining

logger = logging.getLogger("jaxreg.service")

IDEMPOTENCY_HEADER = "x-idempotency-key"
SDK_HEADER = "x-stainless-package-version"
SHARED_PATHS = ("create_model", "get_info", "forward_backward", "optim_step", "retrieve_future")


def is_sdk_request(request: Request) -> bool:
    """Whether a request comes from the official tinker SDK (its header, or protobuf)."""
    ctype = request.headers.get("content-type", "")
    return SDK_HEADER in request.headers or ctype.startswith(tinker_proto.PROTO_CONTENT_TYPE)


class TinkerAPI(TinkerSessions, TinkerTraining, TinkerCheckpoints, TinkerSampling, TinkerFutures):
    """The SDK's endpoints over an ``Engine`` (see the module doc)."""

    def __init__(self, engine: Engine, *, api_key: str | None, max_body_bytes: int):
        self.engine = engine
        self.root = Path(engine.state_dir) / "tinker"
        self.max_body_bytes = max_body_bytes
        self._key = api_key.encode() if api_key else None
        self._lock = threading.RLock()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}  # model_id -> lora config, base model
        self.samplers: dict[str, dict[str, Any]] = {}  # sampling session -> params, paths
        self._sampler_params: dict[str, Any] = {}  # tinker sampler path -> params
        self._results: collections.OrderedDict[str, concurrent.futures.Future] = (
            collections.OrderedDict()
        )
        self._sample_seq: dict[tuple[str, int], str] = {}
        self._idempotent: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()
        self._sampler = Sampler(engine.config)
        self._records = StabilityRecords()  # record_stability_info samples (stable_reinforce)
        self._sample_worker = _Worker("jaxreg-sampler")

    def authorised(self, request: Request) -> bool:
        if self._key is None:
            return True
        given = request.headers.get(API_KEY_HEADER, "").encode()
        return hmac.compare_digest(given, self._key)

    def endpoint(self, handler, *, raw: bool = False, seq_kind: str | None = None):
        """Wraps ``handler(body or request)`` with auth, errors and idempotency.

        ``seq_kind``: the engine's kind of the model request the handler queues; a
        refusal then uses up the body's ``seq_id`` (``Engine.refuse_seq``).
        """

        async def run(request: Request) -> Response:
            arg: Any = None
            try:
                arg = request if raw else await self._json_body(request)
                result = await handler(arg)
                return result if isinstance(result, Response) else _json(result)
            except (ServiceError, WireError) as e:
                if seq_kind is not None and isinstance(arg, dict):
                    message = e.message if isinstance(e, ServiceError) else str(e)
                    self.engine.refuse_seq(
                        arg.get("model_id"), arg.get("seq_id"), seq_kind, message
                    )
                if isinstance(e, WireError):
                    return _json({"error": str(e)}, 400)
                # The SDK retries 408, 409, 429 and 5xx whatever x-should-retry says (a 409
                # is a lock timeout on Tinker); ours (a seq_id reused for another request,
                # the model limit) are final, so they are answered as 400.
                status = 400 if e.status == 409 else e.status
                final = 400 <= status < 500 and status not in (408, 429)
                headers = {"x-should-retry": "false"} if final else None
                return _json({"error": e.message}, status, headers)

        async def wrapped(request: Request) -> Response:
            if not self.authorised(request):
                return _json(
                    {"error": f"missing or wrong API key (send it in the {API_KEY_HEADER} header)"},
                    401,
                )
            key = request.headers.get(IDEMPOTENCY_HEADER)
            if not key or request.method != "POST":
                return await run(request)
            key = f"{request.url.path}:{key}"
            first = self._idempotent.get(key)
            if first is not None:  # a retry of a request already answered (or under way)
                status, body, headers = await asyncio.shield(first)
                return Response(body, status, headers=headers)
            fut = asyncio.get_running_loop().create_future()
            self._idempotent[key] = fut
            while len(self._idempotent) > _KEEP:
                self._idempotent.popitem(last=False)
            try:
                response = await run(request)
            except BaseException as e:
                self._idempotent.pop(key, None)
                fut.set_exception(e)
                fut.exception()  # retrieved: no "never retrieved" warning
                raise
            if response.status_code >= 500:  # not an answer: let a retry run again
                self._idempotent.pop(key, None)
            keep = {k: v for k, v in response.headers.items() if k != "content-length"}
            fut.set_result((response.status_code, response.body, keep))
            return response

        return wrapped

    # --------------------------------------------------------------- routes
    def routes(self) -> list[Route]:
        e = self.endpoint
        post = {
            "client/config": e(self.client_config),
            "client/dynamic_config": e(self.dynamic_config),
            "create_session": e(self.create_session),
            "session_heartbeat": e(self.heartbeat),
            "telemetry": e(self.telemetry),
            "cancel_future": e(self.cancel_future),
            "weights_info": e(self.weights_info),
            "save_weights": e(self.save_weights, seq_kind="_job"),
            "load_weights": e(self.load_weights, seq_kind="_job"),
            "save_weights_for_sampler": e(self.save_weights_for_sampler, seq_kind="_job"),
            "create_sampling_session": e(self.create_sampling_session),
            "asample": e(self.asample),
            "sessions/{session_id}/finish": e(self.finish_session, raw=True),
        }
        routes = [Route(f"/api/v1/{p}", h, methods=["POST"]) for p, h in post.items()]
        routes.append(
            Route(
                "/api/v1/get_server_capabilities", e(self.capabilities, raw=True), methods=["GET"]
            )
        )
        routes.append(
            Route("/api/v1/samplers/{sampler_id}", e(self.get_sampler, raw=True), methods=["GET"])
        )
        return routes + TinkerREST(self).routes()

    def shared(self, name: str):
        """The SDK's handler of a path jaxreg's JSON API also serves."""
        handlers = {
            "create_model": self.endpoint(self.create_model),
            "get_info": self.endpoint(self.get_info),
            "forward_backward": self.endpoint(self.forward_backward, raw=True),
            "optim_step": self.endpoint(self.optim_step, seq_kind="optim_step"),
            "retrieve_future": self.endpoint(self.retrieve_future, raw=True),
        }
        return handlers[name]


def mount(
    engine: Engine, routes: list[Route], *, api_key: str | None, max_body_bytes: int
) -> list[Route]:
    """``routes`` with the SDK's endpoints added and the shared paths dispatched by caller."""
    api = TinkerAPI(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    out = []
    for route in routes:
        name = route.path.removeprefix("/api/v1/")
        if name in SHARED_PATHS:
            native, sdk = route.endpoint, api.shared(name)

            async def dispatch(request: Request, native=native, sdk=sdk) -> Response:
                return await (sdk if is_sdk_request(request) else native)(request)

            route = Route(route.path, dispatch, methods=list(route.methods or ["POST"]))
        out.append(route)
    return out + api.routes()


__all__ = ["TinkerAPI", "is_sdk_request", "mount"]
