"""Host terms: regularizers that run as Python on the host (I/O, solvers, libraries).

A [`HostTerm`][jaxreg.HostTerm]'s function ``fn(x, batch, data)`` gets NumPy inputs and the raw
``data`` the objective was called with, and returns ``value``, ``(value, metrics)``
or, with ``gradient=True``, ``(value, metrics, grad)`` with ``grad`` shaped like ``x``.
It may be a plain function (run in a thread pool, or a process pool with
``executor="process"``) or an ``async def`` coroutine (awaited on an event loop).

Called outside ``jax.jit``, an objective with host terms dispatches its compiled part
first, runs all host terms concurrently with it and with each other, then merges them
into one [`CompositeOutput`][jaxreg.CompositeOutput]. Inside a user's ``jax.jit`` a host term runs
through ``jax.pure_callback``; with a gradient it sits under a ``custom_vjp`` whose
forward pass computes value and gradient in one host call and keeps the gradient as
the residual.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import inspect
import itertools
import math
import multiprocessing
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxreg._src.core import gather, telemetry
from jaxreg._src.core.linalg import to_logit_space
from jaxreg._src.core.output import CompositeOutput, pack
from jaxreg._src.core.pools import LazySingleton
from jaxreg._src.core.term import Term, TermError

MAX_TIMEOUT = 300.0
"""The longest per-term timeout allowed, in seconds (the specification's limit)."""

ON_ERROR = ("raise", "skip")
EXECUTORS = ("thread", "process")


class HostTermError(TermError, RuntimeError):
    """A host term failed, timed out or returned a non-finite value; names the term."""


@dataclasses.dataclass(frozen=True)
class HostTerm(Term):
    """A term computed by Python on the host; see the module docstring.

    Args:
      name: as [`jaxreg.Term`][jaxreg.Term].
      fn: ``fn(x, batch, data)``, see above.
      weight: as [`jaxreg.Term`][jaxreg.Term] (a number; not a schedule).
      gradient: ``fn`` also returns its gradient with respect to ``x``; without it the
        term adds to ``loss_total`` and the metrics but not to ``grad``, and its output
        says ``differentiable: false``.
      timeout: seconds (at most 300) before the term counts as failed.
      on_error: ``"raise"`` (default: a [`HostTermError`][jaxreg.HostTermError] naming the term) or
        ``"skip"`` (the term is left out of the loss; its failure is recorded in the
        output's ``errors`` and its ``failed`` metric).
      executor: ``"thread"`` (default) or ``"process"`` for CPU-bound Python (``fn``
        must then be picklable, i.e. defined at module level).
      metrics: the names of the metrics ``fn`` returns. Needed only inside a user's
        ``jax.jit`` (the traced program must know its outputs in advance); there a
        metric not declared here is an error rather than silently dropped.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jaxreg as jr
      >>> def validator(x, batch, data):            # e.g. an HTTP call per datum
      ...     passed = np.mean([len(d) > 2 for d in data])
      ...     return 1.0 - float(passed), {"passed": float(passed)}
      >>> objective = jr.compose(
      ...     jr.Term("l2", lambda x, batch: jnp.sum(x**2)),
      ...     [jr.HostTerm("validator", validator, weight=0.1, timeout=5.0)],
      ... )
      >>> out = objective(jnp.ones(3), data=["abc", "de"])
      >>> m = out.to_dict()["regularizers"]["validator"]
      >>> m["value"], m["contribution"], m["custom"], m["differentiable"]
      (0.5, 0.05, {'passed': 0.5}, False)
    """

    gradient: bool = False
    timeout: float = 30.0
    on_error: str = "raise"
    executor: str = "thread"
    metrics: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.scheduled:
            raise TermError(f"HostTerm {self.name!r}: weight must be a number, not a schedule.")
        t = self.timeout
        if not isinstance(t, int | float) or not 0 < t <= MAX_TIMEOUT:
            raise TermError(
                f"HostTerm {self.name!r}: timeout must be in (0, {MAX_TIMEOUT:g}] seconds; "
                f"found {t!r}."
            )
        if self.on_error not in ON_ERROR:
            raise TermError(
                f"HostTerm {self.name!r}: on_error must be one of {ON_ERROR}; "
                f"found {self.on_error!r}."
            )
        if self.executor not in EXECUTORS:
            raise TermError(
                f"HostTerm {self.name!r}: executor must be one of {EXECUTORS}; "
                f"found {self.executor!r}."
            )
        if self.executor == "process" and inspect.iscoroutinefunction(self.fn):
            raise TermError(f"HostTerm {self.name!r}: an async fn cannot run in a process.")

    @property
    def differentiable(self) -> bool:
        return self.gradient

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    # --------------------------------------------------------------- in-jit path
    def evaluate(self, x: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The traced form: ``jax.pure_callback`` (under a ``custom_vjp`` with a gradient).

        Used when the objective is traced (inside a user's ``jax.jit``); ``data`` is
        ``None`` there. The metrics' names come from one probe call at trace time.
        """
        keys = tuple(self.metrics) + (("failed",) if self.on_error == "skip" else ())
        dtype = (
            jnp.result_type(x)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)
            else (jnp.float32)
        )
        scalar = jax.ShapeDtypeStruct((), dtype)
        metric_shapes = {k: scalar for k in keys}

        def host(x_np, batch_np):
            result = run_one(self, np.asarray(x_np), _to_numpy(batch_np), None)
            undeclared = sorted(set(result.metrics) - set(keys))
            if undeclared:
                raise HostTermError(
                    f"HostTerm {self.name!r}: returned metrics {undeclared} that are not "
                    f"declared; inside jax.jit declare them: HostTerm(..., metrics={undeclared})"
                )
            value = np.asarray(result.value if result.ok else 0.0, dtype)
            metrics = {k: np.asarray(result.metrics.get(k, np.nan), dtype) for k in keys}
            grad = np.asarray(
                result.grad if result.grad is not None else np.zeros(np.shape(x_np)), dtype
            )
            return value, metrics, grad

        if not self.gradient:
            value, metrics, _ = jax.pure_callback(
                host,
                (scalar, metric_shapes, jax.ShapeDtypeStruct(jnp.shape(x), dtype)),
                jax.lax.stop_gradient(x),
                batch,
                vmap_method="sequential",
            )
            return value, metrics

        @jax.custom_vjp
        def call(x):
            return fwd(x)[0]

        def fwd(x):
            value, metrics, grad = jax.pure_callback(
                host,
                (scalar, metric_shapes, jax.ShapeDtypeStruct(jnp.shape(x), dtype)),
                x,
                batch,
                vmap_method="sequential",
            )
            return (value, metrics), grad

        def bwd(grad, cotangent):
            ct_value, _ = cotangent
            return (ct_value * grad,)

        call.defvjp(fwd, bwd)
        return call(x)


# ------------------------------------------------------------------- host execution


@dataclasses.dataclass
class HostResult:
    """One host term's outcome."""

    name: str
    ok: bool
    value: float = math.nan
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    grad: np.ndarray | None = None
    error: str | None = None
    seconds: float = 0.0


def _to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


def _unpack(term: HostTerm, out: Any, x: np.ndarray) -> tuple[float, dict, np.ndarray | None]:
    grad = None
    if isinstance(out, tuple):
        expected = 3 if term.gradient else 2
        if len(out) not in (2, 3) or (len(out) == 3) != term.gradient:
            raise TermError(
                f"HostTerm {term.name!r}: fn must return value, (value, metrics)"
                + (" or (value, metrics, grad)" if term.gradient else "")
                + f"; found a tuple of length {len(out)} (expected {expected})."
            )
        value, metrics = out[0], out[1]
        if term.gradient:
            grad = np.asarray(out[2])
            if grad.shape != x.shape:
                raise TermError(
                    f"HostTerm {term.name!r}: grad must have x's shape {x.shape}; "
                    f"found {grad.shape}."
                )
    else:
        if term.gradient:
            raise TermError(
                f"HostTerm {term.name!r}: gradient=True, so fn must return "
                "(value, metrics, grad); found a single value."
            )
        value, metrics = out, {}
    if value is None:
        raise TermError(
            f"HostTerm {term.name!r}: fn returned None as its value; expected a number. "
            "Did the function forget a return statement?"
        )
    metrics = dict(metrics or {})
    if not isinstance(metrics, Mapping):
        raise TermError(f"HostTerm {term.name!r}: metrics must be a dict of numbers.")
    value = float(np.asarray(value))
    return value, {k: float(np.asarray(v)) for k, v in metrics.items()}, grad


def _finite_check(term: HostTerm, value: float, grad: np.ndarray | None) -> None:
    if not math.isfinite(value):
        raise HostTermError(f"HostTerm {term.name!r}: value is not finite ({value}).")
    if grad is not None and not np.all(np.isfinite(grad)):
        raise HostTermError(f"HostTerm {term.name!r}: gradient has non-finite entries.")


class HostThreads:
    """Daemon threads for threaded host terms: a hung call holds only its own thread.

    A ``ThreadPoolExecutor`` has a fixed number of threads and joins them at exit: a
    term that hangs past its timeout keeps one of them for good (enough of them, and
    a term that returns at once "times out" waiting for a free thread), and delays the
    interpreter's exit until it returns. Here every call runs on an idle thread or a
    new one; a thread that finishes goes back to the idle set, one idle for
    ``idle_s`` seconds ends, and all are daemons, so exit never waits for them.
    """

    def __init__(self, idle_s: float = 30.0):
        self.idle_s = idle_s
        self._idle: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()
        self._count = itertools.count()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(
                target=self._work,
                args=(inbox,),
                name=f"jaxreg-host-{next(self._count)}",
                daemon=True,
            ).start()
        inbox.put((future, fn, args))
        return future

    def _work(self, inbox: queue.SimpleQueue) -> None:
        while True:
            try:
                item = inbox.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:  # nobody is about to hand it work: end
                        self._idle.remove(inbox)
                        return
                continue
            if item is None:  # shutdown
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:
                    future.set_exception(e)
            del item, future, fn, args
            with self._lock:
                self._idle.append(inbox)

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        """Lets the idle threads end (busy ones are daemons: they never block exit)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)


def _start_processes() -> concurrent.futures.ProcessPoolExecutor:
    # spawn: forking a process that runs XLA threads is unsafe
    pool = concurrent.futures.ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn"))
    # Registered after concurrent.futures' own exit hook, so run before it (they run
    # last-in first-out): a hung worker is terminated instead of joined.
    threading._register_atexit(_terminate_processes)  # type: ignore[attr-defined]
    return pool


def _start_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="jaxreg-host-loop", daemon=True).start()
    return loop


_THREADS = LazySingleton(HostThreads)
_PROCESSES = LazySingleton(_start_processes)
_LOOP = LazySingleton(_start_loop)


def _threads() -> HostThreads:
    return _THREADS.get()


def _processes() -> concurrent.futures.ProcessPoolExecutor:
    return _PROCESSES.get()


def _terminate_processes() -> None:
    """Ends the process pool's workers at exit without waiting for hung host terms."""
    pool = _PROCESSES.take()
    if pool is None:
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()


def _loop() -> asyncio.AbstractEventLoop:
    """A private event loop on its own thread, for async host terms."""
    return _LOOP.get()


@atexit.register
def _shutdown() -> None:
    """Stops the pools and the event loop before the interpreter tears modules down."""
    processes, threads, loop = _PROCESSES.take(), _THREADS.take(), _LOOP.take()
    if processes is not None:
        processes.shutdown(wait=False, cancel_futures=True)
    if threads is not None:
        threads.shutdown(wait=False, cancel_futures=True)
    if loop is not None:
        loop.call_soon_threadsafe(loop.stop)


def submit(term: HostTerm, x: np.ndarray, batch: Any, data: Any) -> concurrent.futures.Future:
    """Starts a host term; returns a future of its raw return value."""
    fn: Any = term.fn  # fn(x, batch, data): three arguments, unlike a Term's
    if term.is_async:
        return asyncio.run_coroutine_threadsafe(fn(x, batch, data), _loop())
    if term.executor == "process":
        return _processes().submit(fn, x, batch, data)
    return _threads().submit(fn, x, batch, data)


def collect(
    term: HostTerm,
    future: concurrent.futures.Future,
    x: np.ndarray,
    deadline: float,
    started: float,
) -> HostResult:
    """Waits for one term (until ``deadline``) and checks what it returned."""
    try:
        out = future.result(timeout=max(0.0, deadline - time.monotonic()))
        value, metrics, grad = _unpack(term, out, x)
        _finite_check(term, value, grad)
    except concurrent.futures.TimeoutError:
        future.cancel()
        error = f"timed out after {term.timeout:g}s"
        return _failed(term, error, started)
    except TermError as e:
        return _failed(term, str(e), started, e)
    except Exception as e:  # the user's function raised
        return _failed(term, f"{type(e).__name__}: {e}", started, e)
    if term.on_error == "skip":
        metrics = {**metrics, "failed": 0.0}
    return HostResult(term.name, True, value, metrics, grad, seconds=time.monotonic() - started)


def _failed(term: HostTerm, error: str, started: float, cause: BaseException | None = None):
    if term.on_error == "raise":
        message = error if error.startswith("HostTerm") else f"HostTerm {term.name!r}: {error}"
        raise HostTermError(message) from cause
    return HostResult(
        term.name, False, math.nan, {"failed": 1.0}, None, error, time.monotonic() - started
    )


def run_one(term: HostTerm, x: np.ndarray, batch: Any, data: Any) -> HostResult:
    started = time.monotonic()
    return collect(term, submit(term, x, batch, data), x, started + term.timeout, started)


def run_all(terms: list[HostTerm], x: np.ndarray, batch: Any, data: Any) -> list[HostResult]:
    """Runs host terms concurrently; each has its own deadline from the common start."""
    started = time.monotonic()
    futures = [submit(t, x, batch, data) for t in terms]
    return [
        collect(t, f, x, started + t.timeout, started) for t, f in zip(terms, futures, strict=True)
    ]


def call_with_host_terms(
    objective: Any, x: Any, batch: Any, weights: Any, step: Any, data: Any
) -> CompositeOutput:
    """One untraced call of an objective with host terms.

    Dispatches the compiled program of the JAX terms (asynchronously), runs the host
    terms meanwhile on their pools, then merges both into one output.

    Under ``jax.distributed``, an ``x`` or ``batch`` that spans other processes' devices is
    gathered whole on every process (a collective), so each process runs its host terms
    on the global batch, as one process would, and adds their gradients to its own
    shards of ``grad``.
    """
    if weights is not None:
        objective.weight_vector(weights)  # validates names and values
    device_out = None
    if objective.device_plan is not None:
        device_out = objective.compiled(x, batch, weights, step, device_only=True)
    x_host = gather.to_host(x)
    batch_host = jax.tree.map(gather.to_host, batch)
    results = run_all(list(objective.host_terms), x_host, batch_host, data)
    host_weights = {
        t.name: float((weights or {}).get(t.name, t.weight)) for t in objective.host_terms
    }
    if telemetry.active(("jaxreg", "term", "exception")):
        for r in results:
            if not r.ok:
                telemetry.execute(
                    ("jaxreg", "term", "exception"),
                    {"duration": r.seconds},
                    {"name": r.name, "error": r.error},
                )
    return merge_host_results(objective.plan, device_out, results, host_weights, x, x_host)


def merge_host_results(
    plan: Any,
    device_out: CompositeOutput | None,
    results: list[HostResult],
    host_weights: dict[str, float],
    x: Any,
    x_host: np.ndarray | None = None,
) -> CompositeOutput:
    """One [`CompositeOutput`][jaxreg.CompositeOutput] from the compiled part and the host terms.

    Terms keep the order they were given in. A host term's contribution is
    ``weight * value`` (0 when it failed and was skipped); its gradient, if it has
    one, is added to ``grad`` with its weight; the totals and the total gradient norm
    are recomputed over everything.
    """
    by_name = {r.name: r for r in results}
    track = plan.track_grad_norms
    device_terms = {}
    if device_out is not None:  # the scalars only: grad may span other processes' devices
        scalars = gather.to_host(device_out.scalars)
        device_terms = CompositeOutput(None, scalars, layout=device_out.layout).terms
    x_host = gather.to_host(x) if x_host is None else x_host
    grad = device_out.grad if device_out is not None else jnp.zeros_like(jnp.asarray(x))
    values, weights, contributions, norms, custom, differentiable = [], [], [], [], [], []
    for term in plan.terms:
        if term.name in device_terms:
            t = device_terms[term.name]
            values.append(t.value)
            weights.append(t.weight)
            contributions.append(t.contribution)
            norms.append(t.grad_norm if track else 0.0)
            custom.append(t.custom)
            differentiable.append(True)
            continue
        r = by_name[term.name]
        w = host_weights[term.name]
        if r.grad is not None and plan.grad_space == "logits":
            r = dataclasses.replace(r, grad=np.asarray(to_logit_space(np.asarray(r.grad), x_host)))
        values.append(r.value)
        weights.append(w)
        contributions.append(w * r.value if r.ok else 0.0)
        norms.append(float(np.linalg.norm(r.grad)) if r.grad is not None else 0.0)
        custom.append(r.metrics)
        differentiable.append(term.gradient)
        if r.grad is not None and w != 0:
            grad = grad + gather.like(np.asarray(w * r.grad, jnp.result_type(grad)), grad)
    f64 = lambda v: np.asarray(v, np.float64)
    out = pack(
        names=plan.names,
        has_base=plan.has_base,
        values=f64(values),
        weights=f64(weights),
        contributions=f64(contributions),
        custom=custom,
        differentiable=tuple(differentiable),
        grad=grad,
        norms=f64(norms) if track else None,
        total_norm=float(jnp.linalg.norm(jnp.ravel(grad))) if track else None,
        grad_space=plan.grad_space,
        errors=tuple((r.name, r.error or "") for r in results if not r.ok),
        xp=np,
    )
    return dataclasses.replace(out, scalars=jnp.asarray(out.scalars.astype(np.float32)))
