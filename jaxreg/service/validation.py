"""Validation of a request's fields, complete before it is queued.

``RequestValidator`` checks a ``forward``/``forward_backward`` input (loss name and
config, tensor encoding, every datum's tokens, targets and loss inputs, the token and
memory limits) and pads it into a ``Prepared`` batch, and checks ``adam_params`` and
the ``param_diagnostics`` extension field. A refusal raises ``ServiceError`` naming the
field, what was expected and what was found; nothing has changed then.

Padded shapes are bucketed (batch and length to powers of two), and the optimizer's
hyperparameters are traced, so a stream of requests with random lengths and learning
rates compiles a bounded number of programs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from jaxreg._src.remote.wire import ENCODINGS, Datum, Encoding, WireError, datum_from_json
from jaxreg.service import diagnostics
from jaxreg.service import losses as service_losses
from jaxreg.service.errors import ServiceError
from jaxreg.service.errors import short as _short
from jaxreg.service.limits import Limits, mib, work_bytes
from jaxreg.service.model import ModelConfig

LOSS_FNS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    # sampled: 1 on targets the sampler drew (the Tinker front door fills it, and the
    # recorded logprobs, from the datum's provenance: see jaxreg.service.losses)
    "stable_reinforce": ("target_tokens", "logprobs", "advantages", "sampled"),
}
_F32 = float(np.finfo(np.float32).max)


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated forward/forward_backward request, padded and ready to run."""

    loss_fn: str
    tokens: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] or [B, T, K] int32
    mask: np.ndarray  # [B, T] float32
    inputs: dict[str, np.ndarray]  # padded float32, shaped like targets
    lengths: list[int]
    forward_only: bool
    encoding: Encoding
    decode_s: float
    cost: int  # estimated activation bytes (limits.work_bytes)


class RequestValidator:
    """Checks requests against a model config and the service's ``Limits``."""

    def __init__(self, config: ModelConfig, limits: Limits):
        self.config = config
        self.limits = limits
        self.max_tokens = limits.max_tokens

    def prepare_data(self, fb_input, key, forward_only, body) -> Prepared:
        start = time.perf_counter()
        if not isinstance(fb_input, Mapping):
            raise ServiceError(400, f"{key}: expected an object with 'data' and 'loss_fn'")
        loss_fn = fb_input.get("loss_fn", "cross_entropy")
        if not isinstance(loss_fn, str) or loss_fn not in LOSS_FNS:
            raise ServiceError(
                400,
                f"{key}.loss_fn: unknown loss {_short(loss_fn)}; supported: {sorted(LOSS_FNS)}",
            )
        config = service_losses.check_config(
            loss_fn, fb_input.get("loss_fn_config"), f"{key}.loss_fn_config", ServiceError
        )
        encoding = body.get("tensor_encoding", "json")
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise ServiceError(
                400, f"tensor_encoding: expected one of {ENCODINGS}, found {_short(encoding)}"
            )
        data = fb_input.get("data")
        if not isinstance(data, list) or not data:
            raise ServiceError(400, f"{key}.data: expected a non-empty list of Datum")
        required = ("target_tokens",) if forward_only else LOSS_FNS[loss_fn]
        allowed = set(LOSS_FNS[loss_fn])
        vocab, ctx = self.config.vocab_size, self.config.context_length
        datums, total = [], 0
        k_shape: tuple[int, ...] | None = None
        for i, raw in enumerate(data):
            where = f"{key}.data[{i}]"
            try:  # the protobuf front door hands over decoded Datums
                d = raw if isinstance(raw, Datum) else datum_from_json(raw, where)
            except WireError as e:
                raise ServiceError(400, str(e)) from None
            t = len(d.tokens)
            tgt_shape = np.shape(d.loss_fn_inputs.get("target_tokens", ()))
            total += t * (math.prod(tgt_shape[1:]) if len(tgt_shape) > 1 else 1)
            if total > self.max_tokens:  # early: before decoding the rest
                raise ServiceError(
                    413,
                    f"{key}.data: more than {self.max_tokens} token-targets (tokens x "
                    f"targets per token, summed over datums) in one request, the limit; "
                    f"datums 0..{i} already hold {total}",
                )
            if t == 0:
                raise ServiceError(400, f"{where}.model_input: expected at least one token")
            if t > ctx:
                raise ServiceError(
                    400, f"{where}.model_input: {t} tokens exceeds the context length {ctx}"
                )
            for name in d.loss_fn_inputs:
                if name not in allowed:
                    raise ServiceError(
                        400,
                        f"{where}.loss_fn_inputs.{name}: not an input of {loss_fn} "
                        f"(expected {sorted(allowed)})",
                    )
            for name in required:
                if name not in d.loss_fn_inputs:
                    raise ServiceError(400, f"{where}.loss_fn_inputs.{name}: missing")
            tgt = d.loss_fn_inputs["target_tokens"]
            if tgt.dtype.kind not in "iu" or tgt.ndim not in (1, 2) or tgt.shape[0] != t:
                raise ServiceError(
                    400,
                    f"{where}.loss_fn_inputs.target_tokens: expected int64 [{t}] or [{t}, K] "
                    f"(one row per input token), found {tgt.dtype}{list(tgt.shape)}",
                )
            if k_shape is None:
                k_shape = tgt.shape[1:]
            elif tgt.shape[1:] != k_shape:
                raise ServiceError(
                    400,
                    f"{where}.loss_fn_inputs.target_tokens: every datum must have the same "
                    f"number of targets per position; expected {list(k_shape)}, "
                    f"found {list(tgt.shape[1:])}",
                )
            for name, arr in (("model_input", d.tokens), ("target_tokens", tgt)):
                if arr.size and (arr.min() < 0 or arr.max() >= vocab):
                    bad = int(arr[(arr < 0) | (arr >= vocab)][0])
                    raise ServiceError(
                        400,
                        f"{where}.{name}: token id {bad} is outside the vocabulary [0, {vocab})",
                    )
            for name, arr in d.loss_fn_inputs.items():
                if name == "target_tokens":
                    continue
                if arr.shape != tgt.shape:
                    raise ServiceError(
                        400,
                        f"{where}.loss_fn_inputs.{name}: expected shape {list(tgt.shape)} "
                        f"(like target_tokens), found {list(arr.shape)}",
                    )
                if not np.isfinite(arr).all():
                    raise ServiceError(
                        400, f"{where}.loss_fn_inputs.{name}: contains non-finite values"
                    )
                if name == "sampled" and not np.isin(arr, (0, 1)).all():
                    bad = arr[~np.isin(arr, (0, 1))].flat[0]
                    raise ServiceError(
                        400, f"{where}.loss_fn_inputs.sampled: expected 0 or 1, found {bad}"
                    )
            datums.append(d)
        lengths = [len(d.tokens) for d in datums]
        b, t = _bucket(len(datums), 1), min(_bucket(max(lengths), 16), ctx)
        k = math.prod(k_shape) if k_shape else 1
        cost = work_bytes(self.config, b, t, k, backward=not forward_only)
        if cost > self.limits.memory_bytes:
            raise ServiceError(
                413,
                f"{key}.data: this request needs about {mib(cost)} of activation memory "
                f"(padded to [{b}, {t}]{f' x {k} targets' if k > 1 else ''}, "
                f"{'forward' if forward_only else 'forward_backward'}), over the service's "
                f"limit of {mib(self.limits.memory_bytes)}; split it into smaller requests",
            )
        tokens = np.zeros((b, t), np.int32)
        targets = np.zeros((b, t, *(k_shape or ())), np.int32)
        mask = np.zeros((b, t), np.float32)
        # A forward pass needs only target_tokens; absent loss inputs take their
        # neutral values (weights 1, sampling logprobs and advantages 0) for loss:sum.
        inputs = {
            n: np.full(targets.shape, 1.0 if n == "weights" else 0.0, np.float32)
            for n in LOSS_FNS[loss_fn]
            if n != "target_tokens"
        }
        inputs.update(config)  # traced scalars: a new clip threshold does not recompile
        for i, (d, n) in enumerate(zip(datums, lengths, strict=True)):
            tokens[i, :n] = d.tokens
            targets[i, :n] = d.loss_fn_inputs["target_tokens"]
            mask[i, :n] = 1.0
            for name in inputs:
                if name in d.loss_fn_inputs:
                    inputs[name][i, :n] = d.loss_fn_inputs[name]
        return Prepared(
            loss_fn,
            tokens,
            targets,
            mask,
            inputs,
            lengths,
            forward_only,
            cast(Encoding, encoding),
            time.perf_counter() - start,
            cost,
        )

    def prepare_optim(self, body: Mapping[str, Any]) -> tuple[dict[str, np.float32], np.float32]:
        """The checked ``adam_params``: the optimizer's hyperparameters and the clip norm."""
        params = body.get("adam_params", body.get("optim_params", {}))
        if not isinstance(params, Mapping):
            raise ServiceError(400, "adam_params: expected an object")
        defaults = {
            "learning_rate": 1e-4,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-12,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
        }
        unknown = set(params) - set(defaults) - {"type"}
        if unknown:
            raise ServiceError(
                400, f"adam_params: unknown fields {sorted(unknown)}; expected {sorted(defaults)}"
            )
        values = {**defaults, **params}
        values.pop("type", None)
        for k, v in values.items():
            ok = isinstance(v, int | float) and not isinstance(v, bool) and -_F32 <= v <= _F32
            if not ok or v < 0 or (k in ("beta1", "beta2") and v >= 1):
                bound = "in [0, 1)" if k in ("beta1", "beta2") else "finite, >= 0 (float32)"
                raise ServiceError(
                    400, f"adam_params.{k}: expected a number {bound}, found {_short(v)}"
                )
        hyper = {
            "learning_rate": np.float32(values["learning_rate"]),
            "b1": np.float32(values["beta1"]),
            "b2": np.float32(values["beta2"]),
            "eps": np.float32(values["eps"]),
            "weight_decay": np.float32(values["weight_decay"]),
        }
        clip = np.float32(values["grad_clip_norm"])
        return hyper, clip

    def prepare_param_diagnostics(self, kind, key, p: Prepared, body) -> Any:
        """Validates the ``param_diagnostics`` extension field (see ``.diagnostics``)."""
        field = diagnostics.FIELD
        if kind != "forward_backward" or p.forward_only:
            raise ServiceError(
                400, f"{field}: only forward_backward (not forward_only) takes it, found {kind}"
            )
        if p.loss_fn != "cross_entropy":
            raise ServiceError(
                400, f"{field}: needs {key}.loss_fn 'cross_entropy', found {p.loss_fn!r}"
            )
        try:
            return diagnostics.prepare(
                body[field], lengths=p.lengths, targets=p.targets, weights=p.inputs["weights"]
            )
        except diagnostics.DiagnosticsError as e:
            raise ServiceError(400, str(e)) from None


__all__ = ["LOSS_FNS", "Prepared", "RequestValidator"]
