"""The HTTP API of the reference service (starlette), modelled on Tinker's REST API.

Every endpoint is ``POST /api/v1/<name>`` with a JSON body, except ``GET
/api/v1/healthz``. Work requests answer at once with ``{"request_id": ...}``;
``retrieve_future`` waits up to ``timeout`` seconds (default 10, at most 60) for the
result and otherwise answers ``{"type": "try_again", ...}``. A request that fails
while running answers ``{"type": "request_failed", "error", "category"}``.

Errors found before a request is queued answer 4xx with ``{"error": message}``; such
a request changes nothing. When an API key is configured, every request except
``healthz`` must carry it in the ``X-API-Key`` header (compared in constant time; the
key never appears in logs or errors).

With the official SDK installed (``jaxreg[tinker]``), the same application also speaks
the SDK's own protocol (bootstrap, protobuf ``forward_backward``, sampling, ``tinker://``
checkpoints): see :mod:`jaxreg.service.tinker_api`.

One extension to Tinker's API: ``skip_seq {model_id, seq_id}`` marks a reserved
``seq_id`` as used without doing anything, so that a client that reserved ids for a
pipeline and then decided not to send one (for example because its loss was
non-finite) does not leave the model's later requests waiting forever.

``GET /api/v1/capabilities`` lists the extensions (``{"extensions": [...]}``, no key
needed), e.g. ``param_grad_diagnostics`` (:mod:`jaxreg.service.diagnostics`): an
optional ``param_diagnostics`` field of ``forward_backward``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jaxreg.service needs starlette and uvicorn: pip install 'jaxreg[service]'"
    ) from e

from jaxreg.service.engine import Engine, ServiceError, dumps

logger = logging.getLogger("jaxreg.service")

API_KEY_HEADER = "X-API-Key"
WORK_ENDPOINTS = (
    "forward",
    "forward_backward",
    "optim_step",
    "save_state",
    "load_state",
    "skip_seq",
)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def create_app(
    engine: Engine, *, api_key: str | None = None, max_body_bytes: int = 256 << 20
) -> Starlette:
    """The starlette application serving ``engine`` under ``/api/v1/``.

    Args:
      engine: the :class:`~jaxreg.service.engine.Engine` that runs the requests.
      api_key: when set, required in the ``X-API-Key`` header of every request
        except ``healthz``.
      max_body_bytes: larger request bodies are refused with 413 before being read.
    """
    expected_key = api_key.encode() if api_key else None

    def authorised(request: Request) -> bool:
        if expected_key is None:
            return True
        given = request.headers.get(API_KEY_HEADER, "").encode()
        return hmac.compare_digest(given, expected_key)

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
        try:
            body = json.loads(b"".join(chunks) or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ServiceError(400, f"request body is not valid JSON ({e})") from None
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

        return wrapped

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def capabilities(request: Request) -> Response:
        return _json(engine.capabilities())

    async def create_model(body):
        return {"request_id": engine.create_model(body)}

    async def get_info(body):
        return engine.info(body.get("model_id"))

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
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise ServiceError(400, f"timeout: expected a non-negative number, found {timeout!r}")
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(fut)), min(timeout, 60)
            )
        except TimeoutError:
            return {"type": "try_again", "request_id": body["request_id"], "queue_state": "active"}

    routes = [
        Route("/api/v1/healthz", healthz, methods=["GET", "POST"]),
        Route("/api/v1/capabilities", capabilities, methods=["GET", "POST"]),
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
