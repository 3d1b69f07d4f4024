"""The tinker SDK's ``retrieve_future``: a request's result as the SDK reads it.

Protobuf results where the SDK asks for them (``jaxreg.service.tinker_proto``),
``408`` with a ``try_again`` body while a result is not ready, ``410`` for an unknown
or expired request id, JSON ``{"error", "category"}`` for a failed request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from jaxreg._src.remote.wire import decode_tensor
from jaxreg.service import tinker_proto
from jaxreg.service.errors import ServiceError
from jaxreg.service.tinker_base import TinkerBase
from jaxreg.service.tinker_base import json_response as _json

RETRIEVE_WAIT_S = 30.0  # below the SDK's 45 s read timeout


class TinkerFutures(TinkerBase):
    """The ``retrieve_future`` handler."""

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


__all__ = ["TinkerFutures"]
