"""TensorMask's windows (detectron2's anchors): grid, flattening order, box coding, natural masks.

Two square windows per location of P2..P7 (spec §3), flattened jointly over levels in
(level, h, w, a) order, P2 first; boxes are coded with weights (1.5, 1.5, 0.75, 0.75).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from detseg.ops.swap_align2nat import DEFAULT_PAD, swap_align2nat_windows

WINDOW_SIZES = ((44, 60), (88, 120), (176, 240), (352, 480), (704, 960), (1408, 1920))
STRIDES = (4, 8, 16, 32, 64, 128)
BBOX_REG_WEIGHTS = (1.5, 1.5, 0.75, 0.75)
SCALE_CLAMP = math.log(1000.0 / 16)


def grid_windows(
    height: int, width: int, stride: int, sizes: Sequence[float], device=None, dtype=None
) -> Tensor:
    """Square windows of one level, (height·width·A, 4) xyxy pixels, order (h, w, a).

    Window (h, w, a) is centred at (w·stride, h·stride) (no half-stride offset) with side
    ``sizes[a]``, unrounded and unclipped.
    """
    dtype = dtype or torch.float32
    half = torch.tensor(sizes, device=device, dtype=dtype) / 2
    ys = torch.arange(height, device=device, dtype=dtype) * stride
    xs = torch.arange(width, device=device, dtype=dtype) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)
    boxes = torch.stack((cx - half, cy - half, cx + half, cy + half), dim=-1)
    return boxes.reshape(-1, 4)


def level_windows(shapes: Sequence[tuple[int, int]], device=None, dtype=None) -> list[Tensor]:
    """Windows of every level for feature sizes ``shapes`` [(H_k, W_k)], P2 first (§3 sizes)."""
    return [
        grid_windows(h, w, STRIDES[k], WINDOW_SIZES[k], device=device, dtype=dtype)
        for k, (h, w) in enumerate(shapes)
    ]


def flatten_levels(outputs: Sequence[Tensor], num_anchors: int) -> Tensor:
    """Per level (N, A·C, H_k, W_k) -> (N, Σ H_k·W_k·A, C), order (level, h, w, a)."""
    flat = []
    for x in outputs:
        n, ac, h, w = x.shape
        flat.append(x.view(n, num_anchors, ac // num_anchors, h, w).permute(0, 3, 4, 1, 2))
    return torch.cat([f.reshape(f.shape[0], -1, f.shape[-1]) for f in flat], dim=1)


def window_index(shapes: Sequence[Sequence[int]], num_anchors: int, device=None) -> Tensor:
    """(Σ H_k·W_k·A, 4) int64 (level, h, w, a) of every window, in :func:`flatten_levels` order."""
    index = []
    for k, (h, w) in enumerate(shapes):
        cell = torch.arange(h * w * num_anchors, device=device)
        a, hw = cell % num_anchors, cell // num_anchors
        index.append(torch.stack((torch.full_like(cell, k), hw // w, hw % w, a), dim=1))
    return torch.cat(index)


def decode_boxes(deltas: Tensor, windows: Tensor) -> Tensor:
    """(R, 4) deltas (dx, dy, dw, dh) relative to (R, 4) xyxy windows -> (R, 4) xyxy boxes.

    Weights (1.5, 1.5, 0.75, 0.75), dw/dh clamped at log(1000/16), width = x2 − x1 (no +1).
    """
    coder = BoxCoder(BBOX_REG_WEIGHTS, bbox_xform_clip=SCALE_CLAMP)
    return coder.decode_single(deltas, windows)


def encode_boxes(gt_boxes: Tensor, windows: Tensor) -> Tensor:
    """(R, 4) xyxy targets relative to (R, 4) xyxy windows -> (R, 4) deltas, weights (1.5, 1.5, 0.75, 0.75)."""
    return BoxCoder(BBOX_REG_WEIGHTS, bbox_xform_clip=SCALE_CLAMP).encode_single(gt_boxes, windows)


def natural_masks_at(
    aligned: Tensor, level: int, bipyramid_on: bool, batch_index: Tensor, rows: Tensor, cols: Tensor
) -> Tensor:
    """Natural mask logits of selected windows only: (K, M, M), without the dense tensor.

    Args:
        aligned: (N, m², H, W) aligned logits of one level and window size (P2 grid with the
            bipyramid).
        level: 0 = P2; λ = 2^level with the bipyramid, 1 without.
        batch_index, rows, cols: (K,) int64 image index and level-k grid cell (h, w).
    """
    lam = 2**level if bipyramid_on else 1
    return swap_align2nat_windows(aligned, lam, batch_index, rows, cols, DEFAULT_PAD)
