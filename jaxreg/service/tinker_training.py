"""The tinker SDK's training calls: models, ``forward_backward`` and ``optim_step``.

``create_model`` makes an engine model with id ``{session}:train:{n}`` (full or LoRA,
``jaxreg.service.lora``) whose requests are numbered from ``seq_id`` 1, as the SDK
sends them; ``get_info`` reports it with the base tokenizer's id
(``jaxreg.service.tokenizer``). ``forward_backward`` takes the SDK's protobuf
encoding (``jaxreg.service.tinker_proto``); ``optim_step`` is Adam. A refused request
still uses up its ``seq_id`` (``TinkerBase._guarded``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from jaxreg.service import lora as lora_lib
from jaxreg.service import losses as service_losses
from jaxreg.service import tinker_proto
from jaxreg.service.engine import BASE_MODEL
from jaxreg.service.errors import ServiceError
from jaxreg.service.tinker_base import TinkerBase
from jaxreg.service.tinker_base import nonempty_str as _str
from jaxreg.service.tinker_base import nonneg_int as _nonneg_int


def _tokenizer_id() -> str:
    """The base tokenizer's hub id, installed into the local HF cache on first use."""
    from jaxreg.service.tokenizer import TOKENIZER_ID, install_tokenizer

    install_tokenizer()
    return TOKENIZER_ID


class TinkerTraining(TinkerBase):
    """The model and training handlers."""

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


__all__ = ["TinkerTraining"]
