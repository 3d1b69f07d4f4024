"""Telemetry events in the spirit of Erlang's ``:telemetry``.

An event is a tuple name such as ``("jaxreg", "compose", "stop")`` with a dict of
``measurements`` (numbers) and a dict of ``metadata``. Handlers are attached under an
id to one or more event names and called synchronously as
``fn(event, measurements, metadata)``. A handler that raises is detached (with a
logged warning) and never breaks training.

Events emitted by jaxreg:

* ``("jaxreg", "compose", "start")``: ``{system_time}``; metadata ``{terms}``.
* ``("jaxreg", "compose", "stop")``: ``{duration, loss_total, regularizer_total,
  total_grad_norm?}``; metadata ``{terms, n_terms}``.
* ``("jaxreg", "compose", "exception")``: ``{duration}``; metadata ``{terms, error}``.
* ``("jaxreg", "term", "stop")`` per term: ``{value, weight, contribution,
  grad_norm?}``; metadata ``{name, host, differentiable}``.
* ``("jaxreg", "term", "exception")`` per failed host term: ``{duration}``; metadata
  ``{name, error}``.
* ``("jaxreg", "remote", "request", "stop")``: ``{latency, bytes_sent,
  bytes_received, retries}``; metadata ``{endpoint, status, model_id, seq_id}``.

Emission adds no host sync to compiled code: ``compose`` events are only produced
when a handler is attached for them, from values brought to the host once per call,
and never while tracing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from jaxreg._src.core import guards
from jaxreg._src.core.errors import ConfigError

logger = logging.getLogger("jaxreg.telemetry")

Event = tuple[str, ...]
Handler = Callable[[Event, dict[str, Any], dict[str, Any]], None]

EVENTS: tuple[Event, ...] = (
    ("jaxreg", "compose", "start"),
    ("jaxreg", "compose", "stop"),
    ("jaxreg", "compose", "exception"),
    ("jaxreg", "term", "stop"),
    ("jaxreg", "term", "exception"),
    ("jaxreg", "remote", "request", "stop"),
)
"""The names of the events jaxreg emits (see the module docstring for their contents)."""

_handlers: dict[str, tuple[frozenset[Event], Handler]] = {}
_lock = threading.Lock()


def attach(handler_id: str, events: Event | Iterable[Event], fn: Handler) -> None:
    """Attaches ``fn`` to ``events`` under ``handler_id`` (unique)."""
    if isinstance(events, tuple) and events and isinstance(events[0], str):
        events = [events]
    names = frozenset(tuple(e) for e in events)
    unknown = names - set(EVENTS)
    if unknown:
        raise ConfigError(f"telemetry.attach: unknown events {sorted(unknown)}; known: {EVENTS}")
    if not callable(fn):
        raise TypeError(f"telemetry.attach: handler must be callable, found {type(fn).__name__}")
    with _lock:
        if handler_id in _handlers:
            raise ConfigError(f"telemetry.attach: handler id {handler_id!r} is already attached")
        _handlers[handler_id] = (names, fn)


def detach(handler_id: str) -> bool:
    """Detaches a handler; returns whether it was attached."""
    with _lock:
        return _handlers.pop(handler_id, None) is not None


def handlers() -> dict[str, tuple[Event, ...]]:
    """``{handler_id: events}`` of the attached handlers."""
    with _lock:
        return {k: tuple(sorted(v[0])) for k, v in _handlers.items()}


def has_handlers() -> bool:
    """Whether any handler is attached at all (the cheapest check)."""
    return bool(_handlers)


def active(*events: Event) -> bool:
    """Whether any handler listens to any of ``events`` (cheap; checked before work)."""
    if not _handlers:
        return False
    with _lock:
        return any(e in names for names, _ in _handlers.values() for e in events)


def execute(event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Calls every handler attached to ``event``; detaches those that raise."""
    with _lock:
        targets = [(hid, fn) for hid, (names, fn) in _handlers.items() if event in names]
    for hid, fn in targets:
        try:
            fn(event, measurements, metadata)
        except Exception as e:  # a broken handler must never break training
            detach(hid)
            logger.warning(
                "telemetry handler %r raised %s: %s; detached it", hid, type(e).__name__, e
            )


def now() -> float:
    return time.perf_counter()


# --------------------------------------------------------------- ready-made handlers


def attach_logger(
    handler_id: str = "jaxreg-logger", level: int = logging.INFO, events: Iterable[Event] = EVENTS
) -> str:
    """Logs every event to the ``jaxreg.telemetry`` logger at ``level``."""

    def handle(event, measurements, metadata):
        logger.log(level, "%s %s %s", "/".join(event), _compact(measurements), _compact(metadata))

    attach(handler_id, list(events), handle)
    return handler_id


class JSONLinesWriter:
    """Appends every event as one JSON line ``{"event", "measurements", "metadata",
    "time"}`` to a file; attach with [`attach`][jaxreg.telemetry.attach], stop with ``close``."""

    def __init__(
        self, path: str | Path, handler_id: str = "jaxreg-jsonl", events: Iterable[Event] = EVENTS
    ):
        self.path = Path(path)
        self.handler_id = handler_id
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        attach(handler_id, list(events), self)

    def __call__(self, event, measurements, metadata) -> None:
        line = json.dumps(
            {
                "event": "/".join(event),
                "time": time.time(),
                "measurements": measurements,
                "metadata": metadata,
            },
            default=str,
        )
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        detach(self.handler_id)
        self._file.close()

    def __enter__(self) -> JSONLinesWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _compact(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


COMPOSE_EVENTS: tuple[Event, ...] = (
    ("jaxreg", "compose", "start"),
    ("jaxreg", "compose", "stop"),
    ("jaxreg", "compose", "exception"),
    ("jaxreg", "term", "stop"),
)
"""The events one call of a composed objective may emit."""


def instrument_compose(
    call: Callable[[], Any],
    names: tuple[str, ...],
    host_terms: tuple[Any, ...] = (),
    *,
    raises_on_nonfinite: bool = False,
) -> Any:
    """Runs one untraced objective call ``call()`` with its events and finiteness check.

    Without a handler for ``COMPOSE_EVENTS`` this is ``call()`` (plus
    [`jaxreg.check_finite`][jaxreg.check_finite] when ``raises_on_nonfinite``). With one, it emits
    ``compose.start``, then ``compose.stop`` and a ``term.stop`` per term from one
    transfer of the output's scalars, or ``compose.exception`` if the call raised.
    """
    if not active(*COMPOSE_EVENTS):
        out = call()
        if raises_on_nonfinite:
            guards.check_finite(out)
        return out
    started = now()
    execute(("jaxreg", "compose", "start"), {"system_time": time.time()}, {"terms": names})
    try:
        out = call()
        d = guards.check_finite(out) if raises_on_nonfinite else out.to_dict()  # one transfer
    except Exception as e:
        execute(
            ("jaxreg", "compose", "exception"),
            {"duration": now() - started},
            {"terms": names, "error": f"{type(e).__name__}: {e}"},
        )
        raise
    _emit_compose_stop(names, {t.name for t in host_terms}, d, now() - started)
    return out


def _emit_compose_stop(names: tuple[str, ...], host: set[str], d: dict, duration: float) -> None:
    measurements = {
        "duration": duration,
        "loss_total": d["loss_total"],
        "regularizer_total": d["regularizer_total"],
    }
    if "total_grad_norm" in d:
        measurements["total_grad_norm"] = d["total_grad_norm"]
    execute(("jaxreg", "compose", "stop"), measurements, {"terms": names, "n_terms": len(names)})
    if not active(("jaxreg", "term", "stop")):
        return
    entries = dict(d["regularizers"])
    if "base_loss" in d:
        entries = {names[0]: d["base_loss"], **entries}
    for name, e in entries.items():
        m = {k: e[k] for k in ("value", "weight", "contribution", "grad_norm") if k in e}
        execute(
            ("jaxreg", "term", "stop"),
            m,
            {"name": name, "host": name in host, "differentiable": e.get("differentiable", True)},
        )
