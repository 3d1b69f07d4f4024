"""The service's model runtime: validation, ordered execution and the compiled steps.

``Engine`` holds the models, checks every request completely *before* it is
queued (so a rejected request changes nothing), orders each model's requests by
``seq_id`` (``jaxreg.service.ordering``), deduplicates retries, and runs the work
on a few threads, one model's requests at a time and within a memory budget
(``jaxreg.service.scheduler``, ``jaxreg.service.limits``). Results are
``concurrent.futures.Future`` objects keyed by request id. The HTTP layer
(``jaxreg.service.app``) is a thin shell over it.

A request whose loss or gradient is not finite fails (``request_failed``) and changes
nothing: the compiled steps accumulate a gradient, or apply an update, only when every
value is finite.

Padded shapes are bucketed (batch and length to powers of two), and the optimizer's
hyperparameters are traced, so a stream of requests with random lengths and learning
rates compiles a bounded number of programs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreg._src.remote.wire import (
    ENCODINGS,
    Datum,
    Encoding,
    WireError,
    datum_from_json,
    encode_tensor,
)
from jaxreg.service import checkpoint, diagnostics
from jaxreg.service import lora as lora_lib
from jaxreg.service import losses as service_losses
from jaxreg.service import model as model_lib
from jaxreg.service.limits import MAX_SEQ_ID, Limits, mib, work_bytes
from jaxreg.service.ordering import OrderError, Sequencer
from jaxreg.service.scheduler import Scheduler

BASE_MODEL = "jaxreg-base"
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
_DECAY_MASK = lora_lib.decay_mask  # a LoRA model's frozen base gets no weight decay
LOSS_CONFIG = service_losses.DEFAULTS  # loss_fn_config options and defaults, per loss
_STATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used with fullmatch
_KEEP_RESULTS = 4096
_F32 = float(np.finfo(np.float32).max)
# Extensions to Tinker's API that this service implements (GET /api/v1/capabilities).
EXTENSIONS = (diagnostics.EXTENSION,)


def remember(
    results: OrderedDict[str, concurrent.futures.Future],
    rid: str,
    fut: concurrent.futures.Future,
    keep: int = _KEEP_RESULTS,
) -> None:
    """Records a request's future, forgetting the oldest finished ones beyond ``keep``."""
    results[rid] = fut
    while len(results) > keep:
        old, f = next(iter(results.items()))
        if not f.done():
            break
        del results[old]


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, category: str = "user"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.category = category


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class _Model:
    model_id: str
    params: Any
    opt_state: Any
    grad_acc: Any
    seq: Sequencer
    n_accumulated: int = 0
    step: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    in_flight: int = 0  # released to the scheduler, not finished
    deleted: bool = False

    def state_tree(self) -> dict[str, Any]:
        """What a checkpoint holds of the model's arrays (both front doors save this)."""
        return {"params": self.params, "opt_state": self.opt_state, "grad_acc": self.grad_acc}

    def read_state(self, file: Path, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A saved ``state_tree`` shaped like this model's (device arrays) and its
        metadata; ``ServiceError`` 400 naming ``what`` when it does not fit."""
        try:
            tree, meta = checkpoint.load_tree(file, like=self.state_tree())
        except ValueError as e:
            raise ServiceError(400, f"path: {what} does not fit this model: {e}") from None
        return jax.tree.map(jnp.asarray, tree), meta


@dataclasses.dataclass(frozen=True)
class _Prepared:
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


class Engine:
    """Models, request validation, ordered execution and the compiled training steps.

    Args:
      state_dir: where ``save_state`` writes (``<state_dir>/<name>.npz``). Temporary
        files left there by an interrupted save are removed at start.
      max_tokens: the most token-targets one request may carry (overrides
        ``limits.max_tokens``).
      checkpoint_path: the base checkpoint (built on first use when missing).
      limits: every other bound (``Limits``).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike = "jaxreg-states",
        *,
        max_tokens: int | None = None,
        checkpoint_path: str | os.PathLike = checkpoint.BASE_PATH,
        limits: Limits | None = None,
    ):
        limits = limits or Limits()
        if max_tokens is not None:
            limits = dataclasses.replace(limits, max_tokens=max_tokens)
        self.limits = limits
        self.config, self._base_params = checkpoint.load_base_checkpoint(checkpoint_path)
        self.state_dir = Path(state_dir)
        self.removed_temporaries = checkpoint.remove_stale_temporaries(self.state_dir)
        self.max_tokens = limits.max_tokens
        self._models: dict[str, _Model] = {}
        self._results: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self._traces: collections.Counter[str] = collections.Counter()
        self._optimizer = optax.inject_hyperparams(optax.adamw)(
            learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0, mask=_DECAY_MASK
        )
        self._compile()
        self._scheduler = Scheduler(limits.workers, limits.memory_bytes)
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="jaxreg-reaper", daemon=True)
        self._reaper.start()

    # ----------------------------------------------------------------- compiled steps
    def _compile(self) -> None:
        cfg = self.config
        traces = self._traces

        def loss_and_logprobs(params, tokens, targets, mask, inputs, loss_fn):
            lp = model_lib.token_logprobs(cfg, lora_lib.merged(params), tokens, targets)
            m = mask if lp.ndim == 2 else mask[..., None]
            if loss_fn == "cross_entropy":
                loss = -jnp.sum(inputs["weights"] * lp * m)
            elif loss_fn in LOSS_CONFIG:  # ppo, cispo, dro, ...: see jaxreg.service.losses
                loss = service_losses.policy_loss(loss_fn, lp, inputs, m)
            else:
                ratio = jnp.exp(jnp.where(m > 0, lp - inputs["logprobs"], 0.0))
                loss = -jnp.sum(ratio * inputs["advantages"] * m)
            return loss, lp

        @functools.partial(jax.jit, static_argnames="loss_fn")
        def forward(params, tokens, targets, mask, inputs, loss_fn):
            traces["forward"] += 1
            return loss_and_logprobs(params, tokens, targets, mask, inputs, loss_fn)

        @functools.partial(jax.jit, static_argnames="loss_fn", donate_argnames="grad_acc")
        def forward_backward(params, grad_acc, tokens, targets, mask, inputs, loss_fn):
            traces["forward_backward"] += 1
            (loss, lp), grads = jax.value_and_grad(loss_and_logprobs, has_aux=True)(
                params, tokens, targets, mask, inputs, loss_fn
            )
            # Accumulate only a finite gradient (and loss): a non-finite one fails the
            # request and must leave the accumulated gradient exactly as it was.
            grad_ok = _all_finite(grads)
            ok = grad_ok & jnp.isfinite(loss)
            acc = jax.tree.map(lambda a, g: jnp.where(ok, a + g, a), grad_acc, grads)
            return loss, lp, acc, grad_ok

        optimizer = self._optimizer

        @functools.partial(jax.jit, donate_argnames=("params", "opt_state", "grad_acc"))
        def optim_step(params, opt_state, grad_acc, hyper, clip):
            traces["optim_step"] += 1
            # optax mixes the int step count with traced float betas: fine under the
            # standard promotion rules, refused under "strict" (which users may set).
            with jax.numpy_dtype_promotion("standard"):
                return _optim_step(params, opt_state, grad_acc, hyper, clip)

        def _optim_step(params, opt_state, grad_acc, hyper, clip):
            norm = optax.tree.norm(grad_acc)
            scale = jnp.where((clip > 0) & (norm > clip), clip / norm, 1.0)
            grads = jax.tree.map(lambda g: g * scale, grad_acc)
            old_state = opt_state
            opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **hyper})
            updates, new_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            # An update that overflows (e.g. a huge learning rate) is not applied: the
            # step fails and the model, its optimizer state and gradient stay as they were.
            ok = jnp.isfinite(norm) & _all_finite(new_params) & _all_finite(new_state)
            keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
            zeros = jax.tree.map(jnp.zeros_like, grad_acc)
            return (
                keep(new_params, params),
                keep(new_state, old_state),
                keep(zeros, grad_acc),
                norm,
                ok,
            )

        self._forward, self._forward_backward, self._optim_step = (
            forward,
            forward_backward,
            optim_step,
        )
        self._forward_backward_diag = diagnostics.make_step(cfg, traces)

    def trace_counts(self) -> dict[str, int]:
        """How many times each compiled step was traced (for no-recompile checks)."""
        return dict(self._traces)

    # ----------------------------------------------------------------- submission
    def _model(self, model_id: Any) -> _Model:
        m = self._models.get(model_id) if isinstance(model_id, str) else None
        if m is None:
            raise ServiceError(404, f"model_id: unknown model {_short(model_id)}")
        return m

    def _new_future(self) -> tuple[str, concurrent.futures.Future]:
        rid = uuid.uuid4().hex
        fut: concurrent.futures.Future = concurrent.futures.Future()
        remember(self._results, rid, fut)
        return rid, fut

    def create_model(self, body: Mapping[str, Any]) -> str:
        """Creates a model from the base checkpoint; returns the request id.

        Raises:
          ServiceError: 409 when the service already holds ``limits.max_models``.
        """
        base = body.get("base_model", BASE_MODEL)
        if base not in (BASE_MODEL, "jaxreg/base"):  # the org/model name (service.tokenizer)
            raise ServiceError(400, f"base_model: expected {BASE_MODEL!r}, found {_short(base)}")
        with self._lock:
            self._check_capacity()
            rid, fut = self._new_future()
            model_id = f"model-{uuid.uuid4().hex[:12]}"
            self._new_model(model_id)
            fut.set_result({"type": "create_model", "model_id": model_id})
        return rid

    def _check_capacity(self) -> None:
        """Raises 409 when the service holds ``limits.max_models`` (the lock is held)."""
        if len(self._models) >= self.limits.max_models:
            ttl = self.limits.model_ttl_s
            raise ServiceError(
                409,
                f"create_model: the service holds its maximum of {self.limits.max_models} "
                "models; delete one (delete_model)"
                + (f" or wait for an idle one to expire ({ttl:g}s)" if ttl else ""),
            )

    def _new_model(self, model_id: str, params: Any = None, first_seq: int = 0) -> _Model:
        """Registers a fresh model (the lock is held): a private copy of ``params``."""
        params = jax.tree.map(jnp.array, self._base_params if params is None else params)
        m = _Model(
            model_id,
            params,
            self._optimizer.init(params),
            jax.tree.map(jnp.zeros_like, params),
            Sequencer(
                max_ahead=self.limits.max_seq_ahead,
                remember=self.limits.remember_seqs,
                first=first_seq,
            ),
        )
        self._models[model_id] = m
        return m

    def delete_model(self, model_id: Any) -> dict[str, Any]:
        """Deletes a model and frees its memory.

        Requests already running or queued finish; those still waiting for a
        predecessor fail. Later requests naming the model get 404.
        """
        with self._lock:
            m = self._model(model_id)
            failures = self._drop(m, f"model {m.model_id} was deleted")
        for f in failures:
            f()
        return {"type": "delete_model", "model_id": m.model_id}

    def _drop(self, m: _Model, reason: str) -> list[Callable[[], None]]:
        """Removes ``m`` (the lock is held); returns the failures of its waiting requests."""
        del self._models[m.model_id]
        m.deleted = True
        return m.seq.drop_all(reason)

    def n_models(self) -> int:
        """How many models the service holds."""
        return len(self._models)

    def info(self, model_id: Any) -> dict[str, Any]:
        m = self._model(model_id)
        m.last_used = time.monotonic()
        return {
            "type": "get_info",
            "model_id": m.model_id,
            "model_data": {
                "model_name": BASE_MODEL,
                "arch": "decoder-only transformer",
                **self.config.to_dict(),
                "num_params": model_lib.num_params(m.params),
            },
            "step": m.step,
        }

    def submit(self, kind: str, body: Mapping[str, Any]) -> str:
        """Validates a request, queues it in its model's ``seq_id`` order; returns its id.

        A ``seq_id`` seen before returns the first request's id (a retry is never run
        twice); reusing it for another kind of request is a 409. A request that fails
        validation raises ``ServiceError`` and neither runs nor uses up its
        ``seq_id``. See ``jaxreg.service.ordering`` for the ``seq_id`` rules.
        """
        m = self._model(body.get("model_id"))
        seq = body.get("seq_id")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
            raise ServiceError(
                400, f"seq_id: expected a non-negative int or null, found {_short(seq)}"
            )
        if seq is not None and seq > MAX_SEQ_ID:
            raise ServiceError(400, f"seq_id: expected at most 2**53 - 1, found {_short(seq, 40)}")
        with self._lock:
            m.last_used = time.monotonic()
            if seq is not None:
                known = self._known(m, seq, kind)
                if known is not None:
                    return known
        job, cost = self._prepare(kind, m, body)  # validation (raises before anything changes)
        with self._lock:
            if m.deleted:
                raise ServiceError(404, f"model_id: unknown model {m.model_id!r} (deleted)")
            if seq is not None:
                known = self._known(m, seq, kind)  # a concurrent retry may have won the race
                if known is not None:
                    return known
            else:
                seq = m.seq.next_free()
            rid, fut = self._new_future()

            def release() -> None:
                m.in_flight += 1
                self._scheduler.put(m.model_id, lambda: self._run_job(m, job, fut), cost)

            def fail(message: str) -> None:
                _fail(fut, message, "user")

            due = m.seq.add(seq, kind, rid, release=release, fail=fail)
            for r in due:  # under the lock: lane order must follow seq_id order
                r()
        return rid

    def refuse_seq(self, model_id: Any, seq: Any, kind: str, message: str) -> None:
        """Uses up ``seq`` of a request refused before it was queued (the tinker front door).

        The tinker SDK numbers requests itself and never resends a number, so a refused
        request's ``seq_id`` must count as used or every later request would wait for
        it. The ``seq_id`` is held as a failed request of ``kind`` (a retry of it gets
        the refusal again) and the requests behind it are released. A ``seq_id`` that is
        already held, out of range, or of an unknown model is left alone.
        """
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            return
        with self._lock:
            m = self._models.get(model_id) if isinstance(model_id, str) else None
            if m is None or m.deleted:
                return
            try:
                if m.seq.known(seq, kind) is not None:
                    return
            except OrderError:
                return
            rid, fut = self._new_future()
            _fail(fut, message, "user")
            due = m.seq.add(seq, kind, rid, release=_noop, fail=lambda _msg: None)
            for r in due:
                r()

    def add_model(self, model_id: str, *, first_seq: int = 0, params: Any = None) -> _Model:
        """Registers a model under ``model_id`` whose first request has ``seq_id`` ``first_seq``.

        Used by the tinker front door (the SDK numbers a model's requests from 1). An
        existing model of that id is returned unchanged (a retried creation).

        Raises:
          ServiceError: 409 when the service already holds ``limits.max_models``.
        """
        with self._lock:
            m = self._models.get(model_id)
            if m is None:
                self._check_capacity()
                m = self._new_model(model_id, params, first_seq)
            return m

    def submit_job(
        self, model_id: str, seq_id: int | None, job: Callable[[], dict], cost: int = 0
    ) -> str:
        """Queues ``job`` (run on a worker) in the model's ``seq_id`` order.

        ``cost``: its estimated activation memory in bytes, for the scheduler's budget.
        """
        body = {"model_id": model_id, "seq_id": seq_id, "_job": job, "_cost": cost}
        return self.submit("_job", body)

    def _known(self, m: _Model, seq: int, kind: str) -> str | None:
        try:
            return m.seq.known(seq, kind)
        except OrderError as e:
            raise ServiceError(e.status, e.message) from None

    def result(self, request_id: Any) -> concurrent.futures.Future:
        fut = self._results.get(request_id) if isinstance(request_id, str) else None
        if fut is None:
            raise ServiceError(
                404,
                f"request_id: unknown request {_short(request_id)} (never submitted, "
                "forgotten, or the service restarted since)",
            )
        return fut

    # ----------------------------------------------------------------- housekeeping
    def _reap(self) -> None:
        """Fails requests waiting too long for a predecessor; deletes idle models."""
        limits = self.limits
        period = min(1.0, limits.seq_wait_s / 4, (limits.model_ttl_s or 60.0) / 4)
        while not self._closed.wait(period):
            self.reap()

    def reap(self, now: float | None = None) -> None:
        """One pass of the housekeeping (run every second by a background thread)."""
        now = time.monotonic() if now is None else now
        ttl = self.limits.model_ttl_s
        due: list[Callable[[], None]] = []
        with self._lock:
            for m in list(self._models.values()):
                due += m.seq.expire(self.limits.seq_wait_s, now)
                idle = m.in_flight == 0 and m.seq.n_waiting == 0
                if ttl is not None and idle and now - m.last_used > ttl:
                    due += self._drop(m, f"model {m.model_id} expired (idle for {ttl:g}s)")
        for f in due:
            f()

    # ----------------------------------------------------------------- validation
    def _prepare(
        self, kind: str, m: _Model, body: Mapping[str, Any]
    ) -> tuple[Callable[[], dict], int]:
        """Validates a request; returns its job and its memory estimate in bytes."""
        if kind in ("forward", "forward_backward"):
            key = "forward_input" if kind == "forward" else "forward_backward_input"
            forward_only = body.get("forward_only", False)
            if not isinstance(forward_only, bool):
                raise ServiceError(
                    400, f"forward_only: expected true or false, found {_short(forward_only)}"
                )
            forward_only = forward_only or kind == "forward"
            p = self._prepare_data(body.get(key), key, forward_only, body)
            if body.get(diagnostics.FIELD) is not None:
                diag = self._prepare_param_diagnostics(kind, key, p, body)
                # One more backward pass per term in the same program.
                return (lambda: self._run_param_diagnostics(m, p, diag)), 2 * p.cost
            return (lambda: self._run_forward_backward(m, p)), p.cost
        if kind == "optim_step":
            return self._prepare_optim(m, body), 0
        if kind in ("save_state", "load_state"):
            name = body.get("path", body.get("name"))
            if isinstance(name, str) and name.startswith("jaxreg://"):
                name = name.removeprefix("jaxreg://")
            if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
                raise ServiceError(
                    400,
                    "path: expected a name of letters, digits, '_', '.', '-' "
                    f"(at most 128 characters), found {_short(name)}",
                )
            run = self._save if kind == "save_state" else self._load
            return (lambda: run(m, name)), 0
        if kind == "skip_seq":  # releases a reserved seq_id whose request will never come
            return (lambda: {"type": "skip_seq"}), 0
        if kind == "_job":  # a job prepared by another front door (submit_job)
            return body["_job"], body.get("_cost", 0)
        raise ServiceError(404, f"unknown request kind {_short(kind)}")

    def _prepare_data(self, fb_input, key, forward_only, body) -> _Prepared:
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
        return _Prepared(
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

    def _prepare_optim(self, m: _Model, body: Mapping[str, Any]) -> Callable[[], dict]:
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
        return lambda: self._run_optim(m, hyper, clip)

    # ----------------------------------------------------------------- execution
    def _run_job(self, m: _Model, job: Callable[[], dict], fut) -> None:
        """Runs one released request on a scheduler thread and sets its result."""
        try:
            if m.deleted:
                raise ServiceError(404, f"model {m.model_id} was deleted", "user")
            fut.set_result(job())
        except ServiceError as e:
            _fail(fut, e.message, e.category)
        except Exception as e:  # a bug or resource failure: report it, keep serving
            _fail(fut, f"{type(e).__name__}: {e}", "server")
        finally:
            with self._lock:
                m.in_flight -= 1
                m.last_used = time.monotonic()

    def close(self) -> None:
        """Finishes the queued work and stops the worker threads."""
        self._closed.set()
        self._scheduler.close()
        self._reaper.join()

    def _run_forward_backward(self, m: _Model, p: _Prepared) -> dict[str, Any]:
        start = time.perf_counter()
        if p.forward_only:
            loss, lp = self._forward(m.params, p.tokens, p.targets, p.mask, p.inputs, p.loss_fn)
        else:
            loss, lp, m.grad_acc, grad_ok = self._forward_backward(
                m.params, m.grad_acc, p.tokens, p.targets, p.mask, p.inputs, p.loss_fn
            )
            if not bool(grad_ok):
                raise ServiceError(
                    422,
                    "forward_backward: the gradient is not finite (loss "
                    f"{float(loss)}); nothing was accumulated, the model is unchanged. "
                    "Check the weights/advantages for huge values",
                )
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise ServiceError(
                422,
                f"{'forward' if p.forward_only else 'forward_backward'}: the loss is not "
                f"finite ({loss_value}); nothing was accumulated, the model is unchanged. "
                "Check the weights/advantages/logprobs for huge values",
            )
        if not p.forward_only:
            m.n_accumulated += 1
        lp = np.asarray(lp)
        compute = time.perf_counter() - start
        start = time.perf_counter()
        outputs = [
            {"logprobs": encode_tensor(lp[i, :n], p.encoding)} for i, n in enumerate(p.lengths)
        ]
        metrics = {"loss:sum": loss_value, "tokens:sum": float(sum(p.lengths))}
        return {
            "type": "forward" if p.forward_only else "forward_backward",
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": outputs,
            "metrics": metrics,
            "timing": {
                "decode_s": p.decode_s,
                "compute_s": compute,
                "encode_s": time.perf_counter() - start,
            },
        }

    def capabilities(self) -> dict[str, Any]:
        """The extensions to Tinker's API this service implements."""
        return {"extensions": list(EXTENSIONS)}

    def _prepare_param_diagnostics(self, kind, key, p: _Prepared, body) -> Any:
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

    def _run_param_diagnostics(self, m: _Model, p: _Prepared, diag) -> dict[str, Any]:
        """``forward_backward`` that also measures each term's parameter gradient."""
        start = time.perf_counter()
        loss, lp, m.grad_acc, gram, total, ok = self._forward_backward_diag(
            m.params,
            m.grad_acc,
            p.tokens,
            p.targets,
            p.mask,
            p.inputs["weights"],
            diag.term_weights,
            diag.loss_weights,
            np.int32(len(diag.term_names)),
        )
        if not bool(ok):
            raise ServiceError(
                422,
                "forward_backward: the loss, a term's gradient or their Gramian is not "
                f"finite (loss {float(loss)}); nothing was accumulated, the model is "
                "unchanged. Check the weights for huge values",
            )
        m.n_accumulated += 1
        lp, gram, total = jax.device_get((lp, gram, total))
        compute = time.perf_counter() - start
        start = time.perf_counter()
        outputs = [
            {"logprobs": encode_tensor(lp[i, :n], p.encoding)} for i, n in enumerate(p.lengths)
        ]
        return {
            "type": "forward_backward",
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": outputs,
            "metrics": {"loss:sum": float(loss), "tokens:sum": float(sum(p.lengths))},
            diagnostics.FIELD: diagnostics.result_field(diag, gram, total),
            "timing": {
                "decode_s": p.decode_s,
                "compute_s": compute,
                "encode_s": time.perf_counter() - start,
            },
        }

    def _run_optim(self, m: _Model, hyper, clip) -> dict[str, Any]:
        m.params, m.opt_state, m.grad_acc, norm, ok = self._optim_step(
            m.params, m.opt_state, m.grad_acc, hyper, clip
        )
        if not bool(ok):
            raise ServiceError(
                422,
                f"optim_step: the update is not finite (gradient norm {float(norm)}); it "
                "was not applied and the model, its optimizer state and accumulated "
                "gradient are unchanged. Lower the learning rate",
            )
        n, m.n_accumulated = m.n_accumulated, 0
        m.step += 1
        return {
            "type": "optim_step",
            "metrics": {"grad_norm": float(norm), "step": m.step, "accumulated": n},
        }

    def _state_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.npz"

    def _save(self, m: _Model, name: str) -> dict[str, Any]:
        tree = m.state_tree()
        meta = {"step": m.step, "n_accumulated": m.n_accumulated, "config": self.config.to_dict()}
        checkpoint.save_tree(self._state_path(name), tree, meta)
        return {"type": "save_state", "path": f"jaxreg://{name}", "step": m.step}

    def _load(self, m: _Model, name: str) -> dict[str, Any]:
        path = self._state_path(name)
        if not path.exists():
            raise ServiceError(404, f"path: no saved state named {name!r}")
        tree, meta = m.read_state(path, f"state {name!r}")
        m.params, m.opt_state, m.grad_acc = tree["params"], tree["opt_state"], tree["grad_acc"]
        m.step, m.n_accumulated = meta["step"], meta["n_accumulated"]
        return {"type": "load_state", "path": f"jaxreg://{name}", "step": m.step}


def _short(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages (safe on huge ints and deep nesting)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _noop() -> None:
    return None


def _fail(fut: concurrent.futures.Future, message: str, category: str) -> None:
    """Ends ``fut`` with a ``request_failed`` result (unless it already has one)."""
    if not fut.done():
        fut.set_result({"type": "request_failed", "error": message, "category": category})


def _all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every array of ``tree`` is finite (one traced bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def dumps(obj: Any) -> bytes:
    """Compact JSON (no spaces; NaN is refused rather than sent as invalid JSON)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
