"""Telemetry: ``attach(handler_id, events, fn)`` / ``detach``; see :mod:`jaxreg._src.telemetry`."""

from jaxreg._src.telemetry import EVENTS as EVENTS
from jaxreg._src.telemetry import JSONLinesWriter as JSONLinesWriter
from jaxreg._src.telemetry import attach as attach
from jaxreg._src.telemetry import attach_logger as attach_logger
from jaxreg._src.telemetry import detach as detach
from jaxreg._src.telemetry import execute as execute
from jaxreg._src.telemetry import handlers as handlers
