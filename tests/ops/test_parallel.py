"""detseg.ops.parallel: order, errors and the caller's modes in the worker threads."""

from __future__ import annotations

import threading

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
