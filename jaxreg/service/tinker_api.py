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

Requests are told apart from jaxreg's JSON API (same paths for ``create_model``,
``get_info``, ``forward_backward``, ``optim_step``, ``retrieve_future``) by the SDK's
``X-Stainless-Package-Version`` header or a protobuf body.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import queue
import re
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jaxreg._src.remote.wire import API_KEY_HEADER, WireError, decode_tensor
from jaxreg.service import checkpoint, tasks, tinker_proto
from jaxreg.service import lora as lora_lib
from jaxreg.service import losses as service_losses
from jaxreg.service.engine import BASE_MODEL, Engine, ServiceError, dumps, remember
from jaxreg.service.sampling import Sampler, StabilityRecords
from jaxreg.service.tinker_rest import TinkerREST

logger = logging.getLogger("jaxreg.service")

IDEMPOTENCY_HEADER = "x-idempotency-key"
SDK_HEADER = "x-stainless-package-version"
SHARED_PATHS = ("create_model", "get_info", "forward_backward", "optim_step", "retrieve_future")
RETRIEVE_WAIT_S = 30.0  # below the SDK's 45 s read timeout
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TINKER_PATH = re.compile(r"^tinker://([^/]+)/(weights|sampler_weights)/([^/]+)$")
_KEEP = 4096


def _tokenizer_id() -> str:
    """The base tokenizer's hub id, installed into the local HF cache on first use."""
    from jaxreg.service.tokenizer import TOKENIZER_ID, install_tokenizer

    install_tokenizer()
    return TOKENIZER_ID


def is_sdk_request(request: Request) -> bool:
    """Whether a request comes from the official tinker SDK (its header, or protobuf)."""
    ctype = request.headers.get("content-type", "")
    return SDK_HEADER in request.headers or ctype.startswith(tinker_proto.PROTO_CONTENT_TYPE)


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(obj), status, headers=dict(headers or {}), media_type="application/json")


def _nonneg_int(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ServiceError(400, f"{field}: expected a non-negative int, found {value!r}")
    return value


def _str(body: Mapping[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ServiceError(400, f"{field}: expected a non-empty string, found {value!r}")
    return value


class _Worker:
    """A daemon thread running jobs in order (the sampler's; never blocks interpreter exit)."""

    def __init__(self, name: str):
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            job, fut = self._queue.get()
            try:
                fut.set_result(job())
            except ServiceError as e:
                fut.set_result({"type": "request_failed", "error": e.message, "category": "user"})
            except Exception as e:  # a bug or resource failure: report it, keep serving
                fut.set_result(
                    {"type": "request_failed", "error": f"{type(e).__name__}: {e}",
                     "category": "server"}
                )  # fmt: skip

    def submit(self, job: Callable[[], dict]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((job, fut))
        return fut


class TinkerAPI:
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

    # --------------------------------------------------------------- plumbing
    def authorised(self, request: Request) -> bool:
        if self._key is None:
            return True
        given = request.headers.get(API_KEY_HEADER, "").encode()
        return hmac.compare_digest(given, self._key)

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

    def _future(self, job_future: concurrent.futures.Future) -> str:
        rid = f"tk-{uuid.uuid4().hex}"
        with self._lock:
            remember(self._results, rid, job_future, _KEEP)
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

    # --------------------------------------------------------------- bootstrap
    async def client_config(self, body):
        return {
            "pjwt_auth_enabled": False,  # API keys only, no JWT exchange
            "credential_default_source": "api_key",
            "use_pyqwest_transport": False,
            "proto_compress_fwdbwd": False,
            "parallel_fwdbwd_chunks": True,
            "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False,
            "sample_join_sampling_session": False,
        }

    async def dynamic_config(self, body):
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    async def create_session(self, body):
        sid = f"session-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self.sessions[sid] = {"finished": None, "tags": body.get("tags", [])}
        return {"type": "create_session", "session_id": sid}

    def _session(self, sid: Any) -> dict[str, Any]:
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise ServiceError(404, f"session_id: unknown session {sid!r}")
        return s

    async def heartbeat(self, body):
        s = self._session(body.get("session_id"))
        if s["finished"] is not None:
            raise ServiceError(410, f"session {body['session_id']!r} has finished")
        return {"type": "session_heartbeat"}

    async def finish_session(self, request: Request):
        sid = request.path_params["session_id"]
        s = self._session(sid)
        body = await self._json_body(request)
        if s["finished"] is None:  # first reason wins
            s["finished"] = body.get("reason") or {"type": "success"}
        return {}

    async def telemetry(self, body):
        return {"status": "accepted"}

    async def capabilities(self, request: Request):
        return {
            "supported_models": [
                {
                    "model_name": BASE_MODEL,
                    "max_context_length": self.engine.config.context_length,
                    "trainable": True,
                    "sampleable": True,
                }
            ]
        }

    async def cancel_future(self, body):
        return {}  # sampling requests are short; nothing to stop

    # --------------------------------------------------------------- models
    def _lora(self, body: Mapping[str, Any]) -> dict[str, Any]:
        lora = body.get("lora_config") or {}
        if not isinstance(lora, Mapping):
            raise ServiceError(400, f"lora_config: expected an object, found {lora!r}")
        rank = lora.get("rank", 0)
        _nonneg_int(rank, "lora_config.rank")
        return {
            "rank": rank,
            "seed": lora.get("seed"),
            "train_mlp": bool(lora.get("train_mlp", True)),
            "train_attn": bool(lora.get("train_attn", True)),
            "train_unembed": bool(lora.get("train_unembed", True)),
        }

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

    async def create_model(self, body):
        sid = _str(body, "session_id")
        self._session(sid)
        seq = _nonneg_int(body.get("model_seq_id"), "model_seq_id")
        self._check_base(_str(body, "base_model"))
        self._check_optimizer(body.get("optimizer_config"), "optimizer_config")
        lora = self._lora(body)
        model_id = f"{sid}:train:{seq}"
        with self._lock:
            self.models.setdefault(model_id, {"lora": lora, "base_model": BASE_MODEL})
        params = lora_lib.init(self.engine._base_params, lora) if lora["rank"] else None
        self.engine.add_model(model_id, first_seq=1, params=params)  # numbered from 1
        rid = self._done({"type": "create_model", "model_id": model_id})
        return {"request_id": rid, "model_id": model_id}

    def _model_info(self, model_id: str) -> dict[str, Any]:
        return self.models.get(model_id) or {"lora": {"rank": 0}, "base_model": BASE_MODEL}

    async def get_info(self, body):
        m = self.engine._model(body.get("model_id"))
        info = self._model_info(m.model_id)
        rank = info["lora"].get("rank", 0)
        return {
            "type": "get_info",
            "model_id": m.model_id,
            "model_data": {
                "arch": "jaxreg decoder-only transformer",
                "model_name": BASE_MODEL,
                "tokenizer_id": _tokenizer_id(),
            },
            "model_name": BASE_MODEL,
            "is_lora": bool(rank),
            "lora_rank": rank or None,
            "optimizer_config": {"type": "adamw"},
        }

    # --------------------------------------------------------------- training
    async def forward_backward(self, request: Request):
        raw = await self._body(request)
        if not request.headers.get("content-type", "").startswith(tinker_proto.PROTO_CONTENT_TYPE):
            raise ServiceError(
                415, f"forward_backward: the SDK path expects {tinker_proto.PROTO_CONTENT_TYPE}"
            )
        fb = await asyncio.to_thread(tinker_proto.decode_forward_backward, raw)
        kind = "forward" if fb.forward_only else "forward_backward"

        async def run():
            if fb.seq_id < 1:
                raise ServiceError(
                    400, f"seq_id: the SDK numbers requests from 1, found {fb.seq_id}"
                )
            engine_kind, body = self._with_provenance(fb).engine_body()
            return await asyncio.to_thread(self.engine.submit, engine_kind, body)

        rid = await self._guarded(fb.model_id, fb.seq_id, kind, run)
        return {"request_id": rid, "model_id": fb.model_id}

    def _with_provenance(self, fb: tinker_proto.ForwardBackward) -> tinker_proto.ForwardBackward:
        """``stable_reinforce``: each datum's recorded logprobs and ``sampled`` mask."""
        if fb.loss_fn != "stable_reinforce":
            return fb
        session = fb.model_id.split(":train:")[0]
        data = service_losses.provenance_inputs(
            self._records, session, fb.data, fb.spans, ServiceError
        )
        return dataclasses.replace(fb, data=data)

    async def optim_step(self, body):
        if "optimizer_params" in body:
            kind = (body["optimizer_params"] or {}).get("type")
            raise ServiceError(
                400, f"optimizer_params.type: the reference service trains with Adam "
                f"(send AdamParams), found {kind!r}"
            )  # fmt: skip
        params = dict(body.get("adam_params") or {})
        params.pop("type", None)
        engine_body = {
            "model_id": body.get("model_id"),
            "seq_id": body.get("seq_id"),
            "adam_params": params,
        }
        rid = await asyncio.to_thread(self.engine.submit, "optim_step", engine_body)
        return {"request_id": rid, "model_id": body.get("model_id")}

    # --------------------------------------------------------------- checkpoints
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

    async def save_weights(self, body):
        m = self.engine._model(body.get("model_id"))
        name = self._name(body)
        path = f"tinker://{m.model_id}/weights/{name}"
        file = self._file(m.model_id, "weights", name)
        if file.exists() and not body.get("overwrite", False):
            # 400, not 409: the SDK retries a 409 for minutes whatever x-should-retry says.
            raise ServiceError(
                400, f"path: a checkpoint named {name!r} already exists ({path!r}); "
                "save under another name"
            )  # fmt: skip
        info = self._model_info(m.model_id)

        def job():
            tree = m.state_tree()
            meta = {
                "step": m.step,
                "n_accumulated": m.n_accumulated,
                "config": self.engine.config.to_dict(),
                "base_model": info["base_model"],
                "lora": info["lora"],
            }
            checkpoint.save_tree(file, tree, meta)
            return {"type": "save_weights", "path": path}

        rid = await asyncio.to_thread(self.engine.submit_job, m.model_id, body.get("seq_id"), job)
        return {"request_id": rid, "model_id": m.model_id}

    def _load_job(self, m, file: Path, path: str, optimizer: bool):
        def job():
            tree, meta = m.read_state(file, repr(path))
            m.params = tree["params"]
            if optimizer:
                m.opt_state, m.grad_acc = tree["opt_state"], tree["grad_acc"]
                m.step, m.n_accumulated = meta["step"], meta["n_accumulated"]
            else:
                m.opt_state = self.engine._optimizer.init(m.params)
                m.grad_acc = jax.tree.map(jnp.zeros_like, m.params)
                m.n_accumulated = 0
            return {"type": "load_weights", "path": path, "model_id": m.model_id}

        return job

    async def load_weights(self, body):
        path = body.get("path")
        run, kind, name = self._parse_path(path)
        if kind != "weights":
            raise ServiceError(400, f"path: {path!r} holds sampler weights; load a 'weights' path")
        file = self._file(run, kind, name)
        if not file.exists():
            raise ServiceError(404, f"path: no checkpoint at {path!r}")
        optimizer = bool(body.get("optimizer", False))
        if body.get("session_id") is not None:  # a new model from the checkpoint: seq_id 0
            sid = _str(body, "session_id")
            self._session(sid)
            seq = _nonneg_int(body.get("model_seq_id"), "model_seq_id")
            self._check_base(body.get("base_model"))
            if not optimizer:
                self._check_optimizer(body.get("optimizer_config"), "optimizer_config")
            _, meta = checkpoint.load_tree(file)
            model_id = f"{sid}:train:{seq}"
            with self._lock:
                self.models.setdefault(
                    model_id, {"lora": meta.get("lora", {"rank": 0}), "base_model": BASE_MODEL}
                )
            lora = self.models[model_id]["lora"]
            params = lora_lib.init(self.engine._base_params, lora) if lora.get("rank") else None
            m = self.engine.add_model(model_id, first_seq=0, params=params)
            job = self._load_job(m, file, path, optimizer)
            rid = await asyncio.to_thread(self.engine.submit_job, model_id, 0, job)
            return {"request_id": rid, "model_id": model_id}
        m = self.engine._model(body.get("model_id"))
        job = self._load_job(m, file, path, optimizer)
        rid = await asyncio.to_thread(self.engine.submit_job, m.model_id, body.get("seq_id"), job)
        return {"request_id": rid, "model_id": m.model_id}

    async def weights_info(self, body):
        run, kind, name = self._parse_path(body.get("tinker_path"), "tinker_path")
        file = self._file(run, kind, name)
        if not file.exists():
            raise ServiceError(404, f"tinker_path: no checkpoint at {body.get('tinker_path')!r}")
        _, meta = checkpoint.load_tree(file)
        lora = meta.get("lora") or {"rank": 0}
        return {
            "base_model": meta.get("base_model", BASE_MODEL),
            "is_lora": bool(lora.get("rank")),
            "lora_rank": lora.get("rank") or None,
            "train_mlp": lora.get("train_mlp"),
            "train_attn": lora.get("train_attn"),
            "train_unembed": lora.get("train_unembed"),
        }

    async def save_weights_for_sampler(self, body):
        m = self.engine._model(body.get("model_id"))
        named = body.get("path") is not None
        if named:
            name = self._name(body)
            path = f"tinker://{m.model_id}/sampler_weights/{name}"
            file = self._file(m.model_id, "sampler_weights", name)
        else:
            seq = _nonneg_int(body.get("sampling_session_seq_id"), "sampling_session_seq_id")
            session = m.model_id.split(":train:")[0]
            sampler_id = f"{session}:sample:{seq}"

        def job():
            # merged: the sampler runs the plain model; a copy: optim_step donates m.params
            params = jax.tree.map(jnp.copy, lora_lib.merged(m.params))
            if named:
                checkpoint.save_tree(file, {"params": params}, {"base_model": BASE_MODEL})
                with self._lock:
                    self._sampler_params[path] = params
                return {"type": "save_weights_for_sampler", "path": path}
            with self._lock:
                self.samplers[sampler_id] = {"params": params, "model_path": None}
            return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}

        rid = await asyncio.to_thread(self.engine.submit_job, m.model_id, body.get("seq_id"), job)
        return {"request_id": rid, "model_id": m.model_id}

    # --------------------------------------------------------------- sampling
    def _sampler_weights(self, path: str) -> Any:
        with self._lock:
            if path in self._sampler_params:
                return self._sampler_params[path]
        run, kind, name = self._parse_path(path, "model_path")
        file = self._file(run, kind, name)
        if not file.exists():
            raise ServiceError(404, f"model_path: no weights at {path!r}")
        tree, _ = checkpoint.load_tree(file)  # params: the same nested dicts and lists
        params = jax.tree.map(jnp.asarray, lora_lib.merged(tree["params"]))
        with self._lock:
            self._sampler_params[path] = params
        return params

    async def create_sampling_session(self, body):
        sid = _str(body, "session_id")
        self._session(sid)
        seq = _nonneg_int(body.get("sampling_session_seq_id"), "sampling_session_seq_id")
        sampler_id = f"{sid}:sample:{seq}"
        path = body.get("model_path")
        if path is None:
            self._check_base(_str(body, "base_model"))
            params = self.engine._base_params
        else:
            params = await asyncio.to_thread(self._sampler_weights, path)
        with self._lock:
            self.samplers.setdefault(sampler_id, {"params": params, "model_path": path})
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    async def get_sampler(self, request: Request):
        sampler_id = request.path_params["sampler_id"]
        s = self.samplers.get(sampler_id)
        if s is None:
            raise ServiceError(404, f"sampler_id: unknown sampling session {sampler_id!r}")
        return {"sampler_id": sampler_id, "base_model": BASE_MODEL, "model_path": s["model_path"]}

    def _stops(self, stop: Any) -> list[list[int]]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list):
            raise ServiceError(
                400, f"sampling_params.stop: expected strings or token ids, found {stop!r}"
            )
        out = []
        for s in stop:
            if isinstance(s, str):
                try:
                    out.append(tasks.encode(s))
                except ValueError as e:
                    raise ServiceError(400, f"sampling_params.stop: {e}") from None
            elif isinstance(s, int) and not isinstance(s, bool):
                out.append([s])
            else:
                raise ServiceError(
                    400, f"sampling_params.stop: expected a string or int, found {s!r}"
                )
        return out

    async def asample(self, body):
        sampler_id = body.get("sampling_session_id")
        s = self.samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if s is None:
            if body.get("model_path") or body.get("base_model"):
                raise ServiceError(
                    400, "sampling_session_id: the reference service samples through sampling "
                    "sessions (create_sampling_session) only"
                )  # fmt: skip
            raise ServiceError(404, f"sampling_session_id: unknown sampling session {sampler_id!r}")
        seq = _nonneg_int(body.get("seq_id"), "seq_id")
        with self._lock:
            rid = self._sample_seq.get((sampler_id, seq))
        n = body.get("num_samples", 1)
        if rid is not None:
            return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(n)]}
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 256:
            raise ServiceError(400, f"num_samples: expected an int in [1, 256], found {n!r}")
        tokens: list[int] = []
        prompt = body.get("prompt") or {}
        for j, chunk in enumerate(prompt.get("chunks", []) if isinstance(prompt, Mapping) else []):
            if (
                not isinstance(chunk, Mapping)
                or chunk.get("type", "encoded_text") != "encoded_text"
            ):
                raise ServiceError(
                    400, f"prompt.chunks[{j}]: only 'encoded_text' chunks are supported"
                )
            toks = chunk.get("tokens")
            if not isinstance(toks, list) or not all(type(t) is int for t in toks):
                raise ServiceError(400, f"prompt.chunks[{j}].tokens: expected a list of ints")
            tokens.extend(toks)
        vocab, ctx = self.engine.config.vocab_size, self.engine.config.context_length
        if not tokens:
            raise ServiceError(400, "prompt: expected at least one token")
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ServiceError(
                400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        sp = body.get("sampling_params") or {}
        max_tokens = sp.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ServiceError(
                400, f"sampling_params.max_tokens: expected an int >= 1, found {max_tokens!r}"
            )
        if len(tokens) + max_tokens > ctx:
            raise ServiceError(
                400, f"sampling_params.max_tokens: prompt ({len(tokens)}) + max_tokens "
                f"({max_tokens}) exceeds the context length {ctx}"
            )  # fmt: skip
        temperature = sp.get("temperature", 1.0)
        if (
            not isinstance(temperature, int | float)
            or isinstance(temperature, bool)
            or not (0 <= temperature < float("inf"))
        ):
            raise ServiceError(
                400, f"sampling_params.temperature: expected a number >= 0, found {temperature!r}"
            )
        if sp.get("top_k", -1) not in (-1, 0) or sp.get("top_p", 1) != 1:
            raise ServiceError(
                400, "sampling_params.top_k/top_p: not supported by the reference service "
                f"(expected -1 and 1), found {sp.get('top_k')!r} and {sp.get('top_p')!r}"
            )  # fmt: skip
        for field in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(field, 0):
                raise ServiceError(400, f"{field}: not supported by the reference service")
        if body.get("target_prompt_logprobs") is not None:
            raise ServiceError(
                400, "target_prompt_logprobs: not supported by the reference service"
            )
        seed = sp.get("seed")
        if seed is not None:
            _nonneg_int(seed, "sampling_params.seed")
        stops = self._stops(sp.get("stop"))
        include = bool(body.get("prompt_logprobs"))
        record = bool(body.get("record_stability_info"))
        params = s["params"]
        named = threading.Event()  # set once the request id (hence the sequence ids) exists
        box: dict[str, str] = {}

        def job():
            result = self._sampler.sample(
                params, tokens, num_samples=n, max_tokens=max_tokens,
                temperature=float(temperature), seed=seed, stop=stops,
                include_prompt_logprobs=include,
            )  # fmt: skip
            if record:  # before the result is visible: a training request may follow
                named.wait()
                ids = [f"{box['rid']}:{i}" for i in range(n)]
                session = sampler_id.split(":sample:")[0]
                self._records.record(session, ids, result["sequences"])
            return {"type": "sample", **result}

        with self._lock:
            rid = self._sample_seq.get((sampler_id, seq))
            if rid is None:
                rid = self._future(self._sample_worker.submit(job))
                self._sample_seq[(sampler_id, seq)] = rid
                box["rid"] = rid
                named.set()
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(n)]}

    # --------------------------------------------------------------- futures
    async def retrieve_future(self, request: Request):
        body = await self._json_body(request)
        rid = body.get("request_id")
        fut = self._results.get(rid) if isinstance(rid, str) else None
        if fut is None:
            try:
                fut = self.engine.result(rid)
            except ServiceError:
                # 410: the promise is gone (unknown, or expired from the result cache).
                raise ServiceError(410, f"request_id: unknown or expired request {rid!r}") from None
        try:
            result = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(fut)), RETRIEVE_WAIT_S
            )
        except TimeoutError:
            return _json({"type": "try_again", "request_id": rid, "queue_state": "active"}, 408)
        kind = result.get("type")
        if kind == "request_failed":
            category = result.get("category", "unknown")
            return {"error": result.get("error", ""), "category": category}
        wants_proto = tinker_proto.PROTO_CONTENT_TYPE in request.headers.get("accept", "")
        if kind in ("forward", "forward_backward"):
            if wants_proto:
                data = await asyncio.to_thread(tinker_proto.encode_forward_backward_output, result)
                return Response(data, media_type=tinker_proto.PROTO_CONTENT_TYPE)
            return _sdk_json_output(result)
        if kind == "sample":
            if wants_proto:
                data = await asyncio.to_thread(tinker_proto.encode_sample_response, result)
                return Response(data, media_type=tinker_proto.PROTO_CONTENT_TYPE)
            return {
                "type": "sample",
                "sequences": result["sequences"],
                "prompt_logprobs": _nan_to_none(result.get("prompt_logprobs")),
            }
        return result

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


def _nan_to_none(values):
    if values is None:
        return None
    return [None if v != v else v for v in values]


def _sdk_json_output(result: dict[str, Any]) -> dict[str, Any]:
    outputs = []
    for o in result.get("loss_fn_outputs", []):
        fields = {}
        for k, v in o.items():
            a = decode_tensor(v, f"loss_fn_outputs.{k}")
            fields[k] = {
                "data": a.ravel().tolist(),
                "dtype": "float32" if a.dtype.kind == "f" else "int64",
                "shape": list(a.shape),
            }
        outputs.append(fields)
    return {
        "loss_fn_output_type": result.get("loss_fn_output_type", "ArrayRecord"),
        "loss_fn_outputs": outputs,
        "metrics": result.get("metrics", {}),
    }


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
