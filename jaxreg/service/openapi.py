"""The OpenAPI 3.1 description of the service's JSON API (``GET /api/v1/openapi.json``).

It documents the request bodies the service accepts; the service validates every
field itself (see ``jaxreg.service.validation``) and answers 4xx naming the field for
anything else. The tests drive a schema-based fuzzer from it.

Example:
  >>> schema = openapi_schema()
  >>> sorted(schema["paths"])[:2]
  ['/api/v1/create_model', '/api/v1/delete_model']
"""

from __future__ import annotations

import copy
from typing import Any

from jaxreg._src.remote.wire import API_KEY_HEADER

_INT = {"type": "integer", "minimum": 0}
_SEQ = {"type": ["integer", "null"], "minimum": 0, "maximum": (1 << 53) - 1}
_TENSOR = {
    "type": "object",
    "properties": {
        "data": {
            "oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}],
            "description": "a flat list, or base64 of the little-endian bytes",
        },
        "dtype": {"enum": ["int64", "int32", "float32", "float64"]},
        "shape": {"type": ["array", "null"], "items": _INT},
    },
    "required": ["data", "dtype"],
}
_DATUM = {
    "type": "object",
    "properties": {
        "model_input": {
            "type": "object",
            "properties": {
                "chunks": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {"const": "encoded_text"},
                            "tokens": {"type": "array", "items": _INT},
                        },
                        "required": ["tokens"],
                    },
                }
            },
            "required": ["chunks"],
        },
        "loss_fn_inputs": {"type": "object", "additionalProperties": _TENSOR},
    },
    "required": ["model_input", "loss_fn_inputs"],
}
_FB_INPUT = {
    "type": "object",
    "properties": {
        "data": {"type": "array", "items": _DATUM, "minItems": 1},
        "loss_fn": {"enum": ["cross_entropy", "importance_sampling"]},
        "loss_fn_config": {"type": ["object", "null"], "maxProperties": 0},
    },
    "required": ["data"],
}
_MODEL = {"type": "string", "description": "a model_id from create_model"}
_ADAM = {
    "type": "object",
    "properties": {
        name: {
            "type": "number",
            "minimum": 0,
            **({"exclusiveMaximum": 1} if "beta" in name else {}),
        }
        for name in (
            "learning_rate",
            "beta1",
            "beta2",
            "eps",
            "weight_decay",
            "grad_clip_norm",
        )
    },
    "additionalProperties": False,
}
_BODIES: dict[str, dict[str, Any]] = {
    "create_model": {"properties": {"base_model": {"const": "jaxreg-base"}}},
    "get_info": {"properties": {"model_id": _MODEL}, "required": ["model_id"]},
    "delete_model": {"properties": {"model_id": _MODEL}, "required": ["model_id"]},
    "forward": {
        "properties": {
            "model_id": _MODEL,
            "seq_id": _SEQ,
            "forward_input": _FB_INPUT,
            "tensor_encoding": {"enum": ["json", "base64"]},
        },
        "required": ["model_id", "forward_input"],
    },
    "forward_backward": {
        "properties": {
            "model_id": _MODEL,
            "seq_id": _SEQ,
            "forward_backward_input": _FB_INPUT,
            "forward_only": {"type": "boolean"},
            "tensor_encoding": {"enum": ["json", "base64"]},
        },
        "required": ["model_id", "forward_backward_input"],
    },
    "optim_step": {
        "properties": {"model_id": _MODEL, "seq_id": _SEQ, "adam_params": _ADAM},
        "required": ["model_id"],
    },
    "save_state": {
        "properties": {
            "model_id": _MODEL,
            "seq_id": _SEQ,
            "path": {"type": "string", "pattern": "^(jaxreg://)?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"},
        },
        "required": ["model_id", "path"],
    },
    "skip_seq": {
        "properties": {"model_id": _MODEL, "seq_id": _SEQ},
        "required": ["model_id", "seq_id"],
    },
    "retrieve_future": {
        "properties": {
            "request_id": {"type": "string"},
            "timeout": {"type": "number", "minimum": 0},
        },
        "required": ["request_id"],
    },
}
_BODIES["load_state"] = _BODIES["save_state"]
_BODIES["unload_model"] = _BODIES["delete_model"]


def request_schema(endpoint: str) -> dict[str, Any]:
    """The JSON schema of ``endpoint``'s request body (a copy)."""
    return copy.deepcopy({"type": "object", **_BODIES[endpoint]})


def endpoints() -> list[str]:
    """The ``POST`` endpoints, by name."""
    return sorted(_BODIES)


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API."""
    error = {
        "description": "refused: the request changed nothing",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                }
            }
        },
    }
    paths: dict[str, Any] = {
        "/api/v1/healthz": {"get": {"responses": {"200": {"description": "alive"}}}},
    }
    for name in endpoints():
        paths[f"/api/v1/{name}"] = {
            "post": {
                "operationId": name,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": request_schema(name)}},
                },
                "responses": {
                    "200": {"description": "a result, or {request_id} of a future"},
                    **{code: error for code in ("400", "401", "404", "409", "413", "422")},
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxreg reference training service", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}
            }
        },
    }
