"""The service's model runtime: the models and their requests, in order.

``Engine`` holds the models (``ModelState``), checks every request completely *before*
it is queued (``jaxreg.service.validation``; a rejected request changes nothing),
orders each model's requests by ``seq_id`` (``jaxreg.service.ordering``), deduplicates
retries, and runs the work on a few threads, one model's requests at a time and within
a memory budget (``jaxreg.service.scheduler``, ``jaxreg.service.limits``). Results are
``concurrent.futures.Future`` objects keyed by request id (``jaxreg.service.results``).
The HTTP layers (``jaxreg.service.app``, ``jaxreg.service.tinker_api``) are thin shells
over it.

Where the rest lives: the compiled steps in ``jaxreg.service.steps``, named states
(``save_state``/``load_state``) in ``jaxreg.service.states``, refusals in
``jaxreg.service.errors``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxreg.service import checkpoint, diagnostics
from jaxreg.service import model as model_lib
from jaxreg.service.errors import ServiceError
from jaxreg.service.errors import short as _short
from jaxreg.service.limits import MAX_SEQ_ID, Limits
from jaxreg.service.model_state import ModelState
from jaxreg.service.ordering import OrderError, Sequencer
from jaxreg.service.results import fail as _fail
from jaxreg.service.results import remember
from jaxreg.service.scheduler import Scheduler
from jaxreg.service.states import STATE_NAME, StateStore
from jaxreg.service.steps import Steps, adamw
from jaxreg.service.validation import RequestValidator

BASE_MODEL = "jaxreg-base"
# Extensions to Tinker's API that this service implements (GET /api/v1/capabilities).
EXTENSIONS = (diagnostics.EXTENSION,)


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
        self._models: dict[str, ModelState] = {}
        self._results: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self._optimizer = adamw()
        self._steps = Steps(self.config, self._optimizer)
        self._validator = RequestValidator(self.config, limits)
        self._states = StateStore(self.state_dir, self.config)
        self._scheduler = Scheduler(limits.workers, limits.memory_bytes)
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="jaxreg-reaper", daemon=True)
        self._reaper.start()

    def trace_counts(self) -> dict[str, int]:
        """How many times each compiled step was traced (for no-recompile checks)."""
        return self._steps.trace_counts()

    # ----------------------------------------------------------------- submission
    def _model(self, model_id: Any) -> ModelState:
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

    def _new_model(self, model_id: str, params: Any = None, first_seq: int = 0) -> ModelState:
        """Registers a fresh model (the lock is held): a private copy of ``params``."""
        params = jax.tree.map(jnp.array, self._base_params if params is None else params)
        m = ModelState(
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

    def _drop(self, m: ModelState, reason: str) -> list[Callable[[], None]]:
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

    def add_model(self, model_id: str, *, first_seq: int = 0, params: Any = None) -> ModelState:
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

    def _known(self, m: ModelState, seq: int, kind: str) -> str | None:
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
        self, kind: str, m: ModelState, body: Mapping[str, Any]
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
            p = self._validator.prepare_data(body.get(key), key, forward_only, body)
            if body.get(diagnostics.FIELD) is not None:
                diag = self._validator.prepare_param_diagnostics(kind, key, p, body)
                # One more backward pass per term in the same program.
                return (lambda: self._steps.run_param_diagnostics(m, p, diag)), 2 * p.cost
            return (lambda: self._steps.run_forward_backward(m, p)), p.cost
        if kind == "optim_step":
            hyper, clip = self._validator.prepare_optim(body)
            return (lambda: self._steps.run_optim(m, hyper, clip)), 0
        if kind in ("save_state", "load_state"):
            name = body.get("path", body.get("name"))
            if isinstance(name, str) and name.startswith("jaxreg://"):
                name = name.removeprefix("jaxreg://")
            if not isinstance(name, str) or not STATE_NAME.fullmatch(name):
                raise ServiceError(
                    400,
                    "path: expected a name of letters, digits, '_', '.', '-' "
                    f"(at most 128 characters), found {_short(name)}",
                )
            run = self._states.save if kind == "save_state" else self._states.load
            return (lambda: run(m, name)), 0
        if kind == "skip_seq":  # releases a reserved seq_id whose request will never come
            return (lambda: {"type": "skip_seq"}), 0
        if kind == "_job":  # a job prepared by another front door (submit_job)
            return body["_job"], body.get("_cost", 0)
        raise ServiceError(404, f"unknown request kind {_short(kind)}")

    # ----------------------------------------------------------------- execution
    def _run_job(self, m: ModelState, job: Callable[[], dict], fut) -> None:
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

    def capabilities(self) -> dict[str, Any]:
        """The extensions to Tinker's API this service implements."""
        return {"extensions": list(EXTENSIONS)}


def _noop() -> None:
    return None


__all__ = ["BASE_MODEL", "EXTENSIONS", "Engine"]
