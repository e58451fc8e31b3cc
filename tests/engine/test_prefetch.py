"""Read-ahead and background writing: order, bounds, errors, early stop."""

from __future__ import annotations

import threading
import time

import pytest

from detseg.engine.prefetch import BackgroundWriter, prefetch


def test_prefetch_keeps_order_and_reads_ahead_boundedly() -> None:
    produced: list[int] = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    out = []
    for item in prefetch(items(), depth=2):
        time.sleep(0.01)
        assert len(produced) - item <= 4  # the item, the queue (2), one blocked in put
        out.append(item)
    assert out == list(range(10))


def test_prefetch_raises_the_producers_error_in_order() -> None:
    def items():
        yield 1
        raise ValueError("bad frame")

    seen = []
    with pytest.raises(ValueError, match="bad frame"):
        for item in prefetch(items()):
            seen.append(item)
    assert seen == [1]


def test_prefetch_stops_the_thread_on_early_exit() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    for item in prefetch(endless()):
        if item == 3:
            break
    assert threading.active_count() == before


def test_background_writer_runs_in_order_and_reports_errors() -> None:
    done: list[int] = []
    with BackgroundWriter(depth=1) as writer:
        for i in range(5):
            writer.submit(done.append, i)
    assert done == list(range(5))

    def fail(_: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter() as writer:
            writer.submit(fail, 0)
            writer.submit(done.append, 99)  # skipped after the failure
    assert 99 not in done


def test_background_writer_keeps_the_callers_error() -> None:
    done: list[int] = []
    with pytest.raises(KeyError):
        with BackgroundWriter() as writer:
            writer.submit(done.append, 1)
            raise KeyError("caller")
    assert done == [1]
