"""What the tinker SDK front door's handlers share: its state, request bodies, lookups.

``TinkerBase`` declares the front door's state (the engine, the SDK's sessions, the
models it created with their LoRA configs, sampling sessions, futures by request id),
which ``TinkerAPI`` (``jaxreg.service.tinker_api``) builds, and the helpers every group
of handlers uses: reading a request body (size limit, zstd), futures, looking up a
session or a model, checking a base model and an optimizer, and ``tinker://``
checkpoint paths (``tinker://{model_id}/weights/{name}`` under ``<state_dir>/tinker/``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import re
import threading
import urllib.parse
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from jaxreg._src.remote.wire import WireError
from jaxreg.service.engine import BASE_MODEL, Engine
from jaxreg.service.errors import ServiceError
from jaxreg.service.results import dumps, remember
from jaxreg.service.sampling import Sampler, StabilityRecords

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TINKER_PATH = re.compile(r"^tinker://([^/]+)/(weights|sampler_weights)/([^/]+)$")
KEEP = 4096  # futures and idempotent answers remembered


def json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response (compact; NaN refused)."""
    return Response(dumps(obj), status, headers=dict(headers or {}), media_type="application/json")


def nonneg_int(value: Any, field: str) -> int:
    """``value`` if it is an int >= 0, else ``ServiceError`` 400 naming ``field``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ServiceError(400, f"{field}: expected a non-negative int, found {value!r}")
    return value


def nonempty_str(body: Mapping[str, Any], field: str) -> str:
    """``body[field]`` if it is a non-empty string, else ``ServiceError`` 400."""
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ServiceError(400, f"{field}: expected a non-empty string, found {value!r}")
    return value


class TinkerBase:
    """The front door's state and shared helpers (the handler groups derive from it)."""

    engine: Engine
    root: Path  # <state_dir>/tinker: the SDK's checkpoints
    max_body_bytes: int
    sessions: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]  # model_id -> lora config, base model
    samplers: dict[str, dict[str, Any]]  # sampling session -> params, paths
    _key: bytes | None
    _lock: threading.RLock
    _sampler_params: dict[str, Any]  # tinker sampler path -> params
    _results: collections.OrderedDict[str, concurrent.futures.Future]
    _sample_seq: dict[tuple[str, int], str]
    _idempotent: collections.OrderedDict[str, asyncio.Future]
    _sampler: Sampler
    _records: StabilityRecords
    _sample_worker: Any  # tinker_sampling.Worker

    # --------------------------------------------------------------- request bodies
    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ServiceError(
                413, f"request body of {declared} bytes exceeds {self.max_body_bytes}"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ServiceError(413, f"request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if request.headers.get("content-encoding", "").lower() == "zstd":
            try:
                import zstandard
            except ImportError:  # pragma: no cover - the SDK depends on zstandard
                raise ServiceError(
                    415, "Content-Encoding zstd: zstandard is not installed"
                ) from None
            try:
                body = zstandard.ZstdDecompressor().decompress(
                    body, max_output_size=self.max_body_bytes
                )
            except zstandard.ZstdError as e:
                raise ServiceError(400, f"request body: invalid zstd data ({e})") from None
        return body

    async def _json_body(self, request: Request) -> dict[str, Any]:
        raw = await self._body(request)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ServiceError(400, f"request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ServiceError(
                400, f"request body: expected a JSON object, found {type(body).__name__}"
            )
        return body

    # --------------------------------------------------------------- futures
    def _future(self, job_future: concurrent.futures.Future) -> str:
        rid = f"tk-{uuid.uuid4().hex}"
        with self._lock:
            remember(self._results, rid, job_future, KEEP)
        return rid

    async def _guarded(self, model_id: Any, seq: Any, kind: str, run):
        """Awaits ``run()``; if it refuses the request, its ``seq_id`` still counts as used.

        The SDK never resends a ``seq_id``: without this, the request after a refused
        one would wait for it (``Limits.seq_wait_s``) and every later one behind it.
        """
        try:
            return await run()
        except (ServiceError, WireError) as e:
            message = e.message if isinstance(e, ServiceError) else str(e)
            self.engine.refuse_seq(model_id, seq, kind, message)
            raise

    def _done(self, result: dict[str, Any]) -> str:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(result)
        return self._future(fut)

    # --------------------------------------------------------------- lookups and checks
    def _session(self, sid: Any) -> dict[str, Any]:
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise ServiceError(404, f"session_id: unknown session {sid!r}")
        return s

    def _check_optimizer(self, config: Any, field: str) -> None:
        if config is None:
            return
        kind = config.get("type", "adamw") if isinstance(config, Mapping) else config
        if kind != "adamw":
            raise ServiceError(
                400, f"{field}.type: the reference service trains with 'adamw', found {kind!r}"
            )

    def _check_base(self, base: Any) -> None:
        if base is not None and base not in (BASE_MODEL, "jaxreg/base"):  # org/model alias
            raise ServiceError(
                400, f"base_model: expected {BASE_MODEL!r} (see get_server_capabilities), "
                f"found {base!r}"
            )  # fmt: skip

    def _model_info(self, model_id: str) -> dict[str, Any]:
        return self.models.get(model_id) or {"lora": {"rank": 0}, "base_model": BASE_MODEL}

    # --------------------------------------------------------------- checkpoint paths
    def _file(self, run: str, kind: str, name: str) -> Path:
        return self.root / urllib.parse.quote(run, safe="") / kind / f"{name}.npz"

    def _parse_path(self, path: Any, field: str = "path") -> tuple[str, str, str]:
        match = _TINKER_PATH.match(path) if isinstance(path, str) else None
        if match is None or not _NAME.match(match.group(3)) or match.group(1) in (".", ".."):
            raise ServiceError(
                400, f"{field}: expected 'tinker://<model_id>/weights/<name>' (or "
                f"sampler_weights), found {path!r}"
            )  # fmt: skip
        return match.group(1), match.group(2), match.group(3)

    def _name(self, body: Mapping[str, Any]) -> str:
        name = body.get("path")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ServiceError(
                400, "path: expected a checkpoint name of letters, digits, '_', '.', '-' "
                f"(at most 128 characters), found {name!r}"
            )  # fmt: skip
        return name


__all__ = ["KEEP", "TinkerBase", "json_response", "nonempty_str", "nonneg_int"]
