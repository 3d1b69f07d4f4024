"""Wire types shared by the reference service and the remote client.

The JSON shapes follow Tinker's REST types, so an official ``tinker.types.Datum``
converts with ``model_dump`` (or the helpers here) and a plain dict works as well::

  Datum      = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [int]}]},
                "loss_fn_inputs": {name: TensorData}}
  TensorData = {"data": [numbers] | "<base64>", "dtype": "int64" | "float32",
                "shape": [int] | None}

``data`` is either a flat JSON list (Tinker's form) or, for large payloads, a base64
string of the little-endian bytes (the compact encoding: no float formatting at all).
Decoding validates everything and raises [`WireError`][jaxreg.remote.WireError] naming the field.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from jaxreg._src.core.term import InputError

API_KEY_HEADER = "X-API-Key"
"""The HTTP header that carries the API key (as UTF-8), on both front doors."""

Encoding = Literal["json", "base64"]
ENCODINGS = ("json", "base64")
_DTYPES: dict[str, np.dtype] = {
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}


class WireError(InputError, ValueError):
    """A request or response does not have the expected shape; the message says where."""


def encode_tensor(array: Any, encoding: Encoding = "json") -> dict[str, Any]:
    """Encodes an array as a ``TensorData`` dict (``float32`` or ``int64``)."""
    a = np.asarray(array)
    if a.dtype.kind in "iub":
        dtype, a = "int64", a.astype("<i8", copy=False)
    elif a.dtype.kind == "f":
        dtype, a = "float32", a.astype("<f4", copy=False)
    else:
        raise WireError(f"encode_tensor: expected an int or float array, found dtype {a.dtype}")
    if encoding == "base64":
        data: Any = base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")
    elif encoding == "json":
        data = a.ravel().tolist()
    else:
        raise WireError(f"encode_tensor: encoding must be one of {ENCODINGS}, found {encoding!r}")
    return {"data": data, "dtype": dtype, "shape": list(a.shape)}


def densify_csr(
    values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: Any, field: str
) -> np.ndarray:
    """The dense 2-D array of a CSR ``TensorData`` (the tinker SDK's sparse encoding).

    Entries not listed are 0 (the SDK's ``TensorData.to_numpy()`` default pad value).
    Raises ``WireError`` naming ``field`` unless ``crow`` (``nrows + 1`` row pointers
    from 0 to ``nnz``, non-decreasing) and ``col`` (``nnz`` column indices in
    ``[0, ncols)``, increasing within a row) describe ``values``.

    Example:
      >>> import numpy as np
      >>> densify_csr(np.array([5, 7]), np.array([0, 1, 1, 2]), np.array([1, 0]), [3, 2], "t")
      array([[0, 5],
             [0, 0],
             [7, 0]])
    """
    shape = [int(n) for n in shape] if shape is not None else []
    if len(shape) != 2 or min(shape) < 0:
        raise WireError(f"{field}: sparse TensorData must be 2-D, found shape {shape}")
    nrows, ncols = shape
    nnz = values.size
    if crow.shape != (nrows + 1,) or col.shape != (nnz,):
        raise WireError(
            f"{field}: sparse TensorData of shape {shape} with {nnz} values needs "
            f"{nrows + 1} row pointers and {nnz} column indices, found {crow.size} and {col.size}"
        )
    if crow[0] != 0 or crow[-1] != nnz or (np.diff(crow) < 0).any():
        raise WireError(f"{field}: sparse row pointers must rise from 0 to {nnz}")
    if nnz and (col.min() < 0 or col.max() >= ncols):
        raise WireError(f"{field}: sparse column index outside [0, {ncols})")
    rows = np.repeat(np.arange(nrows), np.diff(crow))
    if nnz > 1 and ((np.diff(col) <= 0) & (np.diff(rows) == 0)).any():
        raise WireError(f"{field}: sparse column indices must increase within a row")
    out = np.zeros(shape, values.dtype)
    out[rows, col] = values
    return out


def decode_tensor(obj: Any, field: str = "tensor") -> np.ndarray:
    """Decodes a ``TensorData`` dict (JSON list or base64 data) into a NumPy array."""
    if not isinstance(obj, Mapping):
        raise WireError(f"{field}: expected a TensorData object, found {type(obj).__name__}")
    dtype_name = obj.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        shown = repr(dtype_name) if isinstance(dtype_name, str) else type(dtype_name).__name__
        raise WireError(f"{field}.dtype: expected one of {sorted(_DTYPES)}, found {shown[:80]}")
    dtype = _DTYPES[dtype_name]
    data = obj.get("data")
    if isinstance(data, str):
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as e:
            raise WireError(f"{field}.data: invalid base64 ({e})") from None
        if len(raw) % dtype.itemsize:
            raise WireError(
                f"{field}.data: {len(raw)} bytes is not a whole number of {dtype_name} values"
            )
        flat = np.frombuffer(raw, dtype)
    elif isinstance(data, list):
        try:
            flat = np.asarray(data, dtype)
        except (TypeError, ValueError, OverflowError):
            raise WireError(f"{field}.data: expected a flat list of numbers") from None
        if flat.ndim != 1:
            raise WireError(f"{field}.data: expected a flat list, found shape {list(flat.shape)}")
    else:
        raise WireError(
            f"{field}.data: expected a list or a base64 string, found {type(data).__name__}"
        )
    shape = obj.get("shape")
    if shape is None:
        return flat
    if not isinstance(shape, list | tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise WireError(f"{field}.shape: expected a list of non-negative ints, found {shape!r}")
    crow, col = obj.get("sparse_crow_indices"), obj.get("sparse_col_indices")
    if crow is not None or col is not None:  # the SDK's CSR encoding of a 2-D tensor
        try:
            crow_a, col_a = np.asarray(crow, np.int64), np.asarray(col, np.int64)
        except (TypeError, ValueError, OverflowError):
            raise WireError(f"{field}: sparse indices: expected lists of ints") from None
        return densify_csr(flat, crow_a.ravel(), col_a.ravel(), shape, field)
    if math.prod(shape) != flat.size:
        raise WireError(
            f"{field}: shape {list(shape)} needs {math.prod(shape)} values, found {flat.size}"
        )
    return flat.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Datum:
    """One training example: input tokens and named per-token loss inputs.

    Attributes:
      tokens: int array ``[T]``, the model input.
      loss_fn_inputs: e.g. ``target_tokens`` (``[T]`` or ``[T, K]``), ``weights``,
        ``advantages``, ``logprobs``; any other per-token field is carried along.
    """

    tokens: np.ndarray
    loss_fn_inputs: dict[str, np.ndarray]

    def to_json(self, encoding: Encoding = "json") -> dict[str, Any]:
        """The Tinker-shaped JSON dict of this datum."""
        toks = np.asarray(self.tokens).astype(int).ravel().tolist()
        return {
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": toks}]},
            "loss_fn_inputs": {
                k: encode_tensor(v, encoding) for k, v in self.loss_fn_inputs.items()
            },
        }

    def replace_inputs(self, **fields: Any) -> Datum:
        """A copy with some ``loss_fn_inputs`` replaced or added."""
        return Datum(self.tokens, {**self.loss_fn_inputs, **fields})


def datum_from_json(obj: Any, field: str = "datum") -> Datum:
    """Parses and validates a Tinker-shaped datum dict."""
    if not isinstance(obj, Mapping):
        raise WireError(f"{field}: expected an object, found {type(obj).__name__}")
    model_input = obj.get("model_input")
    if not isinstance(model_input, Mapping) or not isinstance(model_input.get("chunks"), list):
        raise WireError(f"{field}.model_input: expected {{'chunks': [...]}}")
    tokens: list[int] = []
    for j, chunk in enumerate(model_input["chunks"]):
        where = f"{field}.model_input.chunks[{j}]"
        if not isinstance(chunk, Mapping) or chunk.get("type", "encoded_text") != "encoded_text":
            found = chunk.get("type") if isinstance(chunk, Mapping) else type(chunk).__name__
            raise WireError(f"{where}: only 'encoded_text' chunks are supported, found {found!r}")
        toks = chunk.get("tokens")
        if not isinstance(toks, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in toks
        ):
            raise WireError(f"{where}.tokens: expected a list of ints")
        tokens.extend(toks)
    inputs = obj.get("loss_fn_inputs", {})
    if not isinstance(inputs, Mapping):
        raise WireError(f"{field}.loss_fn_inputs: expected an object of TensorData")
    try:
        token_array = np.asarray(tokens, np.int64)
    except OverflowError:
        i = next(i for i, t in enumerate(tokens) if not -(1 << 63) <= t < 1 << 63)
        raise WireError(
            f"{field}.model_input: token {i} ({tokens[i].bit_length()} bits) does not fit "
            "in an int64"
        ) from None
    return Datum(
        token_array,
        {k: decode_tensor(v, f"{field}.loss_fn_inputs.{k}") for k, v in inputs.items()},
    )


def to_datum(obj: Any, field: str = "datum") -> Datum:
    """Converts a jaxreg ``Datum``, an official ``tinker.types.Datum`` or a dict."""
    if isinstance(obj, Datum):
        return obj
    if isinstance(obj, Mapping):
        return datum_from_json(obj, field)
    model_input = getattr(obj, "model_input", None)
    if model_input is not None and hasattr(obj, "loss_fn_inputs"):  # tinker.types.Datum
        tokens = np.asarray(model_input.to_ints(), np.int64)
        inputs = {}
        for k, v in obj.loss_fn_inputs.items():
            inputs[k] = np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v)
        return Datum(tokens, inputs)
    raise WireError(
        f"{field}: expected a jaxreg Datum, a tinker.types.Datum or a dict, "
        f"found {type(obj).__name__}"
    )
