"""Small layers shared by the semantic models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU, 'same' padding."""
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def resize_output(
    x: torch.Tensor, like: torch.Tensor | tuple[int, int], align_corners: bool = False
) -> torch.Tensor:
    """``resize_to`` for a model's final class scores, from float32 NCHW.

    On the CPU the few class channels resize as fast from NCHW as from channels-last, and the
    output is NCHW anyway, so a channels-last input (what the fast path's convolutions leave)
    would cost a layout copy of the full-size map afterwards (FCN-8s R50 at 512x512: 10 of its
    115 ms). Under bfloat16 autocast the low-resolution scores are cast first: the full-size
    resize then runs in float32, the dtype the fast path returns anyway, instead of a bfloat16
    resize and a cast of the full map (FCN-8s R18 bf16 at 512x512: 42 -> 38 ms). No-op copies
    for float32 NCHW (the reference path)."""
    return resize_to(x.float().contiguous(), like, align_corners)


def resize_to(
    x: torch.Tensor, like: torch.Tensor | tuple[int, int], align_corners: bool = False
) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) to ``like``'s (H, W)."""
    size = like.shape[-2:] if isinstance(like, torch.Tensor) else like
    if not torch.onnx.is_in_onnx_export() and tuple(x.shape[-2:]) == tuple(size):
        return x  # (an exported graph resizes always: the sizes that trace equal may differ later)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
