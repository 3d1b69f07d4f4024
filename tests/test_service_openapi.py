"""A schema-based fuzzer for the service's JSON API: no input gets a 5xx.

Bodies are generated from the OpenAPI description the service serves
(``GET /api/v1/openapi.json``), valid ones included (a datum's tensors usually match
its tokens, so requests get past the first checks), then up to three mutations each:
a value replaced by arbitrary JSON (huge ints, NaN, deep nesting, wrong types), a
field deleted, an unknown field added. Every answer must be below 500, a refusal must
say why, and a refused request must leave its model exactly as it was.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VOCAB = 32
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
ANY_JSON = st.recursive(
    _SCALARS,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)


@st.composite
def _datum(draw):
    n = draw(st.integers(1, 20))
    k = draw(st.sampled_from([0, 0, 0, 2]))
    shape = [n, k] if k else [n]
    size = n * max(k, 1)
    tokens = draw(st.lists(st.integers(0, VOCAB), min_size=n, max_size=n))
    inputs = {
        "target_tokens": {
            "data": draw(st.lists(st.integers(0, VOCAB - 1), min_size=size, max_size=size)),
            "dtype": "int64",
            "shape": shape,
        }
    }
    names = draw(st.sets(st.sampled_from(["logprobs", "advantages"])))
    for name in sorted(names | ({"weights"} if draw(st.booleans()) else set())):
        values = st.floats(-3, 3, width=32)
        inputs[name] = {
            "data": draw(st.lists(values, min_size=size, max_size=size)),
            "dtype": "float32",
            "shape": shape,
        }
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": inputs,
    }


def _from_schema(schema: dict, name: str = ""):
    """A strategy of values valid for ``schema`` (the subset the service's schema uses)."""
    items = schema.get("items", {}) if name == "data" else {}
    if "model_input" in items.get("properties", {}):
        return st.lists(_datum(), min_size=1, max_size=3)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([_from_schema(s, name) for s in schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([_from_schema({**schema, "type": k}, name) for k in kind])
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: _from_schema(v, k) for k, v in props.items() if k in required},
            optional={k: _from_schema(v, k) for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(_from_schema(schema.get("items", {}), name), max_size=4)
    if kind == "integer":
        low, high = schema.get("minimum", -(2**40)), schema.get("maximum", 2**40)
        return st.integers(low, min(high, low + 8)) | st.integers(low, high)
    if kind == "number":
        high = 1.0 if "exclusiveMaximum" in schema else 1e3
        return st.floats(schema.get("minimum", -1e3), high, exclude_max=high == 1.0)
    if kind == "string":
        if "pattern" in schema:
            return st.sampled_from(["ckpt", "jaxreg://fuzz.1", "a-b_c"])
        return st.text(max_size=8)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return ANY_JSON


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _mutate(draw, body):
    body = json.loads(json.dumps(body))
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(body))
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if how == "replace":
                body = draw(ANY_JSON)
            continue
        parent = body
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        if how == "replace":
            parent[last] = draw(ANY_JSON)
        elif how == "delete" and isinstance(parent, dict):
            del parent[last]
        elif how == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(ANY_JSON)
    return body


def _state(engine, model_id):
    m = engine._models.get(model_id)
    if m is None:
        return None
    return (m.step, m.n_accumulated, m.seq.next_seq, m.seq.n_waiting, engine.n_models())


@pytest.fixture(scope="module")
def schema(server):
    with httpx.Client(base_url=server.url) as http:
        return http.get("/api/v1/openapi.json").json()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        yield h


def _create(http):
    rid = http.post("/api/v1/create_model", json={}).json()["request_id"]
    answer = http.post("/api/v1/retrieve_future", json={"request_id": rid}).json()
    return answer["model_id"], rid


@settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_fuzz_the_json_api(server, schema, http, data):
    endpoint = data.draw(st.sampled_from(sorted(p.rsplit("/", 1)[-1] for p in schema["paths"])))
    if endpoint == "healthz":
        return
    operation = schema["paths"][f"/api/v1/{endpoint}"]["post"]
    body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    model_id, create_rid = _create(http)
    try:
        body = data.draw(_from_schema(body_schema))
        if "model_id" in body and endpoint not in ("delete_model", "unload_model"):
            body["model_id"] = model_id
        if "seq_id" in body:  # the model is fresh: 0 (or none) runs at once, unless mutated
            body["seq_id"] = data.draw(st.sampled_from([None, 0]))
        if "request_id" in body and data.draw(st.booleans()):
            body["request_id"] = create_rid
        body = _mutate(data.draw, body)
        before = _state(server.engine, model_id)
        content = json.dumps(body).encode()  # NaN/Infinity literals, as Python writes them
        r = http.post(f"/api/v1/{endpoint}", content=content)
        assert r.status_code < 500, (endpoint, content[:300], r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert isinstance(error, str) and len(error) > 10, error
            assert _state(server.engine, model_id) == before, (endpoint, content[:300], error)
        elif "request_id" in r.json() and endpoint != "retrieve_future":
            answer = http.post(
                "/api/v1/retrieve_future",
                json={"request_id": r.json()["request_id"], "timeout": 10},
            )
            assert answer.status_code == 200
            if endpoint == "create_model" and "model_id" in answer.json():
                http.post("/api/v1/delete_model", json={"model_id": answer.json()["model_id"]})
    finally:
        http.post("/api/v1/delete_model", json={"model_id": model_id})
    # Whatever happened, the service still answers.
    assert http.get("/api/v1/healthz").status_code == 200
