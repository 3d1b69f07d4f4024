"""``LazySingleton``: the process-wide pools are made once, on first use, by one thread."""

from __future__ import annotations

import concurrent.futures
import threading
import time

from jaxreg._src.core import host
from jaxreg._src.core.pools import LazySingleton
from jaxreg._src.remote import futures as remote_futures


def test_made_once_under_concurrent_first_use():
    made = []

    def create():
        time.sleep(0.01)  # a slow factory: every thread arrives while it runs
        made.append(object())
        return made[-1]

    lazy = LazySingleton(create)
    start = threading.Barrier(16)

    def get():
        start.wait()
        return lazy.get()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda _: get(), range(16)))
    assert len(made) == 1
    assert all(g is made[0] for g in got)


def test_take_detaches_and_the_next_get_makes_a_new_one():
    count = iter(range(10))
    lazy = LazySingleton(lambda: next(count))
    assert lazy.take() is None  # nothing made yet, and take makes nothing
    assert (lazy.get(), lazy.get()) == (0, 0)
    assert lazy.take() == 0
    assert lazy.take() is None
    assert lazy.get() == 1


def test_library_pools_are_lazy_singletons():
    executor = remote_futures.EXECUTOR.get()
    assert isinstance(executor, concurrent.futures.ThreadPoolExecutor)
    assert remote_futures.EXECUTOR.get() is executor
    assert (
        executor.submit(lambda: threading.current_thread().name)
        .result()
        .startswith("jaxreg-custom")
    )
    assert host._threads() is host._threads()
    assert host._threads().submit(lambda: 41 + 1).result(timeout=10) == 42
    loop = host._loop()
    assert host._loop() is loop and loop.is_running()
