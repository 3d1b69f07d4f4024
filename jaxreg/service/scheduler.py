"""Runs requests on a few threads: each model's in order, models side by side, in a budget.

Every model has a lane (a FIFO of its released requests). A worker takes the head of
the least recently served lane that is not already running and whose memory estimate
fits in what is left of the budget, so:

* one model's requests run one at a time, in the order they were released;
* a large request on one model does not hold up a small one on another;
* the requests running at once never need more than ``memory_bytes`` together;
* a request that has waited ``starve_s`` for memory stops smaller ones from
  overtaking it, so large requests are not starved by a stream of small ones.

Example:
  >>> from jaxreg.service.scheduler import Scheduler
  >>> s = Scheduler(workers=2, memory_bytes=1 << 30)
  >>> done = []
  >>> s.put("model-a", lambda: done.append("a1"), cost=64 << 20)   # runs on a worker
  >>> s.put("model-a", lambda: done.append("a2"), cost=64 << 20)   # after a1: same lane
  >>> s.close()                               # runs what is queued, then stops
  >>> done
  ['a1', 'a2']
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Hashable


@dataclasses.dataclass
class _Job:
    run: Callable[[], None]
    cost: int
    queued: float


class Scheduler:
    """Worker threads running per-lane FIFO jobs within a memory budget.

    Args:
      workers: the number of threads.
      memory_bytes: the most that the jobs running at once may cost together.
      starve_s: after a job has waited this long for memory, smaller jobs no longer
        overtake it.
    """

    def __init__(self, workers: int, memory_bytes: int, *, starve_s: float = 1.0):
        self.memory_bytes, self.starve_s = memory_bytes, starve_s
        self._lanes: collections.OrderedDict[Hashable, collections.deque[_Job]] = (
            collections.OrderedDict()
        )
        self._running: set[Hashable] = set()
        self._used = 0
        self.peak_used = 0
        self._cond = threading.Condition()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._work, name=f"jaxreg-engine-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def put(self, lane: Hashable, run: Callable[[], None], cost: int = 0) -> None:
        """Queues ``run`` at the end of ``lane``; ``cost`` bytes are reserved while it runs."""
        if cost > self.memory_bytes:
            raise ValueError(f"cost {cost} exceeds the memory budget {self.memory_bytes}")
        with self._cond:
            self._lanes.setdefault(lane, collections.deque()).append(
                _Job(run, cost, time.monotonic())
            )
            self._cond.notify()

    def queued(self) -> int:
        """How many jobs are queued (not yet running)."""
        with self._cond:
            return sum(len(q) for q in self._lanes.values())

    def _pick(self) -> tuple[Hashable, _Job] | None:
        now = time.monotonic()
        free = self.memory_bytes - self._used
        for lane, q in self._lanes.items():
            if lane in self._running or not q:
                continue
            job = q[0]
            if job.cost <= free:
                return lane, job
            if now - job.queued > self.starve_s:
                return None  # this one has waited long enough: nobody overtakes it
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    picked = self._pick()
                    if picked is not None:
                        break
                    if self._closing and not any(self._lanes.values()) and not self._running:
                        self._cond.notify_all()
                        return
                    self._cond.wait(0.5)
                lane, job = picked
                self._lanes[lane].popleft()
                self._lanes.move_to_end(lane)  # least recently served first next time
                if not self._lanes[lane]:
                    del self._lanes[lane]
                self._running.add(lane)
                self._used += job.cost
                self.peak_used = max(self.peak_used, self._used)
            try:
                job.run()
            finally:
                with self._cond:
                    self._running.discard(lane)
                    self._used -= job.cost
                    self._cond.notify_all()

    def close(self) -> None:
        """Runs the queued jobs, then stops the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
