"""detseg.engine.memory: the scoped heap-only allocation and the RoI piece size."""

from __future__ import annotations

import threading

import pytest

from detseg.engine import memory


def test_heap_blocks_nest_across_threads_and_leave_on_errors() -> None:
    assert memory._HEAP_BLOCKS.running == 0
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with memory.heap_blocks():
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(5)
    counted = 1 if memory._glibc() is not None else 0
    assert memory._HEAP_BLOCKS.running == counted
    with pytest.raises(RuntimeError), memory.heap_blocks():
        assert memory._HEAP_BLOCKS.running == 2 * counted
        raise RuntimeError("inside")
    assert memory._HEAP_BLOCKS.running == counted  # the error left its scope
    release.set()
    thread.join()
    assert memory._HEAP_BLOCKS.running == 0


def test_rows_per_kept_block() -> None:
    half = memory.KEPT_BLOCK_BYTES // 2
    assert memory.rows_per_kept_block(784 * 256 * 4) == half // (784 * 256 * 4) == 20
    assert memory.rows_per_kept_block(half + 1) == 1  # one row, however large
    assert memory.rows_per_kept_block(0) == half
