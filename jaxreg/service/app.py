"""The HTTP API of the reference service (starlette), modelled on Tinker's REST API.

Every endpoint is ``POST /api/v1/<name>`` with a JSON body, except ``GET
/api/v1/healthz``. Work requests answer at once with ``{"request_id": ...}``;
``retrieve_future`` waits up to ``timeout`` seconds (default 10, at most 60) for the
result and otherwise answers ``{"type": "try_again", ...}``. A request that fails
while running answers ``{"type": "request_failed", "error", "category"}``.

Errors found before a request is queued answer 4xx with ``{"error": message}``; such
a request changes nothing. When an API key is configured, every request except
``healthz`` and ``openapi.json`` must carry it in the ``X-API-Key`` header (UTF-8,
compared in constant time; the key never appears in logs or errors).

With the official SDK installed (``jaxreg[tinker]``), the same application also speaks
the SDK's own protocol (bootstrap, protobuf ``forward_backward``, sampling, ``tinker://``
checkpoints): see ``jaxreg.service.tinker_api``.

Large bodies are parsed on a worker thread, so that a big request never stalls the
event loop (``healthz`` and other clients stay responsive). ``GET
/api/v1/openapi.json`` describes every endpoint (``jaxreg.service.openapi``).

Extensions to Tinker's API: ``skip_seq {model_id, seq_id}`` marks a reserved ``seq_id``
as used without doing anything, so that a client that reserved ids for a pipeline and
then decided not to send one (for example because its loss was non-finite) does not
leave the model's later requests waiting; ``delete_model {model_id}`` (alias
``unload_model``) frees a model. ``GET /api/v1/capabilities`` lists the extensions
(``{"extensions": [...]}``, no key needed), e.g. ``param_grad_diagnostics``
(``jaxreg.service.diagnostics``): an optional ``param_diagnostics`` field of
``forward_backward``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

import numpy as np

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jaxreg.service needs starlette and uvicorn: pip install 'jaxreg[service]'"
    ) from e

from jaxreg._src.remote.wire import API_KEY_HEADER
from jaxreg.service.engine import Engine
from jaxreg.service.errors import ServiceError
from jaxreg.service.errors import short as _short
from jaxreg.service.openapi import openapi_schema
from jaxreg.service.results import dumps

logger = logging.getLogger("jaxreg.service")

WORK_ENDPOINTS = (
    "forward",
    "forward_backward",
    "optim_step",
    "save_state",
    "load_state",
    "skip_seq",
)
PARSE_INLINE_BYTES = 64 << 10
"""Bodies up to this size are parsed on the event loop; larger ones on a thread."""


YIELD_EVERY_BYTES = 256 << 10
"""Longest stretch of JSON parsed without handing the GIL back (see ``parse_yielding``)."""


def parse_yielding(raw: bytes) -> Any:
    """``json.loads`` that lets other threads (the event loop) run while it parses.

    ``json.loads`` is one C call that holds the GIL until it returns (2 s for a 33 MB
    body): on a thread it would still stall the event loop. A Python-level hook runs the
    interpreter loop, which hands the GIL over every few milliseconds. A hook per JSON
    object costs nothing measurable and suffices when no object spans more than
    ``YIELD_EVERY_BYTES`` (true of every valid request: a datum holds at most a
    context's worth of numbers); otherwise a hook per number does it, at about 4x the
    parsing time (measured: the worst wait of another thread falls from 0.6 s to 22 ms
    on a 7 MB body of 256 datums, and from 2.1 s to 0.13 s on a 33 MB single list).
    """
    a = np.frombuffer(raw, np.uint8)
    braces = np.flatnonzero((a == ord("{")) | (a == ord("}")))
    edges = np.concatenate([[-1], braces, [len(raw)]])
    if int(np.diff(edges).max()) <= YIELD_EVERY_BYTES:
        return json.loads(raw, object_pairs_hook=_object)
    return json.loads(raw, object_pairs_hook=_object, parse_int=_int, parse_float=_float)


def _object(pairs: list) -> dict:
    return dict(pairs)


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 256 << 20,
    parse_inline_bytes: int = PARSE_INLINE_BYTES,
) -> Starlette:
    """The starlette application serving ``engine`` under ``/api/v1/``.

    Args:
      engine: the ``Engine`` that runs the requests.
      api_key: when set, required in the ``X-API-Key`` header of every request
        except ``healthz``.
      max_body_bytes: larger request bodies are refused with 413 before being read.
      parse_inline_bytes: larger bodies are parsed on a worker thread.
    """
    expected_key = api_key.encode("utf-8") if api_key else None
    header_name = API_KEY_HEADER.lower().encode("latin-1")

    def authorised(request: Request) -> bool:
        if expected_key is None:
            return True
        # The raw header bytes: a key is compared as UTF-8 bytes, whatever its characters.
        given = next((v for k, v in request.headers.raw if k.lower() == header_name), b"")
        return hmac.compare_digest(given, expected_key)

    def parse(raw: bytes, yielding: bool = False) -> Any:
        try:
            if yielding:
                return parse_yielding(raw)
            return json.loads(raw or b"{}")
        except RecursionError:
            raise ServiceError(400, "request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ServiceError(
                400, f"request body is not valid JSON ({_short(str(e), 200)})"
            ) from None

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ServiceError(413, f"request body of {declared} bytes exceeds {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ServiceError(413, f"request body exceeds {max_body_bytes} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if len(raw) <= parse_inline_bytes:
            body = parse(raw)
        else:
            body = await asyncio.to_thread(parse, raw, True)
        if not isinstance(body, dict):
            raise ServiceError(
                400, f"request body: expected a JSON object, found {type(body).__name__}"
            )
        return body

    def endpoint(handler):
        async def wrapped(request: Request) -> Response:
            if not authorised(request):
                return _error(
                    401, f"missing or wrong API key (send it in the {API_KEY_HEADER} header)"
                )
            try:
                return _json(await handler(await read_json(request)))
            except ServiceError as e:
                return _error(e.status, e.message)
            except Exception as e:  # a bug: say so, with the reason, rather than a bare 500
                logger.exception("jaxreg service: internal error on %s", request.url.path)
                return _error(500, f"internal error: {type(e).__name__}: {_short(str(e), 200)}")

        return wrapped

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def capabilities(request: Request) -> Response:
        return _json(engine.capabilities())

    async def openapi(request: Request) -> Response:
        return _json(openapi_schema())

    async def create_model(body):
        return {"request_id": engine.create_model(body)}

    async def get_info(body):
        return engine.info(body.get("model_id"))

    async def delete_model(body):
        return engine.delete_model(body.get("model_id"))

    def work(kind):
        async def submit(body):
            # Validation and packing can take a few ms for large batches: keep the
            # event loop free for other clients meanwhile.
            rid = await asyncio.to_thread(engine.submit, kind, body)
            return {"request_id": rid, "model_id": body.get("model_id")}

        return submit

    async def retrieve_future(body):
        fut = engine.result(body.get("request_id"))
        timeout = body.get("timeout", 10.0)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 <= timeout < float("inf")
        ):
            raise ServiceError(
                400, f"timeout: expected a non-negative number, found {_short(timeout)}"
            )
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(fut)), float(min(timeout, 60))
            )
        except TimeoutError:
            return {"type": "try_again", "request_id": body["request_id"], "queue_state": "active"}

    routes = [
        Route("/api/v1/healthz", healthz, methods=["GET", "POST"]),
        Route("/api/v1/capabilities", capabilities, methods=["GET", "POST"]),
        Route("/api/v1/openapi.json", openapi, methods=["GET"]),
        Route("/api/v1/delete_model", endpoint(delete_model), methods=["POST"]),
        Route("/api/v1/unload_model", endpoint(delete_model), methods=["POST"]),
        Route("/api/v1/create_model", endpoint(create_model), methods=["POST"]),
        Route("/api/v1/get_info", endpoint(get_info), methods=["POST"]),
        Route("/api/v1/retrieve_future", endpoint(retrieve_future), methods=["POST"]),
        *(Route(f"/api/v1/{k}", endpoint(work(k)), methods=["POST"]) for k in WORK_ENDPOINTS),
    ]
    if _tinker_front_door():  # the official tinker SDK's protocol (jaxreg.service.tinker_api)
        from jaxreg.service import tinker_api

        routes = tinker_api.mount(engine, routes, api_key=api_key, max_body_bytes=max_body_bytes)
    return Starlette(routes=routes)


def _tinker_front_door() -> bool:
    """Whether the SDK's schema (``pip install 'jaxreg[tinker]'``) is importable."""
    try:
        import tinker.proto.tinker_public_pb2  # noqa: F401
    except ImportError:
        return False
    return True
