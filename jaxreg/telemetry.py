"""Telemetry: ``attach(handler_id, events, fn)`` / ``detach``, and the events jaxreg emits."""

from jaxreg._src.core.telemetry import EVENTS as EVENTS
from jaxreg._src.core.telemetry import JSONLinesWriter as JSONLinesWriter
from jaxreg._src.core.telemetry import attach as attach
from jaxreg._src.core.telemetry import attach_logger as attach_logger
from jaxreg._src.core.telemetry import detach as detach
from jaxreg._src.core.telemetry import execute as execute
from jaxreg._src.core.telemetry import handlers as handlers

__all__ = [
    "EVENTS",
    "JSONLinesWriter",
    "attach",
    "attach_logger",
    "detach",
    "execute",
    "handlers",
]
