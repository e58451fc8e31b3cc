"""Intersection over smaller area: hand-worked values and properties against a brute-force loop."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detseg.ops.ios import box_ios


def _boxes(n: int) -> st.SearchStrategy[torch.Tensor]:
    corner = st.tuples(
        st.integers(0, 20), st.integers(0, 20), st.integers(0, 10), st.integers(0, 10)
    )
    return st.lists(corner, min_size=0, max_size=n).map(
        lambda rows: torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in rows], dtype=torch.float64
        ).reshape(-1, 4)
    )


def _ios_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(a), len(b), dtype=a.dtype)
    for i, p in enumerate(a.tolist()):
        for j, q in enumerate(b.tolist()):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            small = min((p[2] - p[0]) * (p[3] - p[1]), (q[2] - q[0]) * (q[3] - q[1]))
            out[i, j] = iw * ih / small if small > 0 else 0.0
    return out


def test_hand_worked() -> None:
    big = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    inner = torch.tensor([[2.0, 2.0, 4.0, 4.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    torch.testing.assert_close(box_ios(big, inner), torch.tensor([[1.0, 0.5, 0.0]]))


@settings(max_examples=80, deadline=None)
@given(_boxes(6), _boxes(6))
def test_matches_loop_symmetric_and_bounded(a: torch.Tensor, b: torch.Tensor) -> None:
    ios = box_ios(a, b)
    assert ios.shape == (len(a), len(b))
    torch.testing.assert_close(ios, _ios_loop(a, b))
    torch.testing.assert_close(ios, box_ios(b, a).T)
    assert bool(((ios >= 0) & (ios <= 1)).all())


@settings(max_examples=40, deadline=None)
@given(_boxes(6))
def test_ios_at_least_iou_and_one_on_self(a: torch.Tensor) -> None:
    from torchvision.ops import box_iou

    ios = box_ios(a, a)
    iou = box_iou(a, a).nan_to_num(0.0)  # torchvision gives 0/0 for two empty boxes
    assert bool((ios >= iou - 1e-12).all())
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    torch.testing.assert_close(ios.diagonal(), (area > 0).to(a.dtype))
