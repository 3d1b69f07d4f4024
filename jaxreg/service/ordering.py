"""The ``seq_id`` order of one model's requests: bounded, deduplicated, never stuck.

A ``Sequencer`` releases requests in ``seq_id`` order whatever order they arrive
in. Its rules:

* a ``seq_id`` lies in ``[next, next + max_ahead]`` (``next``: the first one not yet
  released) and never above ``MAX_SEQ_ID``;
* a ``seq_id`` seen before answers with the first request's id (a retry never runs
  twice), but only for the same kind of request: ``optim_step`` on the ``seq_id`` of a
  ``forward_backward`` is a 409;
* a request without a ``seq_id`` goes after every request known so far;
* a request waiting for a predecessor longer than ``wait_s`` fails, naming the missing
  ``seq_id`` s; its own ``seq_id`` then counts as used, so the model moves on once the
  gap is filled or released (``skip_seq``).

The caller holds a lock around every method; the callables returned (releases and
failures) are to be run after it is released.

Example:
  >>> s = Sequencer(max_ahead=8, remember=64)
  >>> s.add(1, "forward", "r1", release=lambda: print("r1"), fail=print)
  []
  >>> [f() for f in s.add(0, "forward", "r0", release=lambda: print("r0"), fail=print)]
  r0
  r1
  [None, None]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable

from jaxreg.service.limits import MAX_SEQ_ID


class OrderError(Exception):
    """A ``seq_id`` the sequencer refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass
class _Waiting:
    kind: str
    request_id: str
    release: Callable[[], None]
    fail: Callable[[str], None]
    since: float
    expired: bool = False


class Sequencer:
    """Releases one model's requests in ``seq_id`` order (see the module docstring).

    Args:
      max_ahead: how far past the next expected ``seq_id`` a request may be.
      remember: how many released ``seq_id`` s are kept to answer retries.
      first: the first ``seq_id`` expected.
    """

    def __init__(self, *, max_ahead: int, remember: int, first: int = 0):
        self.next_seq = first
        self.max_ahead, self.remember = max_ahead, remember
        self._seen: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()
        self._waiting: dict[int, _Waiting] = {}

    @property
    def n_waiting(self) -> int:
        """How many requests wait for a predecessor."""
        return len(self._waiting)

    def known(self, seq: int, kind: str) -> str | None:
        """The request id already holding ``seq``, or ``None`` if it is free.

        Raises:
          OrderError: 409 if ``seq`` holds a request of another kind, or is a used
            ``seq_id`` too old to be remembered; 400 if it is out of range.
        """
        held = self._seen.get(seq)
        if held is None and seq in self._waiting:
            held = (self._waiting[seq].kind, self._waiting[seq].request_id)
        if held is not None:
            if held[0] != kind:
                raise OrderError(
                    409,
                    f"seq_id: {seq} is already used by a {held[0]} request; "
                    f"a retry must repeat the same request (found {kind})",
                )
            return held[1]
        if seq < self.next_seq:
            raise OrderError(
                409,
                f"seq_id: {seq} was already used or skipped; the model is at seq_id "
                f"{self.next_seq}",
            )
        limit = min(MAX_SEQ_ID, self.next_seq + self.max_ahead)
        if seq > limit:
            raise OrderError(
                400,
                f"seq_id: expected at most {limit} (at most {self.max_ahead} ahead of the "
                f"model's next seq_id {self.next_seq}), found {seq}",
            )
        return None

    def next_free(self) -> int:
        """The ``seq_id`` given to a request sent without one: after every known one."""
        return max([self.next_seq - 1, *self._waiting]) + 1

    def add(
        self,
        seq: int,
        kind: str,
        request_id: str,
        *,
        release: Callable[[], None],
        fail: Callable[[str], None],
    ) -> list[Callable[[], None]]:
        """Registers a request (``known(seq, kind)`` must have returned ``None``).

        Returns the releases now due, in order: the caller runs them after unlocking.
        """
        self._waiting[seq] = _Waiting(kind, request_id, release, fail, time.monotonic())
        return self._advance()

    def _advance(self) -> list[Callable[[], None]]:
        due = []
        while self.next_seq in self._waiting:
            w = self._waiting.pop(self.next_seq)
            self._remember(self.next_seq, w.kind, w.request_id)
            due.append(w.release)
            self.next_seq += 1
        return due

    def _remember(self, seq: int, kind: str, request_id: str) -> None:
        self._seen[seq] = (kind, request_id)
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)

    def expire(self, wait_s: float, now: float | None = None) -> list[Callable[[], None]]:
        """Fails the requests that have waited longer than ``wait_s`` for a predecessor.

        Each failure names the missing ``seq_id`` s. The failed requests' ``seq_id`` s
        count as used (a retry gets the failure); the callables returned (failures,
        then releases of requests behind them that are now due) run after unlocking.
        """
        now = time.monotonic() if now is None else now
        expired = [s for s, w in self._waiting.items() if not w.expired and now - w.since > wait_s]
        if not expired:
            return []
        out: list[Callable[[], None]] = []
        for seq in sorted(expired):
            missing = [s for s in range(self.next_seq, seq) if s not in self._waiting]
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            message = (
                f"seq_id {seq} waited {now - self._waiting[seq].since:.0f}s for its "
                f"predecessor(s) seq_id {shown} (missing: {len(missing)}), which never "
                "arrived; send them or release them with skip_seq"
            )
            w = self._waiting[seq]
            w.release, w.expired = _noop, True
            out.append(functools.partial(w.fail, message))
        # The expired requests stay in line as no-ops: their seq_ids stay used, and the
        # requests behind them run as soon as the missing predecessors are filled in.
        return out

    def drop_all(self, reason: str) -> list[Callable[[], None]]:
        """Fails every waiting request (the model is being deleted)."""
        waiting, self._waiting = self._waiting, {}
        return [functools.partial(w.fail, reason) for w in waiting.values()]


def _noop() -> None:
    return None
