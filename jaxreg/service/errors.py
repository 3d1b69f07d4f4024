"""The service's refusals: ``ServiceError`` and the bounded ``repr`` its messages use.

A request the service refuses raises ``ServiceError`` with the HTTP status to answer;
both front doors (``jaxreg.service.app``, ``jaxreg.service.tinker_api``) turn it into a
4xx/5xx response, and a refusal before a request is queued changes nothing.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, category: str = "user"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.category = category


def short(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages (safe on huge ints and deep nesting)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["ServiceError", "short"]
