"""The tinker SDK's bootstrap and sessions.

``client/config`` (API keys, no JWT exchange), ``client/dynamic_config``,
``create_session``, ``session_heartbeat``, ``sessions/{id}/finish``, ``telemetry``,
``GET get_server_capabilities`` (the base model) and ``cancel_future``.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request

from jaxreg.service.engine import BASE_MODEL
from jaxreg.service.errors import ServiceError
from jaxreg.service.tinker_base import TinkerBase


class TinkerSessions(TinkerBase):
    """The bootstrap and session handlers."""

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


__all__ = ["TinkerSessions"]
