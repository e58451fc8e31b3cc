"""detseg.ops.parallel: order, errors and the caller's modes in the worker threads."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from detseg.ops.parallel import interleaved, parallel_map


def test_results_in_order_on_several_threads() -> None:
    names: set[str] = set()

    def square(x: int) -> int:
        names.add(threading.current_thread().name)
        return x * x

    assert parallel_map(square, range(20), threads=2) == [x * x for x in range(20)]
    assert parallel_map(square, [3], threads=2) == [9]
    assert any(n.startswith("detseg-ops") for n in names)


def test_modes_follow_the_caller_and_errors_reach_it() -> None:
    def modes(_: int) -> tuple[bool, bool]:
        return torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    with torch.inference_mode():
        assert set(parallel_map(modes, range(4), threads=2)) == {(True, False)}
    with torch.no_grad():
        assert set(parallel_map(modes, range(4), threads=2)) == {(False, False)}
    assert set(parallel_map(modes, range(4), threads=2)) == {(False, True)}

    def cast(_: int) -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled("cpu"), torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert set(parallel_map(cast, range(4), threads=2)) == {(True, torch.bfloat16)}

    def fail(x: int) -> int:
        raise ValueError(f"item {x}")

    with pytest.raises(ValueError, match="item 0"):
        parallel_map(fail, range(3), threads=2)


def test_interleaved_pieces_cover_the_index_once() -> None:
    index = torch.arange(10) * 3
    pieces = interleaved(index, 4)
    assert [p.tolist() for p in pieces] == [[0, 12, 24], [3, 15, 27], [6, 18], [9, 21]]
    assert interleaved(index[:2], 4)[1].tolist() == [3] and len(interleaved(index[:2], 4)) == 2
    assert interleaved(index[:0], 4) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_threads() -> None:
    assert parallel_map(abs, [-1, -2], threads=2) == [1, 2]  # the parent's pool has started
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only when the map returns (a hang times out below)
        os._exit(0 if parallel_map(abs, [-3, -4], threads=2) == [3, 4] else 1)
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("parallel_map hung in a forked child")
    assert os.waitstatus_to_exitcode(status) == 0
