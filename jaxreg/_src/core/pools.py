"""Process-wide objects made on first use: thread pools, process pools, event loops.

Each is made by its factory the first time ``LazySingleton.get`` asks for it (so
importing jaxreg starts no thread), then shared by every caller, whatever its thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LazySingleton(Generic[T]):
    """One object made by ``create`` on first use and shared by all threads.

    Args:
      create: makes the object; called with the lock held, so at most once until
        ``take`` detaches the object it made.

    Example:
      >>> from jaxreg._src.core.pools import LazySingleton
      >>> made = []
      >>> pool = LazySingleton(lambda: made.append("pool") or len(made))
      >>> pool.get(), pool.get(), made
      (1, 1, ['pool'])
      >>> pool.take(), pool.take(), pool.get()
      (1, None, 2)
    """

    def __init__(self, create: Callable[[], T]):
        self._create = create
        self._lock = threading.Lock()
        self._value: T | None = None

    def get(self) -> T:
        """The object, made now if there is none yet."""
        with self._lock:
            if self._value is None:
                self._value = self._create()
            return self._value

    def take(self) -> T | None:
        """Detaches the object (``None`` if none was made) and returns it, for shutting it
        down; a later ``get`` makes a new one."""
        with self._lock:
            value, self._value = self._value, None
        return value
