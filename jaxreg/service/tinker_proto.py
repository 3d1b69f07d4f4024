"""The official tinker SDK's protobuf encoding, both ways, with the schema the SDK ships.

The SDK sends ``forward_backward`` (and ``forward``: ``forward_only``) as a
``tinker_public.ForwardBackwardRequest`` and asks for ``ForwardBackwardOutput`` and
``SampleResponse`` results as protobuf (``Accept: application/x-protobuf``; it
refuses JSON for them). This module converts between those messages and the
engine's types. The schema is ``tinker.proto.tinker_public_pb2``, so the SDK is the
one source of truth for field numbers.

Example:
  >>> import numpy as np
  >>> from tinker.proto import tinker_public_pb2 as pb     # the SDK's schema
  >>> from jaxreg.service import tinker_proto
  >>> msg = pb.ForwardBackwardRequest(model_id="m", seq_id=3, loss_fn="cross_entropy")
  >>> datum = msg.data.add()
  >>> datum.model_input.add().encoded_text.tokens = np.array([1, 14, 5], "<i4").tobytes()
  >>> weights = datum.loss_fn_inputs["weights"]
  >>> weights.dense, weights.dtype = np.ones(3, "<f4").tobytes(), pb.DTYPE_FLOAT32
  >>> req = tinker_proto.decode_forward_backward(msg.SerializeToString())  # -> ForwardBackward
  >>> req.model_id, req.seq_id, req.data[0].tokens.tolist()
  ('m', 3, [1, 14, 5])
  >>> req.data[0].loss_fn_inputs["weights"]
  array([1., 1., 1.], dtype=float32)
  >>> logprobs = {"data": [-0.5, -1.0], "dtype": "float32", "shape": [2]}
  >>> body = tinker_proto.encode_forward_backward_output(   # engine result dict -> bytes
  ...     {"metrics": {"loss:sum": 1.5}, "loss_fn_outputs": [{"logprobs": logprobs}]}
  ... )
  >>> pb.ForwardBackwardOutput.FromString(body).metrics["loss:sum"]
  1.5
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxreg._src.remote.wire import Datum, WireError, decode_tensor, densify_csr
from jaxreg.service.sampling import ProvenanceSpan

PROTO_CONTENT_TYPE = "application/x-protobuf"


def _pb():
    try:
        from tinker.proto import tinker_public_pb2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the tinker front door needs the official SDK's schema: pip install 'jaxreg[tinker]'"
        ) from e
    return tinker_public_pb2


_DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<i8"), 3: np.dtype("<i4")}


@dataclasses.dataclass(frozen=True)
class ForwardBackward:
    """A decoded ``ForwardBackwardRequest``."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, Any]
    forward_only: bool
    data: list[Datum]
    # per datum: its loss_fn_input_spans (Tinker's provenance), None where it has none
    spans: list[list[ProvenanceSpan] | None] = dataclasses.field(default_factory=list)

    def engine_body(self) -> tuple[str, dict[str, Any]]:
        """The engine's ``(kind, body)`` for this request (tensors come back as base64)."""
        kind = "forward" if self.forward_only else "forward_backward"
        key = "forward_input" if self.forward_only else "forward_backward_input"
        body = {
            "model_id": self.model_id,
            "seq_id": self.seq_id,
            "tensor_encoding": "base64",
            key: {
                "loss_fn": self.loss_fn,
                "loss_fn_config": self.loss_fn_config or None,
                "data": self.data,
            },
        }
        return kind, body


def _tensor(msg, field: str) -> np.ndarray:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{field}.dtype: expected float32 or int64, found proto DType {msg.dtype}")
    if msg.WhichOneof("encoding") == "sparse_csr":  # the SDK's encoding of sparse 2-D tensors
        csr = msg.sparse_csr
        parts = []
        for name, raw, dt in (
            ("values", csr.values, dtype),
            ("crow_indices", csr.crow_indices, np.dtype("<i8")),
            ("col_indices", csr.col_indices, np.dtype("<i8")),
        ):
            if len(raw) % dt.itemsize:
                raise WireError(f"{field}.sparse_csr.{name}: not a whole number of {dt} values")
            parts.append(np.frombuffer(raw, dt))
        values = parts[0].astype(np.int64) if dtype == np.dtype("<i4") else parts[0]
        return densify_csr(values, parts[1], parts[2], list(msg.shape), field)
    if len(msg.dense) % dtype.itemsize:
        raise WireError(f"{field}: {len(msg.dense)} bytes is not a whole number of {dtype} values")
    flat = np.frombuffer(msg.dense, dtype)
    if dtype == np.dtype("<i4"):
        flat = flat.astype(np.int64)
    shape = list(msg.shape)
    if not shape:
        return flat
    if int(np.prod(shape)) != flat.size:
        raise WireError(
            f"{field}: shape {shape} needs {int(np.prod(shape))} values, found {flat.size}"
        )
    return flat.reshape(shape)


def decode_forward_backward(body: bytes) -> ForwardBackward:
    """Parses a ``ForwardBackwardRequest``; raises ``WireError`` naming the field."""
    pb = _pb()
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf's DecodeError
        raise WireError(f"request body: not a tinker ForwardBackwardRequest ({e})") from None
    config: dict[str, Any] = {}
    for k, v in msg.loss_fn_config.items():  # the legacy float map
        config[k] = float(v)
    for k, v in msg.loss_fn_config_v2.items():  # preferred when set
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    data: list[Datum] = []
    spans: list[list[ProvenanceSpan] | None] = []
    for i, d in enumerate(msg.data):
        where = f"forward_backward_input.data[{i}]"
        tokens = []
        for j, chunk in enumerate(d.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(
                    f"{where}.model_input.chunks[{j}]: only 'encoded_text' chunks are supported "
                    f"(the reference model reads token ids), found {kind!r}"
                )
            tokens.append(np.frombuffer(chunk.encoded_text.tokens, "<i4"))
        ids = np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, np.int64)
        inputs = {
            name: _tensor(t, f"{where}.loss_fn_inputs.{name}")
            for name, t in d.loss_fn_inputs.items()
        }
        data.append(Datum(ids, inputs))
        spans.append(_spans(d, where) if len(d.loss_fn_input_spans) else None)
    return ForwardBackward(
        msg.model_id, int(msg.seq_id), msg.loss_fn or "cross_entropy", config,
        bool(msg.forward_only), data, spans,
    )  # fmt: skip


def _spans(d, where: str) -> list[ProvenanceSpan]:
    out = []
    for j, span in enumerate(d.loss_fn_input_spans):
        kind = span.WhichOneof("span")
        if kind not in ("prompt_tokens", "sampled_tokens"):
            raise WireError(f"{where}.loss_fn_input_spans[{j}]: expected a provenance span")
        arm = getattr(span, kind)
        if arm.offset < 0 or arm.length < 0 or not arm.sequence_id:
            raise WireError(
                f"{where}.loss_fn_input_spans[{j}]: expected a sequence_id and offset, "
                f"length >= 0, found {arm.sequence_id!r}, {arm.offset}, {arm.length}"
            )
        out.append(
            ProvenanceSpan(kind == "sampled_tokens", arm.sequence_id, arm.offset, arm.length)
        )
    return out


def encode_forward_backward_output(result: dict[str, Any]) -> bytes:
    """An engine ``forward``/``forward_backward`` result as a ``ForwardBackwardOutput``."""
    pb = _pb()
    out = pb.ForwardBackwardOutput(loss_fn_output_type=result.get("loss_fn_output_type", ""))
    for k, v in result.get("metrics", {}).items():
        out.metrics[k] = float(v)
    outputs = result.get("loss_fn_outputs", [])
    if outputs:
        record = out.loss_fn_outputs.add(num_datums=len(outputs))
        for name in outputs[0]:
            arrays = [decode_tensor(o[name], f"loss_fn_outputs.{name}") for o in outputs]
            arrays = [np.asarray(a, "<f4" if a.dtype.kind == "f" else "<i8") for a in arrays]
            sizes = np.array([0] + [a.nbytes for a in arrays], np.int64)
            bt = record.fields[name]
            bt.data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
            bt.offsets = np.cumsum(sizes).astype("<i8").tobytes()
            bt.dtype = pb.DTYPE_FLOAT32 if arrays[0].dtype.kind == "f" else pb.DTYPE_INT64
            bt.trailing_shape.extend(arrays[0].shape[1:])
    return out.SerializeToString()


def encode_sample_response(result: dict[str, Any]) -> bytes:
    """A sampler result (``sequences``, ``prompt_logprobs``) as a ``SampleResponse``."""
    pb = _pb()
    out = pb.SampleResponse()
    for seq in result["sequences"]:
        s = out.sequences.add(
            stop_reason=pb.STOP_REASON_STOP
            if seq["stop_reason"] == "stop"
            else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq["tokens"], "<i4").tobytes(),
        )
        if seq.get("logprobs") is not None:
            s.logprobs = np.asarray(seq["logprobs"], "<f4").tobytes()
    if result.get("prompt_logprobs") is not None:
        out.prompt_logprobs = np.asarray(result["prompt_logprobs"], "<f4").tobytes()
    return out.SerializeToString()
