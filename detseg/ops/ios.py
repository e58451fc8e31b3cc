"""Intersection over smaller area (IoS), the match metric SAHI uses to merge sliced detections.

Where IoU asks "are these the same box?", IoS asks "is one box (mostly) inside the other?": a box cut
at a tile border is a fraction of the whole object's box, with a low IoU but an IoS near 1.
"""

from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy -> (N,) areas, zero for degenerate boxes."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    return wh[:, 0] * wh[:, 1]


def box_intersection(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) xyxy -> (N, M) intersection areas."""
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_ios(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over the smaller of the two areas.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy, same dtype and device.

    Returns:
        (N, M) in [0, 1]; 0 where either box has zero area.
    """
    inter = box_intersection(boxes1, boxes2)
    smaller = torch.minimum(box_area(boxes1)[:, None], box_area(boxes2)[None, :])
    return torch.where(smaller > 0, inter / smaller.clamp(min=torch.finfo(inter.dtype).tiny), 0.0)
