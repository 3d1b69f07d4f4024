"""The exception hierarchy: every error jaxreg raises on purpose is a ``JaxregError``."""

from __future__ import annotations

__all__ = ["ConfigError", "InputError", "JaxregError", "NotComputedError", "TermError"]


class JaxregError(Exception):
    """Base class of the errors jaxreg raises on purpose.

    Catch it to handle any of them; each subclass also derives from the built-in
    exception that fits it (``ValueError``, ``RuntimeError``, ...), so existing
    ``except ValueError`` handlers keep working.

    Example:
      >>> import jaxreg as jr
      >>> try:
      ...     jr.Term("", lambda x, b: x)
      ... except jr.JaxregError as e:
      ...     print(type(e).__name__)
      TermError
    """


class TermError(JaxregError, ValueError):
    """A term, or what its function returned, is not valid.

    The message always names the term, the field, what was expected and what was found.
    """


class InputError(JaxregError, ValueError):
    """A term function was given inputs it cannot use.

    Raised by the built-in terms (and usable by users' own); [`Term`][jaxreg.Term] re-raises it as
    a [`TermError`][jaxreg.TermError] prefixed with the term's name.
    """


class NotComputedError(JaxregError, AttributeError):
    """A quantity of a [`CompositeOutput`][jaxreg.CompositeOutput] was read that was not computed.

    The message names the flag of [`compose`][jaxreg.compose] that computes it (for
    example ``track_grad_norms=True`` for ``grad_norm``). It is an ``AttributeError``,
    so ``getattr(out, "grad_cosines", None)`` still returns ``None``.
    """


class ConfigError(JaxregError, ValueError):
    """An option given to a jaxreg constructor or function is out of its range.

    For example an aggregator's ``iterations`` or ``c``, a telemetry event name, a
    retry policy's bounds. The message names the option, the expected and the found
    value.
    """
